"""masqd.wire."""
