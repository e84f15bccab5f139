"""masqd.ops."""
