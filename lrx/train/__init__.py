"""lrx.train."""
