"""lrx.train: the shared training loop (train state, jit'd step with gradient accumulation and
buffer donation, evaluation, orbax checkpoints with exact resume, metrics files, NaN stop,
SIGTERM/SIGINT handling) and device-mesh sharding rules. ``lrx.train.scan.fit`` is a compact
scan-compiled loop for tiny synthetic problems."""
