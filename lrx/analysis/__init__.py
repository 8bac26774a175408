"""lrx.analysis."""
