"""lrx.models."""
