"""Projector properties, state shapes, memory closed forms, errors, masks."""

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


@pytest.mark.parametrize("proj_type", lo.PROJ_TYPES)
@pytest.mark.parametrize("shape", [(48, 20), (20, 48), (16, 16)])
def test_state_shapes_and_memory_closed_form(proj_type, shape):
    m, n = shape
    r = 6
    state = lo.scale_by_galore(r, proj_type=proj_type).init({"w": jnp.zeros(shape)})
    p, mu, nu = state.projector["w"], state.mu["w"], state.nu["w"]
    side = lo.resolve_side(m, n, proj_type)
    want_r = {"left": (1, r, n), "right": (1, m, r), "full": (1, r, r)}[side]
    assert mu.shape == nu.shape == want_r
    sizes = sum(x.size for x in (p.left, p.right, mu, nu) if x is not None)
    closed = lo.galore_state_size(m, n, r, proj_type)
    assert sizes == closed["total"]
    if proj_type == "std":
        assert closed["total"] == r * min(m, n) + 2 * r * max(m, n)
    if proj_type == "reverse_std":
        assert closed["total"] == r * max(m, n) + 2 * r * min(m, n)
    assert state.projector["w"].left is None or state.projector["w"].left.dtype == jnp.float32


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


def test_bf16_params_float32_projector_and_moment_dtype():
    params = {"w": jnp.ones((8, 6), jnp.bfloat16)}
    opt = lo.scale_by_galore(2, moment_dtype=jnp.bfloat16)
    state = opt.init(params)
    g = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 6)).astype(jnp.bfloat16)}
    u, state = jax.jit(opt.update)(g, state, params)
    assert u["w"].dtype == jnp.bfloat16
    assert state.projector["w"].right.dtype == jnp.float32
    assert state.mu["w"].dtype == jnp.bfloat16


def test_mask_pytree_callable_and_dimension_numbers():
    params = {"attn": {"q": {"kernel": jnp.zeros((8, 3, 4))}}, "embed": jnp.zeros((10, 8)),
              "norm": jnp.zeros((8,))}
    mask = lo.path_mask(params, r".*attn/.*kernel")
    assert mask == {"attn": {"q": {"kernel": True}}, "embed": False, "norm": False}
    dims = {"attn": {"q": {"kernel": lo.DimensionNumbers(reduction=(0,), output=(1, 2))}},
            "embed": None, "norm": None}
    state = lo.scale_by_galore(3, mask=mask, dimension_numbers=dims).init(params)
    assert state.projector["embed"] is None and state.mu["embed"].shape == (10, 8)
    # (8, 3*4) matrix, std on wide -> left projector (1, 8, 3), moments (1, 3, 8)
    assert state.projector["attn"]["q"]["kernel"].left.shape == (1, 8, 3)
    # callable mask gives the same plan
    state2 = lo.scale_by_galore(3, mask=lambda p: lo.path_mask(p, r".*attn/.*kernel"),
                                dimension_numbers=dims).init(params)
    assert jax.tree_util.tree_structure(state2) == jax.tree_util.tree_structure(state)
    labels = lo.path_labels(params, {"lowrank": r".*attn/.*"}, "adam")
    assert labels == {"attn": {"q": {"kernel": "lowrank"}}, "embed": "adam", "norm": "adam"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=0), "rank"),
    (dict(rank=4, proj_type="middle"), "proj_type.*'std'"),
    (dict(rank=4, projector="qr"), "projector.*'randomized'"),
    (dict(rank=4, moments="rotate"), "moments.*'project'"),
    (dict(rank=4, update_proj_gap=0), "update_proj_gap"),
])
def test_galore_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lo.scale_by_galore(**kwargs)


def test_other_errors():
    with pytest.raises(ValueError, match="subspace.*'blocks'"):
        lo.frugal(0.1, subspace="tensor")
    with pytest.raises(ValueError, match="state_free"):
        lo.frugal(0.1, state_free="adam")
    with pytest.raises(ValueError, match="density"):
        lo.frugal(0.1, density=1.5)
    with pytest.raises(ValueError, match="residual"):
        lo.fira(0.1, residual="both")
    with pytest.raises(ValueError, match="one-sided"):
        lo.fira(0.1, proj_type="full")
    opt = lo.scale_by_galore(2, mask={"w": True, "b": True})
    with pytest.raises(ValueError, match="'b'.*not a matrix"):
        opt.init({"w": jnp.zeros((4, 4)), "b": jnp.zeros((4,))})
