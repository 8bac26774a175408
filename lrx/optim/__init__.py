"""lrx.optim."""
