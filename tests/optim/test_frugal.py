"""lrx.optim.frugal against the NumPy float64 re-derivations (tests/optim/reference.py): svd
subspaces in both layouts (square included), columns, blocks in model order (scanned stacks
expanded, bias correction restarted on re-activation); errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrx.optim as lo
from tests.optim import reference as ref
from tests.optim.helpers import _dims, _grads, _run

jax.config.update("jax_enable_x64", False)

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

def test_frugal_errors():
    with pytest.raises(ValueError, match="subspace.*'blocks'"):
        lo.frugal(0.1, subspace="tensor")
    with pytest.raises(ValueError, match="state_free"):
        lo.frugal(0.1, state_free="adam")
    with pytest.raises(ValueError, match="density"):
        lo.frugal(0.1, density=1.5)
