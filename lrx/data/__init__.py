"""lrx.data."""
