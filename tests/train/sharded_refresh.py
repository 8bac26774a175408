"""Child process of tests/train/test_sharding.py (needs 8 devices: run with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``): computes projectors of a gradient stack
split over an ``fsdp=8`` mesh along its rows or its columns, with the sharded compile and with a
1-device compile, and writes one JSON record per case: the projector of both, and the
per-device all-gathered bytes of the sharded program (from its compiled HLO).

    python -m tests.train.sharded_refresh OUT_FILE
"""

import json
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from experiments.bench_memory import hlo_collectives
from lrx.optim import subspace as sub
from lrx.train import sharding as shd

B, M, N, RANK = 2, 64, 48, 4
# (method, side, split axis of the (B, M, N) gradient): the randomized refresh with the split on
# the projected side and on the other side (left and right), the exact SVD once
CASES = [("randomized", "left", 1), ("randomized", "left", 2), ("randomized", "right", 1),
         ("svd", "left", 2)]


def gradient() -> np.ndarray:
    """A ``(B, M, N)`` stack with a decaying spectrum (so the top-r subspace is well defined)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(B):
        u, _ = np.linalg.qr(rng.standard_normal((M, M)))
        v, _ = np.linalg.qr(rng.standard_normal((N, N)))
        k = min(M, N)
        out.append((u[:, :k] * np.exp(-np.arange(k) / 3.0)) @ v[:, :k].T)
    return np.stack(out).astype(np.float32)


def main(out_file: str) -> None:
    mesh = shd.make_mesh(data=1, fsdp=8)
    g = gradient()
    key = jax.random.PRNGKey(3)
    records = []
    for method, side, axis in CASES:
        def f(x, k, method=method, side=side):
            p = sub.compute_projector(x, side, RANK, method, k, oversample=4, power_iters=1)
            return p.left if side == "left" else p.right

        spec = [None, None, None]
        spec[axis] = "fsdp"
        d = M if side == "left" else N
        out_spec = shd.fsdp_spec((B, d, RANK), 8, min_elements=1)   # the harness' state rule
        sharded = jax.jit(f, in_shardings=(NamedSharding(mesh, PartitionSpec(*spec)),
                                           NamedSharding(mesh, PartitionSpec())),
                          out_shardings=NamedSharding(mesh, out_spec))
        compiled = sharded.lower(jax.ShapeDtypeStruct(g.shape, g.dtype), key).compile()
        gathered = hlo_collectives(compiled.as_text())["step"]["all-gather"]
        one = jax.jit(f)(jax.device_put(g, jax.devices()[0]), jax.device_put(key,
                                                                             jax.devices()[0]))
        many = compiled(jax.device_put(g, NamedSharding(mesh, PartitionSpec(*spec))), key)
        records.append(dict(method=method, side=side, axis=axis, allgather_bytes=gathered,
                            spec=str(out_spec), one=np.asarray(one).tolist(),
                            many=np.asarray(many).tolist()))
    with open(out_file, "w") as f:
        json.dump(records, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
