"""lrx.ssm."""
