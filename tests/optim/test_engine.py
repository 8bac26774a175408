"""lrx.optim.engine inside the optax/jax ecosystem: jit, chain, inject_hyperparams,
multi_transform, schedules, vmap, orbax round trips, the refresh living inside per-leaf conds,
stagger offsets, leaf selection errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import lrx.optim as lo
from tests.optim import reference as ref
from tests.optim.helpers import _run


def _params():
    k = jax.random.PRNGKey(0)
    return {"layers": {"kernel": jax.random.normal(k, (3, 12, 8))},
            "mlp": {"kernel": jax.random.normal(jax.random.fold_in(k, 1), (8, 20))},
            "norm": jnp.ones((8,))}

def _grads(i):
    k = jax.random.PRNGKey(100 + i)
    return jax.tree_util.tree_map(
        lambda x: jax.random.normal(jax.random.fold_in(k, x.size), x.shape), _params())

def _steps(opt, params, state, start, stop, jit=True):
    update = jax.jit(opt.update) if jit else opt.update
    for i in range(start, stop):
        u, state = update(_grads(i), state, params)
        params = optax.apply_updates(params, u)
    return params, state

OPTIMIZERS = {
    "galore_svd": lambda: lo.galore(0.01, rank=3, update_proj_gap=2, weight_decay=0.01),
    "galore_randomized_project": lambda: lo.galore(0.01, rank=3, update_proj_gap=2,
                                                   projector="randomized", moments="project",
                                                   warm_start=True),
    "galore_random_reset": lambda: lo.galore(0.01, rank=3, update_proj_gap=2,
                                             projector="random", moments="reset"),
    "fira": lambda: lo.fira(0.01, rank=3, update_proj_gap=2),
    "frugal": lambda: lo.frugal(0.01, update_proj_gap=2, weight_decay=0.1),
    "frugal_blocks": lambda: lo.frugal(0.01, update_proj_gap=2, subspace="blocks"),
}

@pytest.mark.parametrize("name", ["galore_svd", "fira", "frugal"])
def test_jit_equals_no_jit(name):
    opt = OPTIMIZERS[name]()
    p0 = _params()
    a, _ = _steps(opt, p0, opt.init(p0), 0, 3, jit=True)
    b, _ = _steps(opt, p0, opt.init(p0), 0, 3, jit=False)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)

@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_orbax_round_trip_then_continue_equals_not_stopping(name, tmp_path):
    opt = OPTIMIZERS[name]()
    p0 = _params()
    p_full, s_full = _steps(opt, p0, opt.init(p0), 0, 5)
    p_mid, s_mid = _steps(opt, p0, opt.init(p0), 0, 3)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "state", {"params": p_mid, "opt": s_mid})
    ckpt.wait_until_finished()
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, {"params": p_mid,
                                                                       "opt": s_mid})
    restored = ckpt.restore(tmp_path / "state", target)
    p_res, s_res = _steps(opt, restored["params"], restored["opt"], 3, 5)
    for x, y in zip(jax.tree_util.tree_leaves((p_full, s_full)),
                    jax.tree_util.tree_leaves((p_res, s_res)), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

def test_inject_hyperparams_learning_rate_changes_the_step():
    opt = lo.inject_hyperparams(lo.galore)(learning_rate=0.1, rank=3, update_proj_gap=2,
                                           mask=lambda p: lo.path_mask(p, ".*kernel"))
    p = _params()
    state = opt.init(p)
    u1, _ = jax.jit(opt.update)(_grads(0), state, p)
    state.hyperparams["learning_rate"] = jnp.asarray(0.05)
    u2, _ = jax.jit(opt.update)(_grads(0), state, p)
    for a, b in zip(jax.tree_util.tree_leaves(u1), jax.tree_util.tree_leaves(u2), strict=True):
        np.testing.assert_allclose(np.asarray(b), 0.5 * np.asarray(a), rtol=1e-6, atol=1e-8)

def test_schedule_chain_clip_and_multi_transform():
    p = _params()
    sched = optax.linear_schedule(0.01, 0.0, 10)
    mask = lo.path_mask(p, r"(layers|mlp)/kernel")
    opt = optax.chain(optax.clip_by_global_norm(1.0), lo.galore(sched, rank=3, mask=mask))
    _, state = _steps(opt, p, opt.init(p), 0, 2)
    assert state[1][0].projector["norm"] is None
    labels = lo.path_labels(p, {"lowrank": r"(layers|mlp)/kernel"}, "adam")
    multi = optax.multi_transform({"lowrank": lo.fira(0.01, rank=3), "adam": optax.adam(0.01)},
                                  labels)
    out, _ = _steps(multi, p, multi.init(p), 0, 3)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(out))

def test_vmap_over_an_ensemble_matches_members():
    opt = lo.scale_by_galore(3, update_proj_gap=2)
    p = _params()
    ens = jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), p)
    g = jax.tree_util.tree_map(lambda x: jnp.stack([x, -x]), _grads(0))
    state = jax.vmap(opt.init)(ens)
    u, _ = jax.jit(jax.vmap(opt.update))(g, state, ens)
    u0, _ = opt.update(jax.tree_util.tree_map(lambda x: x[0], g), opt.init(p), p)
    for a, b in zip(jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(u0), strict=True):
        np.testing.assert_allclose(a[0], b, rtol=1e-5, atol=1e-6)

def _primitive_names(jaxpr, top_only):
    names = []
    for eqn in jaxpr.eqns:
        names.append(eqn.primitive.name)
        if not top_only:
            for sub in jax.core.jaxprs_in_params(eqn.params):
                names += _primitive_names(sub, False)
    return names

@pytest.mark.parametrize("projector,decomp", [("svd", "svd"), ("randomized", "eigh")])
def test_stacked_refresh_only_inside_per_leaf_conds(projector, decomp):
    """The decompositions of a stacked (L, m, n) leaf run inside a cond on the scalar step (no
    vmap of a cond that would become a select): one cond per projected leaf (here the stacked
    layers and the mlp kernel), none around the whole tree, so each leaf's refresh needs only its
    own gradient (the compiled peak of a train step then matches a per-leaf optimizer)."""
    opt = lo.scale_by_galore(3, projector=projector)
    p = _params()
    jaxpr = jax.make_jaxpr(opt.update)(_grads(0), opt.init(p), p).jaxpr
    top = _primitive_names(jaxpr, top_only=True)
    assert decomp not in top and top.count("cond") == 2
    assert decomp in _primitive_names(jaxpr, top_only=False)

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

def test_mask_selecting_a_non_matrix_is_an_error():
    opt = lo.scale_by_galore(2, mask={"w": True, "b": True})
    with pytest.raises(ValueError, match="'b'.*not a matrix"):
        opt.init({"w": jnp.zeros((4, 4)), "b": jnp.zeros((4,))})


@pytest.mark.parametrize("name", ["galore", "fira", "frugal"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_stacked_leaf_per_matrix_update_equals_separate_matrices(name, dtype):
    # A (3, m, n) stack is updated one matrix at a time (engine.update_per_matrix); the result
    # must be that of the same three matrices given as three separate leaves (each updated by
    # one direct call), refreshes included (gap 2, steps 0..3), bf16 params/moments included.
    kw = dict(update_proj_gap=2, moment_dtype=dtype)
    opt = {"galore": lambda: lo.galore(0.1, rank=3, moments="reset", **kw),
           "fira": lambda: lo.fira(0.1, rank=3, **kw),
           "frugal": lambda: lo.frugal(0.1, density=0.5, **kw)}[name]()
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((3, 10, 6)), dtype)
    stacked = {"w": w}
    separate = {f"w{i}": w[i] for i in range(3)}
    s_st, s_se = opt.init(stacked), opt.init(separate)
    step = jax.jit(lambda g, s, p: opt.update(g, s, p))
    for _ in range(4):
        g = jnp.asarray(rng.standard_normal((3, 10, 6)), dtype)
        u_st, s_st = step({"w": g}, s_st, stacked)
        u_se, s_se = step({f"w{i}": g[i] for i in range(3)}, s_se, separate)
        assert u_st["w"].dtype == dtype
        for i in range(3):
            np.testing.assert_allclose(np.asarray(u_st["w"][i], np.float32),
                                       np.asarray(u_se[f"w{i}"], np.float32),
                                       rtol=1e-5, atol=1e-6)
        stacked = optax.apply_updates(stacked, u_st)
        separate = optax.apply_updates(separate, u_se)


def test_map_matrices_writes_each_slice_against_numpy():
    # engine.map_matrices (the per-matrix loop of the refresh and the update): a bf16 input
    # stack, a fresh bf16 output (uint16 view), an in-place float32 output (no view) read and
    # rewritten, slices with and without the batch axis; checked against a float64 NumPy loop.
    from lrx.optim import engine

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((3, 4, 5)), jnp.bfloat16)
    acc = jnp.asarray(rng.standard_normal((3, 4)), jnp.float32)
    x64, acc64 = np.asarray(x, np.float64), np.asarray(acc, np.float64)
    gram64 = np.einsum("bij,bkj->bik", x64, x64)
    want_acc = acc64 + x64.sum(axis=-1)

    def fn(x_i, out_i):
        g, a = out_i
        xf = x_i.astype(jnp.float32)
        return xf @ xf.T, a + xf.sum(axis=-1)

    run = jax.jit(lambda x, acc: engine.map_matrices(
        fn, x, (jax.ShapeDtypeStruct((3, 4, 4), jnp.bfloat16), acc), 3, keepdims=False,
        views=(True, False)))
    gram, new_acc = run(x, acc)
    assert gram.dtype == jnp.bfloat16 and new_acc.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(gram, np.float64), gram64, rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(new_acc, np.float64), want_acc, rtol=1e-5, atol=1e-5)

    # keepdims: fn sees (1, ...) slices
    def fn1(x_i, out_i):
        assert x_i.shape == (1, 4, 5) and out_i.shape == (1, 4)
        return out_i - x_i.astype(jnp.float32)[..., 0]

    got = jax.jit(lambda x, acc: engine.map_matrices(fn1, x, acc, 3))(x, acc)
    np.testing.assert_allclose(np.asarray(got, np.float64), acc64 - x64[..., 0], rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("name", ["galore", "fira", "frugal", "apollo"])
def test_moments_default_to_the_parameter_dtype(name):
    # moment_dtype=None (the default): moments stored in each parameter's own dtype, as optax's
    # Adam does (bf16 params -> bf16 mu/nu, float32 params -> float32); an explicit dtype wins.
    make = {"galore": lambda **k: lo.galore(0.01, rank=2, **k),
            "fira": lambda **k: lo.fira(0.01, rank=2, **k),
            "frugal": lambda **k: lo.frugal(0.01, density=0.5, **k),
            "apollo": lambda **k: lo.apollo(0.01, rank=2, **k)}[name]
    for dtype in (jnp.bfloat16, jnp.float32):
        params = {"w": jnp.ones((8, 12), dtype), "b": jnp.ones((6,), dtype)}
        for want, kw in ((dtype, {}), (jnp.float32, {"moment_dtype": jnp.float32})):
            state = make(**kw).init(params)
            inner = next(s for s in jax.tree_util.tree_leaves(
                state, is_leaf=lambda s: hasattr(s, "mu") and hasattr(s, "nu"))
                if hasattr(s, "mu"))
            moments = [x for x in jax.tree_util.tree_leaves((inner.mu, inner.nu))]
            assert len(moments) == 4, name                    # w and b, mu and nu
            assert all(x.dtype == want for x in moments), (name, dtype, kw,
                                                           [x.dtype for x in moments])
