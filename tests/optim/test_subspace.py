"""lrx.optim.subspace: projector backends (orthonormal, randomized energy capture, warm starts) and
the side rule in DimensionNumbers terms (ties included)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrx.optim as lo
from lrx.optim import subspace as sub


@pytest.mark.parametrize("method", ["svd", "randomized", "random", "randperm"])
@pytest.mark.parametrize("side", ["left", "right", "full"])
def test_projectors_orthonormal(method, side):
    g = jax.random.normal(jax.random.PRNGKey(0), (3, 20, 14))
    p = sub.compute_projector(g, side, 5, method, jax.random.PRNGKey(1))
    for basis in (p.left, p.right):
        if basis is None:
            continue
        gram = np.einsum("bdr,bds->brs", np.asarray(basis, np.float64),
                         np.asarray(basis, np.float64))
        np.testing.assert_allclose(gram, np.broadcast_to(np.eye(5), gram.shape), atol=1e-5)
    assert (p.left is not None) == (side in ("left", "full"))
    assert (p.right is not None) == (side in ("right", "full"))

def _decaying(m, n, spectrum, seed):
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, m)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = min(m, n)
    return (u[:, :k] * spectrum(np.arange(k))) @ v[:, :k].T

@pytest.mark.parametrize("spectrum", [lambda i: np.exp(-i / 8.0), lambda i: 1.0 / (1 + i) ** 2,
                                      lambda i: 1.0 / (1 + i)])
@pytest.mark.parametrize("shape", [(96, 160), (160, 96)])
def test_randomized_captures_top_r_energy(spectrum, shape):
    r = 16
    g = _decaying(*shape, spectrum, seed=0)
    exact = np.sum(np.linalg.svd(g, compute_uv=False)[:r] ** 2)
    p = sub.randomized_range(jnp.asarray(g, jnp.float32)[None], r, jax.random.PRNGKey(0),
                             oversample=8, power_iters=1)
    p = np.asarray(p[0], np.float64)
    captured = np.sum((p.T @ g) ** 2)
    assert captured >= 0.999 * exact, captured / exact

def test_randomized_warm_start_tracks_subspace():
    g = _decaying(64, 96, lambda i: np.exp(-i / 4.0), seed=1)
    gj = jnp.asarray(g, jnp.float32)[None]
    exact = sub.top_left_svd(gj, 8)
    warm = sub.randomized_range(gj, 8, jax.random.PRNGKey(3), oversample=0, power_iters=0,
                                warm=exact)
    cos = np.linalg.svd(np.asarray(exact[0]).T @ np.asarray(warm[0]), compute_uv=False)
    assert cos.min() > 0.999

def test_flax_layout_picks_official_dimension_and_reverse_std_is_smaller():
    """resolve_side(m=in, n=out): 'std' projects the input dimension when out >= in (official
    ``Vh[:r]`` on the torch (out, in) weight), ties included; 'reverse_std' needs less memory."""
    d_in, d_out = 512, 1376            # LLaMA-60M up_proj: torch weight (1376, 512)
    assert lo.resolve_side(d_out, d_in, "std") == "right"   # down_proj (in 1376, out 512): out
    assert lo.resolve_side(d_in, d_out, "std") == "left"    # up_proj: U[:, :r] over the in-dim
    assert lo.resolve_side(64, 64, "std") == "left"          # tie: the input (reduction) axes
    assert lo.resolve_side(64, 64, "reverse_std") == "right"  # tie: the output axes
    std = lo.galore_state_size(d_in, d_out, 128, "std")["total"]
    rev = lo.galore_state_size(d_in, d_out, 128, "reverse_std")["total"]
    assert rev < std
    assert lo.galore_state_size(d_out, d_in, 128, "std")["total"] == std
