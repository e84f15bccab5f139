"""masqd.engine."""
