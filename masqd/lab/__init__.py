"""masqd.lab."""
