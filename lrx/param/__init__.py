"""lrx.param."""
