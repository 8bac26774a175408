"""lrx.optim.fira against the NumPy float64 re-derivation (tests/optim/reference.py), square and
1-row/1-column shapes in both layouts; the norm-growth limiter; errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrx.optim as lo
from tests.optim import reference as ref
from tests.optim.helpers import _dims, _grads, _run

jax.config.update("jax_enable_x64", False)

@pytest.mark.parametrize("residual", ["official", "paper"])
@pytest.mark.parametrize("shape,proj_type,layout", [
    ((12, 8), "std", "flax"), ((8, 12), "std", "flax"), ((12, 8), "reverse_std", "flax"),
    ((8, 8), "std", "flax"), ((8, 8), "reverse_std", "flax"), ((8, 8), "std", "torch"),
    ((8, 8), "reverse_std", "torch"), ((12, 8), "std", "torch"), ((1, 6), "std", "flax"),
    ((6, 1), "reverse_std", "torch")])
def test_fira_matches_numpy(residual, shape, proj_type, layout):
    rng = np.random.default_rng(7)
    w0 = rng.standard_normal(shape)
    gs = _grads(shape, 5, seed=8, growth=1.5)          # growing norms: the limiter acts
    opt = lo.fira(0.01, rank=3, update_proj_gap=2, scale=0.25, proj_type=proj_type,
                  residual=residual, weight_decay=0.05, dimension_numbers=_dims(layout))
    out, state = _run(opt, {"w": jnp.asarray(w0, jnp.float32)}, [{"w": g} for g in gs])
    want = ref.fira(w0, gs, rank=3, gap=2, scale=0.25, proj_type=proj_type, lr=0.01,
                    residual=residual, wd=0.05, layout=layout)
    np.testing.assert_allclose(out["w"], want, rtol=1e-5, atol=1e-5)
    assert state[0].limiter_norm["w"].shape == (1,)

def test_fira_limiter_binds():
    """With fast-growing gradients the limited residual norm grows by exactly γ per step."""
    rng = np.random.default_rng(9)
    opt = lo.scale_by_fira(rank=2, update_proj_gap=100, gamma=1.01)
    params = {"w": jnp.zeros((10, 6))}
    state = opt.init(params)
    norms = []
    for t in range(4):
        g = {"w": jnp.asarray(rng.standard_normal((10, 6)) * 3.0 ** t, jnp.float32)}
        _, state = opt.update(g, state, params)
        norms.append(float(state.limiter_norm["w"][0]))
    np.testing.assert_allclose(np.array(norms[1:]) / np.array(norms[:-1]), 1.01, rtol=1e-5)

def test_fira_errors():
    with pytest.raises(ValueError, match="residual"):
        lo.fira(0.1, residual="both")
    with pytest.raises(ValueError, match="one-sided"):
        lo.fira(0.1, proj_type="full")
