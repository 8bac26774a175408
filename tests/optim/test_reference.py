"""lrx.optim against the NumPy float64 re-derivations in tests/optim/reference.py, several steps
with refreshes (update_proj_gap=2 over 5 steps: refreshes at t = 0, 2, 4)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrx.optim as lo
from tests.optim import reference as ref

jax.config.update("jax_enable_x64", False)


def _grads(shape, steps, seed=0, growth=1.0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(shape) * growth ** t for t in range(steps)]


# Shapes of the stored array: tall, wide, square (the tie case) and 1-row / 1-column.
SHAPES = [(12, 8), (8, 12), (8, 8), (1, 6), (6, 1)]
LAYOUTS = ["flax", "torch"]
# lrx's 'left'/'right' name sides of the (reduction=in, output=out) view; the official names refer
# to the PyTorch (out, in) weight, whose left side is the output dimension.
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


@pytest.mark.parametrize("state_free,reset,shape,layout,proj_type", [
    ("signsgd", True, (12, 8), "flax", "std"), ("sgd", False, (8, 12), "flax", "std"),
    ("none", True, (12, 8), "flax", "std"), ("signsgd", True, (8, 8), "flax", "std"),
    ("signsgd", True, (8, 8), "torch", "std"), ("sgd", True, (8, 8), "flax", "reverse_std"),
    ("sgd", False, (8, 8), "torch", "reverse_std"), ("signsgd", True, (12, 8), "torch", "std"),
    ("sgd", True, (8, 4), "flax", "reverse_std")])
def test_frugal_svd_matches_numpy(state_free, reset, shape, layout, proj_type):
    rng = np.random.default_rng(10)
    w0 = rng.standard_normal(shape)
    b0 = rng.standard_normal(4)
    gs = _grads(shape, 5, seed=11)
    gb = _grads((4,), 5, seed=12)
    opt = lo.frugal(0.01, density=0.25, update_proj_gap=2, state_free=state_free,
                    state_free_lr_scale=0.5, reset_on_refresh=reset, eps=1e-8, weight_decay=0.1,
                    proj_type=proj_type, dimension_numbers={"w": _dims(layout), "b": None})
    out, _ = _run(opt, {"w": jnp.asarray(w0, jnp.float32), "b": jnp.asarray(b0, jnp.float32)},
                  [{"w": g, "b": h} for g, h in zip(gs, gb, strict=True)])
    want = ref.frugal_svd(w0, gs, density=0.25, gap=2, lr=0.01, state_free=state_free,
                          free_scale=0.5, reset=reset, wd=0.1, proj_type=proj_type, layout=layout)
    np.testing.assert_allclose(out["w"], want, rtol=1e-5, atol=1e-5)
    # unprojected leaf: plain torch-style AdamW with decay first
    bw = np.array(b0)
    mu = nu = 0.0
    for k, g in enumerate(gb, start=1):
        mu = 0.9 * mu + 0.1 * g
        nu = 0.999 * nu + 0.001 * g * g
        bw = bw * (1 - 0.01 * 0.1) - 0.01 * (mu / (1 - 0.9 ** k)) / (
            np.sqrt(nu) / np.sqrt(1 - 0.999 ** k) + 1e-8)
    np.testing.assert_allclose(out["b"], bw, rtol=1e-5, atol=1e-6)


def test_frugal_blocks_descending_matches_numpy():
    rng = np.random.default_rng(13)
    a0 = rng.standard_normal((6, 5))
    s0 = rng.standard_normal((4, 6, 5))
    seq = [(rng.standard_normal((6, 5)), rng.standard_normal((4, 6, 5))) for _ in range(7)]
    opt = lo.frugal(0.01, density=0.4, update_proj_gap=2, subspace="blocks",
                    block_order="descending", eps=1e-8)
    out, _ = _run(opt, {"a": jnp.asarray(a0, jnp.float32), "s": jnp.asarray(s0, jnp.float32)},
                  [{"a": ga, "s": gs} for ga, gs in seq])
    # matrices in tree order: a, s[0], s[1], s[2], s[3]
    want = ref.frugal_blocks_descending(
        [a0, *s0], [[ga, *gs] for ga, gs in seq], density=0.4, gap=2, lr=0.01)
    np.testing.assert_allclose(out["a"], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["s"], np.stack(want[1:]), rtol=1e-5, atol=1e-5)


def test_frugal_columns_split_update():
    """columns: int(ρ·n) distinct columns get Adam, the other columns signSGD."""
    rng = np.random.default_rng(14)
    g = rng.standard_normal((6, 8))
    opt = lo.scale_by_frugal(0.25, subspace="columns", eps=1e-8)
    state = opt.init({"w": jnp.zeros((6, 8))})
    u, state = opt.update({"w": jnp.asarray(g, jnp.float32)}, state)
    q = np.asarray(state.projector["w"].right[0])                  # (8, 2) one-hot
    cols = np.argmax(q, axis=0)
    assert len(set(cols.tolist())) == 2 and np.allclose(q.sum(0), 1)
    want = np.sign(g)
    # first Adam step: (m/bc1)/(sqrt(v)/sqrt(bc2)+eps) = g/(|g|+eps) ~ sign(g)
    want[:, cols] = g[:, cols] / (np.abs(g[:, cols]) + 1e-8)
    np.testing.assert_allclose(u["w"], want, rtol=1e-5, atol=1e-6)


def test_galore_stagger_each_matrix_at_its_own_offset():
    """stagger=True: matrix j of J refreshes at t = 0 and when t % T == (j·T)//J (a stack's layers
    counted one by one); each matrix equals the reference with that schedule."""
    rng = np.random.default_rng(15)
    a0, s0 = rng.standard_normal((8, 6)), rng.standard_normal((2, 8, 6))
    seq = [(rng.standard_normal((8, 6)), rng.standard_normal((2, 8, 6))) for _ in range(7)]
    opt = lo.galore(0.01, rank=2, update_proj_gap=3, stagger=True, moments="reset")
    out, _ = _run(opt, {"a": jnp.asarray(a0, jnp.float32), "s": jnp.asarray(s0, jnp.float32)},
                  [{"a": ga, "s": gs} for ga, gs in seq])
    want_a = ref.galore(a0, [ga for ga, _ in seq], rank=2, gap=3, scale=0.25, proj_type="std",
                        lr=0.01, moments="reset", offset=0, layout="flax")
    np.testing.assert_allclose(out["a"], want_a, rtol=1e-5, atol=1e-5)
    for b in range(2):
        want = ref.galore(s0[b], [gs[b] for _, gs in seq], rank=2, gap=3, scale=0.25,
                          proj_type="std", lr=0.01, moments="reset", offset=b + 1, layout="flax")
        np.testing.assert_allclose(out["s"][b], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reset", [True, False])
def test_frugal_blocks_follow_model_order(reset):
    """Blocks walk layers by index (layers_2 before layers_10, a scanned stack's layer axis
    expanded), modules in the model's definition order (MODULE_ORDER: attn before mlp); a
    re-activated block restarts its bias correction even without reset_on_refresh."""
    rng = np.random.default_rng(16)
    shape = (5, 4)
    names = ["layers_10", "layers_2", "layers_1"]
    w0 = {n: {"mlp": rng.standard_normal(shape), "attn": rng.standard_normal(shape)}
          for n in names}
    seq = [{n: {"mlp": rng.standard_normal(shape), "attn": rng.standard_normal(shape)}
            for n in names} for _ in range(9)]
    opt = lo.frugal(0.01, density=0.5, update_proj_gap=2, subspace="blocks",
                    block_order="descending", eps=1e-8, reset_on_refresh=reset)
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), w0)
    out, _ = _run(opt, params, seq)
    order = [(n, m) for n in ["layers_1", "layers_2", "layers_10"] for m in ["attn", "mlp"]]
    want = ref.frugal_blocks_descending([w0[n][m] for n, m in order],
                                        [[g[n][m] for n, m in order] for g in seq],
                                        density=0.5, gap=2, lr=0.01, reset=reset)
    for (n, m), w in zip(order, want, strict=True):
        np.testing.assert_allclose(out[n][m], w, rtol=1e-5, atol=1e-5)


def test_frugal_blocks_scanned_stack_expands_layers():
    """A scanned (L, m, n) stack: its layer axis is walked layer by layer, after leaves that
    belong to no layer (here an embedding-like leaf defined after the stack)."""
    rng = np.random.default_rng(17)
    st0, e0 = rng.standard_normal((3, 5, 4)), rng.standard_normal((5, 4))
    seq = [{"layers": rng.standard_normal((3, 5, 4)), "embed": rng.standard_normal((5, 4))}
           for _ in range(7)]
    opt = lo.frugal(0.01, density=0.5, update_proj_gap=2, subspace="blocks",
                    block_order="descending", eps=1e-8)
    params = {"layers": jnp.asarray(st0, jnp.float32), "embed": jnp.asarray(e0, jnp.float32)}
    out, _ = _run(opt, params, seq)
    want = ref.frugal_blocks_descending([e0, *st0], [[g["embed"], *g["layers"]] for g in seq],
                                        density=0.5, gap=2, lr=0.01)
    np.testing.assert_allclose(out["embed"], want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out["layers"], np.stack(want[1:]), rtol=1e-5, atol=1e-5)
