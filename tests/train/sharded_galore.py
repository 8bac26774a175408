"""Child process of tests/train/test_sharding.py (needs 8 devices: run with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``): a few GaLore train steps of a tiny
scanned LLaMA whose intermediate size (132) is not divisible by the 8 devices, with the state
sharded by :func:`lrx.train.sharding.tree_shardings` on a ``data=1 x fsdp=8`` mesh and on one
device, both compiled from the same step. Writes one JSON record per projector backend: the
losses and final parameters of both, and the specs the rule gave the MLP bases and the attention
moments (the llama_1b layout in small: bases of the indivisible axis split along ``r``, moments of
gradients split along their projected axis split along ``r``).

    python -m tests.train.sharded_galore OUT_FILE [PROJECTOR ...]   # default: randomized
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import lrx.optim as lo
from lrx.models.llama import Llama, preset
from lrx.train import loop
from lrx.train import sharding as shd

STEPS, GAP, RANK, BATCH, SEQ = 4, 2, 8, 8, 16
CFG = preset("tiny", hidden_size=64, intermediate_size=132, num_heads=4, num_layers=2,
             vocab_size=64, max_len=SEQ, scan_layers=True, remat=True)


def batches() -> np.ndarray:
    """``(STEPS, 1, BATCH, SEQ + 1)`` int32 tokens (one micro-batch a step)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, CFG.vocab_size, (STEPS, 1, BATCH, SEQ + 1)).astype(np.int32)


def main(out_file: str, *projectors: str) -> None:
    model = Llama(CFG)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]

    def loss_fn(p, fz, b, rng):  # noqa: ARG001
        logits = model.apply({"params": p}, b[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[:, 1:]).mean(), {}

    mesh = shd.make_mesh(data=1, fsdp=8)
    replicated = NamedSharding(mesh, PartitionSpec())
    data = batches()
    records = []
    for projector in projectors or ("randomized",):
        opt = lo.galore(3e-3, rank=RANK, update_proj_gap=GAP, proj_type="reverse_std",
                        projector=projector, mask=lambda p: lo.path_mask(p, lo.ATTN_MLP))
        state = loop.TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen={},
                                opt_state=opt.init(params),
                                rng=jax.random.key_data(jax.random.key(1)))
        step = loop.make_step(loss_fn, opt)
        abstract = jax.eval_shape(lambda s: s, state)
        shardings = shd.tree_shardings(abstract, mesh).replace(step=replicated, rng=replicated)
        batch_sharding = shd.batch_sharding(mesh, 3, batch_axis=1)
        sharded = jax.jit(step, in_shardings=(shardings, batch_sharding),
                          out_shardings=(shardings, replicated))
        one = jax.jit(step)
        device = jax.devices()[0]
        runs = {}
        for name, fn, state_at, batch_at in (("one", one, device, device),
                                             ("many", sharded, shardings, batch_sharding)):
            s, losses = jax.device_put(state, state_at), []
            for t in range(STEPS):
                s, metrics = fn(s, jax.device_put(data[t], batch_at))
                losses.append(float(metrics["loss"]))
            runs[name] = (losses, [np.asarray(x, np.float64).ravel().tolist()
                                   for x in jax.tree_util.tree_leaves(s.params)])
        gst = shardings.opt_state[0]
        specs = {"mlp_up_basis": str(gst.projector["layers"]["mlp"]["up"]["kernel"].right.spec),
                 "mlp_down_basis": str(gst.projector["layers"]["mlp"]["down"]["kernel"].left.spec),
                 "attn_q_moment": str(gst.mu["layers"]["attn"]["q"]["kernel"].spec),
                 "mlp_up_moment": str(gst.mu["layers"]["mlp"]["up"]["kernel"].spec)}
        records.append(dict(projector=projector, one_losses=runs["one"][0],
                            many_losses=runs["many"][0], one_params=runs["one"][1],
                            many_params=runs["many"][1], specs=specs,
                            moved=max(float(np.max(np.abs(np.asarray(a).ravel() - np.asarray(b))))
                                      for a, b in zip(jax.tree_util.tree_leaves(params),
                                                      runs["one"][1]))))
    with open(out_file, "w") as f:
        json.dump(records, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
