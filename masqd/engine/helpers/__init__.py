"""masqd.engine.helpers."""
