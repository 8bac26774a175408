"""APOLLO / APOLLO-Mini against the NumPy float64 re-derivation of the official step
(tests/optim/reference.py::apollo), fed the same projection matrices (read through
lrx.optim.projectors), in the Flax (in, out) and PyTorch (out, in) layouts, square included."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrx.optim as lo
from tests.optim import reference as ref

TORCH_DIMS = lo.DimensionNumbers(reduction=(-1,), output=(-2,))


def _official_ortho(p: lo.Projector) -> np.ndarray:
    """lrx's projector of the (in, out) view -> the official ortho_matrix of the (out, in) weight:
    lrx left P (in, r) is the official right projection oᵀ (o: (r, in)); lrx right Q (out, r) is
    the official left projection o (out, r)."""
    if p.left is not None:
        return np.asarray(p.left[0], np.float64).T
    return np.asarray(p.right[0], np.float64)


def _run_and_read(opt, params, grads):
    state = opt.init(params)
    update = jax.jit(opt.update)
    orthos = []
    for g in grads:
        u, state = update({"w": jnp.asarray(g, jnp.float32)}, state, params)
        params = optax.apply_updates(params, u)
        orthos.append(_official_ortho(lo.projectors(state)["w"]))
    return params, state, orthos


CASES = [  # (shape as stored, layout, rank, mini)
    ((12, 8), "flax", 3, False), ((8, 12), "flax", 3, False), ((8, 8), "flax", 3, False),
    ((12, 8), "torch", 3, False), ((8, 8), "torch", 3, False), ((8, 12), "torch", 3, False),
    ((8, 8), "flax", 1, True), ((8, 8), "torch", 1, True), ((12, 8), "flax", 1, True),
    ((1, 6), "flax", 1, True), ((6, 1), "torch", 1, True), ((1, 6), "torch", 1, False),
]


@pytest.mark.parametrize("shape,layout,rank,mini", CASES)
def test_apollo_matches_official_step(shape, layout, rank, mini):
    rng = np.random.default_rng(20)
    w0 = rng.standard_normal(shape)
    gs = [rng.standard_normal(shape) * 1.5 ** t for t in range(5)]   # growing: limiter acts
    dims = None if layout == "flax" else TORCH_DIMS
    make = lo.apollo_mini if mini else lo.apollo
    opt = make(0.01, rank=rank, update_proj_gap=2, weight_decay=0.1, dimension_numbers=dims)
    out, state, orthos = _run_and_read(opt, {"w": jnp.asarray(w0, jnp.float32)}, gs)
    # a new projection every update_proj_gap steps, the same one within a window
    np.testing.assert_array_equal(orthos[0], orthos[1])
    assert not np.allclose(orthos[1], orthos[2])
    want = ref.apollo(w0, gs, orthos=orthos, lr=0.01, wd=0.1, layout=layout,
                      scale_type="tensor" if mini else "channel", scale=128.0 if mini else 1.0)
    np.testing.assert_allclose(out["w"], want, rtol=1e-5, atol=1e-5)


def test_apollo_reverse_std_and_unprojected_leaf():
    rng = np.random.default_rng(21)
    w0, b0 = rng.standard_normal((12, 8)), rng.standard_normal(5)
    gs = [rng.standard_normal((12, 8)) for _ in range(4)]
    gb = [rng.standard_normal(5) for _ in range(4)]
    opt = lo.apollo(0.01, rank=3, update_proj_gap=3, proj_type="reverse_std")
    params = {"w": jnp.asarray(w0, jnp.float32), "b": jnp.asarray(b0, jnp.float32)}
    state = opt.init(params)
    orthos = []
    for g, h in zip(gs, gb, strict=True):
        u, state = jax.jit(opt.update)({"w": jnp.asarray(g, jnp.float32),
                                        "b": jnp.asarray(h, jnp.float32)}, state, params)
        params = optax.apply_updates(params, u)
        proj = lo.projectors(state)
        assert proj["b"] is None
        orthos.append(_official_ortho(proj["w"]))
    want = ref.apollo(w0, gs, orthos=orthos, lr=0.01, scale_type="channel", scale=1.0,
                      proj_type="reverse_std", layout="flax")
    np.testing.assert_allclose(params["w"], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(params["b"], ref.adamw_galore_style(b0, gb, lr=0.01),
                               rtol=1e-5, atol=1e-6)


def test_apollo_projection_is_not_stored_and_mini_state_is_tiny():
    params = {"w": jnp.zeros((64, 96))}
    state = lo.scale_by_apollo(1, scale_type="tensor").init(params)
    # only the key of the projection lives in the state
    assert [x.shape for x in jax.tree_util.tree_leaves(state.projection)] == [(2,)]
    adam = optax.adam(1e-3).init(params)
    assert lo.tree_bytes(state) <= 0.05 * lo.tree_bytes(adam)
    p = lo.projectors(state)["w"]
    assert p.left is not None and p.left.shape == (1, 64, 1)   # std on (in 64, out 96): input


def test_apollo_errors():
    with pytest.raises(ValueError, match="scale_type.*'channel'"):
        lo.apollo(0.1, scale_type="row")
    with pytest.raises(ValueError, match="proj_type"):
        lo.apollo(0.1, proj_type="full")
    with pytest.raises(ValueError, match="rank"):
        lo.apollo(0.1, rank=0)


def test_configs_apollo_use_the_official_scripts_ranks():
    """configs/apollo.py: the official pre-training scripts' APOLLO ranks per size (60M 128,
    130M 192, 350M/1B 256), APOLLO-Mini rank 1 / tensor / scale 128 in any variant order."""
    from configs.apollo import get_config

    for arg, rank in [("llama_60m", 128), ("llama_130m", 192), ("llama_350m", 256),
                      ("llama_1b", 256)]:
        o = get_config(arg).optimizer
        assert (o.rank, o.scale_type, o.scale, o.update_proj_gap) == (rank, "channel", 1.0, 200)
        for mini in (f"mini,{arg}", f"{arg},mini"):
            o = get_config(mini).optimizer
            assert (o.rank, o.scale_type, o.scale) == (1, "tensor", 128.0)
    o = get_config().optimizer
    assert (o.proj_type, o.learning_rate, o.weight_decay) == ("std", 0.01, 0.0)
