"""masqd.dataplane."""
