"""Shared pieces of the lrx.optim tests: gradient sequences, the shapes and layouts of the
reference comparisons (tall, wide, square, 1-row, 1-column; Flax and PyTorch layouts)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lrx.optim as lo


def _grads(shape, steps, seed=0, growth=1.0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) * growth ** t for t in range(steps)]

SHAPES = [(12, 8), (8, 12), (8, 8), (1, 6), (6, 1)]

LAYOUTS = ["flax", "torch"]

OFFICIAL = {"left": "right", "right": "left"}

TORCH_DIMS = lo.DimensionNumbers(reduction=(-1,), output=(-2,))

def _dims(layout):
    """lrx dimension_numbers for a weight stored in ``layout``: Flax (in, out) / torch (out, in)."""
    return None if layout == "flax" else TORCH_DIMS

def _official(proj_type):
    return OFFICIAL.get(proj_type, proj_type)

def _run(opt, params, grads_seq):
    state = opt.init(params)
    update = jax.jit(opt.update)
    for g in grads_seq:
        g = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), g)
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state
