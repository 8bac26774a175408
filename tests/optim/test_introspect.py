"""lrx.optim.projectors: the projection matrices of any optimizer state, through optax wrappers."""

import jax
import jax.numpy as jnp
import optax
import pytest

import lrx.optim as lo


def test_projectors_through_wrappers():
    params = {"a": jnp.zeros((8, 6)), "b": jnp.zeros((6, 10)), "n": jnp.zeros((6,))}
    grads = jax.tree_util.tree_map(lambda z: jnp.arange(z.size, dtype=jnp.float32
                                                        ).reshape(z.shape) % 7 - 3.0, params)
    labels = {"a": "low", "b": "apollo", "n": "adam"}
    opt = optax.chain(
        optax.clip_by_global_norm(1.0),
        lo.inject_hyperparams(lo.galore)(learning_rate=0.1, rank=2,
                                         mask={"a": True, "b": True, "n": False}))
    _, state = opt.update(grads, opt.init(params), params)
    proj = lo.projectors(state)
    assert proj["n"] is None and proj["a"].right.shape == (1, 6, 2)   # (in 8, out 6): out
    assert proj["b"].left.shape == (1, 6, 2)                        # (in 6, out 10): in
    multi = optax.multi_transform(
        {"low": lo.galore(0.1, rank=2, mask=lambda p: jax.tree_util.tree_map(
            lambda x: getattr(x, "ndim", 0) == 2, p)),
         "apollo": lo.apollo(0.1, rank=3), "adam": optax.adam(0.1)}, labels)
    _, mstate = multi.update(grads, multi.init(params), params)
    mp = lo.projectors(mstate)
    assert mp["n"] is None
    assert mp["a"].right.shape == (1, 6, 2)
    assert mp["b"].left.shape == (1, 6, 3)       # apollo's regenerated Gaussian
    with pytest.raises(ValueError, match="no lrx.optim"):
        lo.projectors(optax.adam(0.1).init(params))
