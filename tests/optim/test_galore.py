"""lrx.optim.galore against the NumPy float64 re-derivation (tests/optim/reference.py): several
steps with refreshes (update_proj_gap=2 over 5 steps: refreshes at t = 0, 2, 4), every side rule,
square and 1-row/1-column shapes in both layouts; state shapes, dtypes, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrx.optim as lo
from tests.optim import reference as ref
from tests.optim.helpers import LAYOUTS, SHAPES, _dims, _grads, _official, _run

jax.config.update("jax_enable_x64", False)

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("proj_type", lo.PROJ_TYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_galore_matches_numpy(proj_type, shape, layout):
    rng = np.random.default_rng(1)
    w0 = rng.standard_normal(shape)
    b0 = rng.standard_normal(5)
    gs = _grads(shape, 5)
    gb = _grads((5,), 5, seed=3)
    params = {"w": jnp.asarray(w0, jnp.float32), "b": jnp.asarray(b0, jnp.float32)}
    # 'full': on a refresh step Pᵀ G Q is diagonal in exact arithmetic, and Adam with eps=1e-6
    # amplifies float32 round-off in the off-diagonal zeros; a larger eps keeps the comparison
    # about the algorithm rather than about round-off.
    eps = 1e-3 if proj_type == "full" else 1e-6
    opt = lo.galore(0.01, rank=3, update_proj_gap=2, scale=0.25, proj_type=proj_type,
                    weight_decay=0.1, eps=eps, dimension_numbers={"w": _dims(layout), "b": None})
    out, _ = _run(opt, params, [{"w": g, "b": h} for g, h in zip(gs, gb, strict=True)])
    want = ref.galore(w0, gs, rank=3, gap=2, scale=0.25, proj_type=_official(proj_type), lr=0.01,
                      wd=0.1, eps=eps, layout=layout)
    np.testing.assert_allclose(out["w"], want, rtol=1e-5, atol=1e-5)
    want_b = ref.adamw_galore_style(b0, gb, lr=0.01, wd=0.1, eps=eps)
    np.testing.assert_allclose(out["b"], want_b, rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize("moments", ["reset", "project"])
def test_galore_moment_policies_match_numpy(moments):
    rng = np.random.default_rng(2)
    w0 = rng.standard_normal((10, 7))
    gs = _grads((10, 7), 5, seed=4)
    opt = lo.galore(0.02, rank=3, update_proj_gap=2, proj_type="std", moments=moments)
    out, _ = _run(opt, {"w": jnp.asarray(w0, jnp.float32)}, [{"w": g} for g in gs])
    want = ref.galore(w0, gs, rank=3, gap=2, scale=0.25, proj_type="std", lr=0.02,
                      moments=moments, layout="flax")
    np.testing.assert_allclose(out["w"], want, rtol=1e-5, atol=1e-5)

def test_galore_stacked_leaf_is_independent_matrices():
    rng = np.random.default_rng(5)
    w0 = rng.standard_normal((3, 9, 6))
    gs = _grads((3, 9, 6), 5, seed=6)
    opt = lo.galore(0.01, rank=2, update_proj_gap=2)
    out, state = _run(opt, {"w": jnp.asarray(w0, jnp.float32)}, [{"w": g} for g in gs])
    for i in range(3):
        want = ref.galore(w0[i], [g[i] for g in gs], rank=2, gap=2, scale=0.25,
                          proj_type="std", lr=0.01, layout="flax")
        np.testing.assert_allclose(out["w"][i], want, rtol=1e-5, atol=1e-5)
    inner = state[0]                                         # chain: (galore, lr/decay)
    assert inner.projector["w"].right.shape == (3, 6, 2)     # std on tall 9x6: right, r x n
    assert inner.mu["w"].shape == (3, 9, 2)

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

def test_bf16_params_float32_projector_and_moment_dtype():
    params = {"w": jnp.ones((8, 6), jnp.bfloat16)}
    opt = lo.scale_by_galore(2, moment_dtype=jnp.bfloat16)
    state = opt.init(params)
    g = {"w": jax.random.normal(jax.random.PRNGKey(0), (8, 6)).astype(jnp.bfloat16)}
    u, state = jax.jit(opt.update)(g, state, params)
    assert u["w"].dtype == jnp.bfloat16
    assert state.projector["w"].right.dtype == jnp.float32
    assert state.mu["w"].dtype == jnp.bfloat16

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

@pytest.mark.parametrize("proj_type", ["std", "reverse_std"])
def test_galore_user_base_optimizer_matches_numpy(proj_type):
    """A user ``base_optimizer`` (optax Adam, eps=0, where its bias correction equals the
    transformers one) on a tree of matrices of several sizes, a stack and a dense vector: the
    refresh of each leaf runs inside ``update_all`` (engine ``refresh`` callback, in
    ``_projection_order``); every leaf equals its own float64 GaLore (refreshes at t = 0, 2,
    4), the dense leaf float64 AdamW."""
    shapes = {"a": (12, 8), "b": (6, 20), "c": (3, 9, 5), "d": (5,)}
    rng = np.random.default_rng(7)
    w0 = {k: rng.standard_normal(s) for k, s in shapes.items()}
    gs = {k: _grads(s, 5, seed=10 + i) for i, (k, s) in enumerate(shapes.items())}
    opt = lo.galore(0.01, rank=3, update_proj_gap=2, scale=0.25, proj_type=proj_type,
                    weight_decay=0.1, base_optimizer=optax.scale_by_adam(eps=0.0))
    params = {k: jnp.asarray(v, jnp.float32) for k, v in w0.items()}
    out, _ = _run(opt, params, [{k: gs[k][t] for k in shapes} for t in range(5)])
    kw = dict(rank=3, gap=2, scale=0.25, proj_type=_official(proj_type), lr=0.01, wd=0.1,
              eps=0.0, layout="flax")
    for k in ("a", "b"):
        np.testing.assert_allclose(out[k], ref.galore(w0[k], gs[k], **kw), rtol=1e-5,
                                   atol=1e-5)
    for i in range(3):
        np.testing.assert_allclose(out["c"][i], ref.galore(w0["c"][i], [g[i] for g in gs["c"]],
                                                           **kw), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["d"], ref.adamw_galore_style(w0["d"], gs["d"], lr=0.01,
                                                                wd=0.1, eps=0.0),
                               rtol=1e-5, atol=1e-6)


def test_projection_order_smaller_matrices_first_within_a_block():
    """One layer's slice: one block, attention (4x4) before MLP (4x11), ties last leaf first;
    an unrolled model: its blocks (``layers_<i>``) last first, each in that order."""
    from lrx.optim import subspace as sub
    from lrx.optim.engine import Plan
    from lrx.optim.galore import _projection_order

    def plan(name, m, n):
        return Plan("proj", sub.Layout((0, 1, 2), (1, m, n), 1, m, n), name=name)

    layer = [("attn/k/kernel", 4, 4), ("attn/q/kernel", 4, 4), ("mlp/down/kernel", 11, 4),
             ("mlp/up/kernel", 4, 11)]
    plans = [plan(*x) for x in layer] + [Plan("dense", name="mlp_norm/weight")]
    assert [plans[j].name for j in _projection_order(plans)] == [
        "mlp_norm/weight", "attn/q/kernel", "attn/k/kernel", "mlp/up/kernel", "mlp/down/kernel"]
    unrolled = [plan(f"layers_{i}/{n}", m, k) for i in range(2) for n, m, k in layer]
    assert [unrolled[j].name for j in _projection_order(unrolled)] == [
        f"layers_{i}/{n}" for i in (1, 0) for n in ("attn/q/kernel", "attn/k/kernel",
                                                    "mlp/up/kernel", "mlp/down/kernel")]
