"""lrx.train: the shared training loop (the train state and jit'd step with gradient
accumulation live in ``lrx.train.step``, re-exported by ``lrx.train.loop``; buffer donation,
evaluation, orbax checkpoints with exact resume, metrics files, NaN stop, SIGTERM/SIGINT
handling) and device-mesh sharding rules. ``lrx.train.scan.fit`` is a compact scan-compiled loop
for tiny synthetic problems. ``lrx.train.per_layer.make_per_layer_step`` updates each layer of a
scanned stack inside the backward pass (GaLore's per-layer updates). ``lrx.train.sweep`` trains K
replicas differing in learning rate and/or seed as one vmapped, jit-compiled step
(``loop.train(..., replicas=...)``)."""
