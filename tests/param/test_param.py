"""Tests of lrx.param against NumPy float64 re-derivations of each paper's formula."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrx.param as P

M, N = 12, 20


def f64(x):
    return np.asarray(x, dtype=np.float64)


@pytest.fixture(scope="module")
def w():
    return jax.random.normal(jax.random.key(0), (M, N), jnp.float32) * 0.1


def perturb(node, key=1):
    """Random values in every trainable field (so that formulas are tested away from init)."""
    fields = {name: getattr(node, name) for name, k in node.kinds.items() if k == "trainable"}
    keys = jax.random.split(jax.random.key(key), len(fields))
    new = {name: jax.random.normal(k, v.shape, v.dtype) * 0.3
           for k, (name, v) in zip(keys, fields.items(), strict=True)}
    if "magnitude" in new:
        new["magnitude"] = jnp.abs(new["magnitude"]) + 0.5
    return node.replace(**new)


def numpy_reference(node):
    """The dense weight from the paper's formula, in float64, written independently."""
    if isinstance(node, P.LowRank):
        return f64(node.u) @ f64(node.v)
    if isinstance(node, P.LoRA):
        return f64(node.base) + node.scale * f64(node.a) @ f64(node.b)
    if isinstance(node, P.DoRA):
        v = f64(node.base) + node.scale * f64(node.a) @ f64(node.b)
        return f64(node.magnitude)[None, :] * v / np.linalg.norm(v, axis=0, keepdims=True)
    if isinstance(node, P.SparsePlusLowRank):
        s = np.zeros(node.shape[0] * node.shape[1])
        s[np.asarray(node.indices)] = f64(node.values)
        return node.scale * f64(node.a) @ f64(node.b) + s.reshape(node.shape)
    if isinstance(node, P.NOLA):
        a0, ba, bb = (f64(t) for t in node.bases())
        a = a0 + sum(c * ba[i] for i, c in enumerate(f64(node.alpha)))
        b = sum(c * bb[j] for j, c in enumerate(f64(node.beta)))
        return f64(node.base) + node.scale * a @ b
    if isinstance(node, P.VeRA):
        a_full, b_full = (f64(t) for t in node.shared_bases())
        m, n = node.shape
        # torch layout: Lambda_b B Lambda_d A, (out, in); ours is its transpose.
        delta_torch = (np.diag(f64(node.lambda_b)) @ b_full[:n] @ np.diag(f64(node.lambda_d))
                       @ a_full[:, :m])
        return f64(node.base) + delta_torch.T
    if isinstance(node, P.RandLoRA):
        a_full, b_full = (f64(t) for t in node.shared_bases())
        m, n = node.shape
        small, big = min(m, n), max(m, n)
        lam, gam = f64(node.lam), f64(node.gamma)
        num = lam.shape[1]
        a = a_full[:, :small]
        # torch layout with the small side as "input": sum_n B_n Lambda_n A Gamma_n: (big, small)
        delta = sum(b_full[k, :big] @ np.diag(lam[:, k]) @ a @ np.diag(gam[k]) for k in range(num))
        delta_kernel = delta.T if m <= n else delta      # ours: (m, n)
        return f64(node.base) + node.scale * delta_kernel
    if isinstance(node, P.SoRA):
        return f64(node.base) + node.scale * (f64(node.a) * f64(node.gate)) @ f64(node.b)
    if isinstance(node, P.DyLoRA):
        r = int(node.active_rank)
        return f64(node.base) + node.alpha / r * f64(node.a)[:, :r] @ f64(node.b)[:r]
    raise TypeError(type(node))


FACTORIES = {
    "lowrank": lambda: P.lowrank(4),
    "lowrank_kaiming": lambda: P.lowrank(4, init="kaiming"),
    "lora": lambda: P.lora(4, alpha=8),
    "rslora": lambda: P.lora(4, alpha=8, rslora=True),
    "pissa": lambda: P.lora(4, alpha=8, init="pissa"),
    "olora": lambda: P.lora(4, alpha=8, init="olora"),
    "dora": lambda: P.dora(4, alpha=6),
    "sltrain": lambda: P.sltrain(4, alpha=2, density=0.1),
    "nola": lambda: P.nola(3, num_basis_a=7, num_basis_b=5, alpha=6),
    "randlora": lambda: P.randlora(5),
    "vera": lambda: P.vera(6),
    "sora": lambda: P.SoRAFactory(4, alpha=8),
    "dylora": lambda: P.DyLoRAFactory(4, alpha=8),
}


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("transpose", [False, True])
def test_materialize_and_dot_match_numpy(name, transpose, w):
    w = w.T if transpose else w
    node = perturb(FACTORIES[name]()(jax.random.key(3), w))
    ref = numpy_reference(node)
    np.testing.assert_allclose(f64(node.materialize()), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f64(P.materialize({"k": node})["k"]), ref, rtol=1e-5, atol=1e-5)
    # RandLoRA takes its factored path for few tokens and materialises for many
    x = jax.random.normal(jax.random.key(4), (2, 3, w.shape[0]))
    np.testing.assert_allclose(f64(P.dot(x, node)), f64(x) @ ref, rtol=1e-4, atol=1e-4)
    x = jax.random.normal(jax.random.key(4), (64, w.shape[0]))
    np.testing.assert_allclose(f64(jax.jit(P.dot)(x, node)), f64(x) @ ref, rtol=1e-4, atol=1e-4)


def test_scales():
    w = jnp.ones((16, 16))
    assert P.lora(4, alpha=8)(jax.random.key(0), w).scale == 2.0
    assert P.lora(4, alpha=8, rslora=True)(jax.random.key(0), w).scale == 4.0
    assert P.lora(4)(jax.random.key(0), w).scale == 1.0
    assert P.sltrain(8, alpha=32)(jax.random.key(0), w).scale == 4.0
    assert P.randlora(4)(jax.random.key(0), w).scale == 20.0


@pytest.mark.parametrize("name", ["lora", "rslora", "dora", "nola", "randlora", "vera", "pissa",
                                  "olora"])
def test_adapters_start_at_base(name, w):
    node = FACTORIES[name]()(jax.random.key(3), w)
    np.testing.assert_allclose(f64(node.materialize()), f64(w), atol=1e-5)


def test_lora_init_statistics():
    w = jnp.zeros((400, 300))
    node = P.lora(8)(jax.random.key(0), w)
    bound = 1 / math.sqrt(400)
    a = np.asarray(node.a)
    assert np.all(np.abs(a) <= bound) and np.abs(a).max() > 0.9 * bound
    assert np.all(np.asarray(node.b) == 0)


def test_pissa_moves_top_r_svd_into_adapter(w):
    node = P.lora(3, alpha=6, init="pissa")(jax.random.key(0), w)
    u, s, vt = np.linalg.svd(f64(w), full_matrices=False)
    top = (u[:, :3] * s[:3]) @ vt[:3]
    np.testing.assert_allclose(node.scale * f64(node.a) @ f64(node.b), top, atol=1e-5)
    np.testing.assert_allclose(f64(node.base), f64(w) - top, atol=1e-5)


def test_lowrank_spectral_is_best_rank_r(w):
    node = P.lowrank(4)(jax.random.key(0), w)
    u, s, vt = np.linalg.svd(f64(w), full_matrices=False)
    np.testing.assert_allclose(f64(node.materialize()), (u[:, :4] * s[:4]) @ vt[:4], atol=1e-5)


def test_dora_magnitude_init_and_gradient(w):
    node = P.dora(4, alpha=4)(jax.random.key(0), w)
    np.testing.assert_allclose(f64(node.magnitude), np.linalg.norm(f64(w), axis=0), rtol=1e-6)
    node = perturb(node)
    x = jax.random.normal(jax.random.key(5), (7, M))
    g_out = jax.random.normal(jax.random.key(6), (7, N))
    t, fz = P.partition(node)
    grads = jax.grad(lambda t: jnp.sum(P.dot(x, P.combine(t, fz)) * g_out))(t)
    # NumPy: loss = <x W', g>, W' = m * V / c with c = ||V||_c treated as a constant.
    base, a, b, mag, s = (f64(node.base), f64(node.a), f64(node.b), f64(node.magnitude),
                          node.scale)
    v = base + s * a @ b
    c = np.linalg.norm(v, axis=0)
    gw = f64(x).T @ f64(g_out)
    gv = gw * (mag / c)[None, :]
    np.testing.assert_allclose(f64(grads.magnitude), np.sum(gw * v, axis=0) / c, rtol=1e-4)
    np.testing.assert_allclose(f64(grads.a), s * gv @ b.T, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f64(grads.b), s * a.T @ gv, rtol=1e-4, atol=1e-6)
    assert grads.base is None


@pytest.mark.parametrize("name", list(FACTORIES))
def test_gradients_reach_trainable_fields_only(name, w):
    node = perturb(FACTORIES[name]()(jax.random.key(3), w))
    params = {"dense": jnp.ones((3,)), "layer": {"kernel": node}}
    t, fz = P.partition(params)
    x = jax.random.normal(jax.random.key(4), (5, M))

    def loss(t):
        p = P.combine(t, fz)
        return jnp.sum(P.dot(x, p["layer"]["kernel"]) ** 2) + jnp.sum(p["dense"] ** 2)

    g = jax.jit(jax.grad(loss))(t)
    gn = g["layer"]["kernel"]
    for field, kind in node.kinds.items():
        if kind == "trainable":
            assert getattr(gn, field).shape == getattr(node, field).shape
            assert np.all(np.isfinite(np.asarray(getattr(gn, field))))
        elif kind == "frozen":
            assert getattr(gn, field) is None
    assert fz["dense"] is None
    # gradient of the trainable part agrees with the dense gradient projected by the chain rule
    leaves = jax.tree.leaves(g)
    assert sum(x.size for x in leaves) == P.count(params)["trainable"]


def test_partition_combine_round_trip(w):
    params = {"a": {"kernel": FACTORIES["sltrain"]()(jax.random.key(0), w)},
              "b": {"kernel": FACTORIES["lora"]()(jax.random.key(1), w)},
              "c": {"scale": jnp.ones((4,))}}
    t, fz = P.partition(params)
    assert t["b"]["kernel"].base is None and fz["b"]["kernel"].a is None
    # the SLTrain support is static (regenerated from its seed), present in both parts
    np.testing.assert_array_equal(fz["a"]["kernel"].indices, params["a"]["kernel"].indices)
    assert jax.tree.leaves(fz["a"]["kernel"]) == [] and t["a"]["kernel"].values is not None
    back = P.combine(t, fz)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        assert np.shape(x) == np.shape(y) and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert jax.tree.structure(back) == jax.tree.structure(params)
    # optimizer state exists only for what trains
    import optax

    state = optax.adam(1e-3).init(t)
    n_state = sum(x.size for x in jax.tree.leaves(state[0].mu))
    assert n_state == P.count(params)["trainable"]


def test_counts_closed_forms():
    m, n = 48, 80
    w = jnp.zeros((m, n))
    k = jax.random.key(0)
    r = 8
    c = P.count({"x": P.lora(r)(k, w)})
    assert c["trainable"] == r * (m + n) and c["frozen"] == m * n
    assert P.count({"x": P.lowrank(r)(k, w)}) == dict(
        trainable=r * (m + n), frozen=0, trainable_bytes=4 * r * (m + n), frozen_bytes=0,
        generated=0)
    assert P.count({"x": P.dora(r)(k, w)})["trainable"] == r * (m + n) + n
    assert P.count({"x": P.vera(r)(k, w)})["trainable"] == r + n
    for rank in (5, 8, 48, 64):   # N = ceil(min/r): 10, 6, 1, 1
        num = math.ceil(min(m, n) / rank)
        assert P.count({"x": P.randlora(rank)(k, w)})["trainable"] == num * (rank + min(m, n))
    for delta in (0.03, 0.1, 0.5):
        cs = P.count({"x": P.sltrain(r, density=delta)(k, w)})
        assert cs["trainable"] == r * (m + n) + int(delta * m * n)
        assert cs["frozen"] == 0
        assert cs["generated"] == int(delta * m * n)       # the support, regenerated from a seed
    assert P.count({"x": P.nola(r, 30, 20)(k, w)})["trainable"] == 50
    # peft's published count (reference note 1.1): LoRA r=32 on q (3072x3072) and v (3072->1024)
    # of 28 layers = 9,175,040; the closed form, evaluated without building the matrices:
    assert 28 * (32 * (3072 + 3072) + 32 * (3072 + 1024)) == 9_175_040


def test_randlora_update_exceeds_rank_r():
    m, n, r = 24, 40, 4
    node = P.randlora(r)(jax.random.key(0), jnp.zeros((m, n)))
    node = perturb(node)
    delta = f64(node.materialize())
    rank = np.linalg.matrix_rank(delta, tol=1e-6 * np.linalg.norm(delta, 2))
    assert rank > r
    assert rank == min(m, n)          # N * r >= min(m, n): full rank


def test_sltrain_support_density():
    m, n = 64, 96
    node = P.sltrain(8, density=0.03)(jax.random.key(0), jnp.zeros((m, n)))
    idx = np.asarray(node.indices)
    nnz = int(0.03 * m * n)
    assert idx.shape == (nnz,) and idx.dtype == np.int32
    assert np.all(np.diff(idx) > 0) and idx.min() >= 0 and idx.max() < m * n
    w0 = np.asarray(node.materialize())
    assert np.count_nonzero(w0) == nnz        # b = 0: the initial weight is exactly S
    bound = 1 / math.sqrt(m)
    assert np.all(np.abs(np.asarray(node.values)) <= bound)
    # the support is spread over the rows and columns (uniformly random, not a block)
    rows, cols = np.unravel_index(idx, (m, n))
    assert len(np.unique(rows)) > m // 2 and len(np.unique(cols)) > n // 2


def test_vera_and_randlora_bases_shared_and_sliced():
    params = {"q": jnp.zeros((16, 16)), "up": jnp.zeros((16, 40)), "down": jnp.zeros((40, 16))}
    for method in (P.vera(4), P.randlora(4)):
        out = P.apply(params, [(".*", method)], jax.random.key(0))
        shapes = {n.max_shape for n in out.values()}
        assert len(shapes) == 1
    out = P.apply(params, [(".*", P.vera(4))], jax.random.key(0))
    assert out["q"].max_shape == (40, 40)
    aq, bq = out["q"].factors()
    au, bu = out["up"].factors()
    np.testing.assert_array_equal(np.asarray(aq), np.asarray(au))     # same A[:, :16]
    np.testing.assert_array_equal(np.asarray(bq), np.asarray(bu)[:, :16])


SEED_SCRIPT = """
import json, sys, jax, jax.numpy as jnp
import lrx.param as P
w = jnp.arange(12 * 20, dtype=jnp.float32).reshape(12, 20) / 100
out = {}
for name, f in [("nola", P.nola(3, 7, 5)), ("randlora", P.randlora(5)), ("vera", P.vera(6))]:
    node = f(jax.random.key(11), w)
    fields = {k: jnp.ones_like(getattr(node, k)) * 0.5 for k, v in node.kinds.items()
              if v == "trainable"}
    out[name] = jax.device_get(node.replace(**fields).materialize()).tolist()
print(json.dumps(out))
"""


def _materialize_seeded():
    w = jnp.arange(12 * 20, dtype=jnp.float32).reshape(12, 20) / 100
    here = {}
    for name, f in [("nola", P.nola(3, 7, 5)), ("randlora", P.randlora(5)), ("vera", P.vera(6))]:
        node = f(jax.random.key(11), w)
        again = f(jax.random.key(11), w)
        fields = {k: jnp.ones_like(getattr(node, k)) * 0.5 for k, v in node.kinds.items()
                  if v == "trainable"}
        a = np.asarray(node.replace(**fields).materialize())
        b = np.asarray(jax.jit(lambda n: n.materialize())(again.replace(**fields)))
        np.testing.assert_allclose(a, b, rtol=1e-6)
        assert not np.allclose(a, np.asarray(w))
        here[name] = a
    return here


def test_random_bases_regenerate_across_calls():
    _materialize_seeded()


@pytest.mark.slow
def test_random_bases_regenerate_across_processes():
    here = _materialize_seeded()
    proc = subprocess.run([sys.executable, "-c", SEED_SCRIPT], capture_output=True, text=True,
                          check=True, env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, a in here.items():
        np.testing.assert_allclose(np.asarray(there[name]), a, rtol=1e-6)


class DenseLike(nn.Module):
    """A linen Dense without bias that reads its kernel with lrx.param.read_kernel and calls
    lrx.param.dot."""

    features: int

    @nn.compact
    def __call__(self, x):
        kernel = P.read_kernel(self, "kernel", nn.initializers.normal(0.02),
                               (x.shape[-1], self.features), jnp.float32)
        return P.dot(x, kernel)


class TwoLayer(nn.Module):
    @nn.compact
    def __call__(self, x):
        return DenseLike(N, name="out")(nn.relu(DenseLike(M, name="hidden")(x)))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_nodes_pass_through_flax_linen_apply(name):
    model = TwoLayer()
    x = jax.random.normal(jax.random.key(0), (2, 3, M))
    params = model.init(jax.random.key(1), x)["params"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fparams = P.apply(params, [(r"(hidden|out)/kernel", FACTORIES[name]())],
                          jax.random.key(2))
    fparams = jax.tree.map(lambda n: perturb(n) if P.is_node(n) else n, fparams,
                           is_leaf=P.is_node)
    y = jax.jit(model.apply)({"params": fparams}, x)
    y_dense = model.apply({"params": P.materialize(fparams)}, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_dense), rtol=1e-4, atol=1e-6)
    t, fz = P.partition(fparams)
    g = jax.jit(jax.grad(lambda t: jnp.sum(model.apply({"params": P.combine(t, fz)}, x) ** 2)))(t)
    assert jax.tree.structure(g) == jax.tree.structure(t)
    # without a shape witness, the gradient w.r.t. the whole tree of nodes works too and agrees
    # with the partitioned one on the trainable fields
    g_full = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(fparams)
    assert jax.tree.structure(g_full) == jax.tree.structure(fparams)
    g_train, _ = P.partition(g_full)
    for a, b in zip(jax.tree.leaves(g_train), jax.tree.leaves(g), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


def test_apply_rules_and_warnings():
    params = {"layers_0": {"attn": {"q": {"kernel": jnp.ones((8, 8))}},
                           "norm": {"weight": jnp.ones((8,))}},
              "embed": jnp.ones((10, 8))}
    with pytest.warns(UserWarning, match=r"matches no parameter.*layers_0/attn/q/kernel"):
        out = P.apply(params, [(r".*/q/kernel", P.lora(2)), (r"nothing", P.lora(2))],
                      jax.random.key(0))
    assert isinstance(out["layers_0"]["attn"]["q"]["kernel"], P.LoRA)
    assert not P.is_node(out["embed"])
    # fullmatch semantics: a substring does not match
    with pytest.warns(UserWarning):
        P.apply(params, [("attn", P.lora(2))], jax.random.key(0))
    # first matching rule wins; already-factored nodes are left alone
    out2 = P.apply(out, [(r".*kernel", P.lowrank(2)), (r"embed", P.lowrank(2))],
                   jax.random.key(0))
    assert isinstance(out2["layers_0"]["attn"]["q"]["kernel"], P.LoRA)
    assert isinstance(out2["embed"], P.LowRank)
    # per-path keys: two identical matrices get different adapters
    two = P.apply({"p": jnp.ones((8, 8)), "q": jnp.ones((8, 8))}, [(".*", P.lora(2))],
                  jax.random.key(0))
    assert not np.allclose(np.asarray(two["p"].a), np.asarray(two["q"].a))


def test_bad_input_messages():
    w = jnp.ones((8, 6))
    k = jax.random.key(0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="rank must be a positive integer"):
            P.lora(bad)
    for f in (P.lora, P.lowrank, P.dora, P.sltrain, P.nola):
        with pytest.raises(ValueError, match=r"rank=7 exceeds min\(in, out\)=6"):
            f(7)(k, w)
    P.vera(7)(k, w)              # VeRA and RandLoRA allow rank > min(m, n)
    P.randlora(7)(k, w)
    for f in (P.lora(2), P.vera(2), P.sltrain(2), P.randlora(2), P.nola(2)):
        with pytest.raises(ValueError, match=r"2-D \(in, out\) weight matrix, got shape \(8,\)"):
            f(k, jnp.ones((8,)))
    with pytest.raises(ValueError, match="2-D"):
        P.apply({"x": jnp.ones((2, 8, 6))}, [("x", P.lora(2))], k)
    with pytest.raises(ValueError, match="density must be in"):
        P.sltrain(2, density=1.5)
    with pytest.raises(ValueError, match="gives no nonzero"):
        P.sltrain(2, density=0.001)(k, w)
    with pytest.raises(ValueError, match="init='svd' is not one of 'default', 'pissa'"):
        P.lora(2, init="svd")
    with pytest.raises(ValueError, match="not a valid regex"):
        P.apply({"x": w}, [("(", P.lora(2))], k)
    with pytest.raises(ValueError, match="pair"):
        P.apply({"x": w}, [P.lora(2)], k)


def test_factory_by_name():
    f = P.factory("lora", rank=4, alpha=8.0)
    assert f(jax.random.key(0), jnp.ones((8, 8))).scale == 2.0
    with pytest.raises(ValueError, match="valid methods: lowrank, lora, dora, sltrain"):
        P.factory("loraa", rank=4)
    with pytest.raises(ValueError, match=r"unknown argument\(s\) density; valid: rank, alpha"):
        P.factory("lora", rank=4, density=0.1)
    with pytest.raises(ValueError, match=r"missing argument\(s\) rank"):
        P.factory("sltrain")
    assert set(P.METHODS) == set(P.nodes.FACTORIES) | set(P.methods.FACTORIES_V2)


def test_merge_and_reinit(w):
    for init in ("default", "pissa"):
        params = {"k": perturb(P.lora(3, alpha=6, init=init)(jax.random.key(0), w)),
                  "d": jnp.ones(3)}
        before = f64(P.materialize(params)["k"])
        after = jax.jit(P.merge_and_reinit)(params, jax.random.key(5))
        np.testing.assert_allclose(f64(P.materialize(after)["k"]), before, atol=1e-5)
        k = after["k"]
        if init == "default":
            np.testing.assert_allclose(f64(k.base), before, atol=1e-6)
            assert np.all(np.asarray(k.b) == 0)
            assert np.all(np.abs(np.asarray(k.a)) <= 1 / math.sqrt(M))
        else:
            u, s, vt = np.linalg.svd(before, full_matrices=False)
            np.testing.assert_allclose(k.scale * f64(k.a) @ f64(k.b),
                                       (u[:, :3] * s[:3]) @ vt[:3], atol=1e-5)
        assert not np.allclose(np.asarray(k.a), np.asarray(params["k"].a))


def test_dot_dense_arrays_unchanged():
    x = np.ones((2, 3), np.float32)
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_allclose(np.asarray(P.dot(x, w)), x @ w)          # NumPy weight
    np.testing.assert_allclose(np.asarray(P.dot(jnp.asarray(x), jnp.asarray(w))), x @ w)
    assert P.dot(jnp.ones((2, 3), jnp.bfloat16), jnp.asarray(w)).dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------
# v2: typed factories, no shape witness, initialisations checked against the reference code


def test_factories_are_frozen_typed_dataclasses():
    import dataclasses

    f = P.LoRAFactory(rank=8, alpha=16)
    assert f == P.lora(8, alpha=16) and isinstance(P.lora(8), P.LoRAFactory)
    assert f.scale == 2.0 and repr(f) == ("LoRAFactory(rank=8, alpha=16, rslora=False, "
                                          "init='default')")
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.rank = 4
    assert P.factory("lora", rank=8, alpha=16) == f
    for name, cls in P.FACTORIES.items():
        assert cls.method == name and dataclasses.is_dataclass(cls)
    # the shared-bases size is bound by apply, not a user argument
    with pytest.raises(ValueError, match=r"unknown argument\(s\) max_shape; valid: rank=256, "
                                         r"d_initial=0.1, projection_prng_key=0$"):
        P.factory("vera", max_shape=(4, 4))
    with pytest.raises(ValueError, match="valid methods: " + ", ".join(P.METHODS) + "$"):
        P.factory("nope")
    with pytest.raises(ValueError, match=r"rank=9 exceeds min\(in, out\)=8"):
        P.factory("dora", rank=9)(jax.random.key(0), jnp.ones((8, 10)))
    with pytest.raises(ValueError, match="alpha must be a positive number"):
        P.LoRAFactory(rank=2, alpha=-1.0)


def test_read_kernel_checks_the_dense_shape_of_a_stored_node():
    x = jnp.ones((2, M))
    params = TwoLayer().init(jax.random.key(1), x)["params"]
    wrong = P.apply(params, [("hidden/kernel", P.lowrank(2))], jax.random.key(0))
    wrong["hidden"]["kernel"] = P.lowrank(2)(jax.random.key(0), jnp.ones((M + 1, M)))
    with pytest.raises(ValueError, match=r"dense shape \(13, 12\), the module expects \(12, 12\)"):
        TwoLayer().apply({"params": wrong}, x)


def test_no_node_has_an_integer_or_float0_leaf(w):
    for name, make in FACTORIES.items():
        node = make()(jax.random.key(0), w)
        for leaf in jax.tree.leaves(node):
            assert jnp.issubdtype(leaf.dtype, jnp.floating), (name, leaf.dtype)


def test_sltrain_support_is_regenerated_from_its_seed():
    f = P.sltrain(2, density=0.1)
    a, b = f(jax.random.key(3), jnp.zeros((16, 24))), f(jax.random.key(3), jnp.zeros((16, 24)))
    np.testing.assert_array_equal(a.indices, b.indices)
    c = f(jax.random.key(4), jnp.zeros((16, 24)))
    assert not np.array_equal(a.indices, c.indices)
    # an independent draw of the same support: NumPy's PCG64 seeded by the node's seed
    ref = np.sort(np.random.default_rng(a.seed).choice(16 * 24, a.nnz, replace=False))
    np.testing.assert_array_equal(a.indices, ref)


def test_vera_bases_follow_peft_kaiming_init():
    """peft ``_kaiming_init``: gain sqrt(2), U(+-sqrt(6 / fan_in)), fan_in = size(1)."""
    max_in, max_out, r = 300, 200, 64
    node = P.vera(r)(jax.random.key(0), jnp.zeros((max_in, max_out)))
    a, b = (f64(t) for t in node.shared_bases())
    assert a.shape == (r, max_in) and b.shape == (max_out, r)
    for basis, fan_in in ((a, max_in), (b, r)):
        bound = math.sqrt(6.0 / fan_in)
        assert np.abs(basis).max() <= bound and np.abs(basis).max() > 0.99 * bound
        # U(-c, c): mean 0, variance c^2 / 3 = 2 / fan_in; 4-sigma sampling tolerances
        size = basis.size
        assert abs(basis.mean()) < 4 * bound / math.sqrt(3 * size)
        var = 2.0 / fan_in
        assert abs(basis.var() - var) < 4 * var * math.sqrt(0.8 / size)   # Var(x^2) = 4c^4/45


def test_randlora_gamma_starts_at_one_over_min_dim():
    for shape, rank in (((12, 40), 5), ((40, 12), 5), ((30, 30), 64)):
        node = P.randlora(rank)(jax.random.key(0), jnp.zeros(shape))
        num = math.ceil(min(shape) / rank)
        assert node.gamma.shape == (num, min(shape))
        # peft reset_randlora_parameters: 1 / max(gamma.shape) = 1 / max(N, min(m, n))
        np.testing.assert_allclose(f64(node.gamma), 1.0 / max(num, min(shape)), rtol=1e-7)
        np.testing.assert_allclose(f64(node.gamma), 1.0 / min(shape), rtol=1e-7)
        assert np.all(np.asarray(node.lam) == 0)


def test_olora_init_matches_numpy_qr(w):
    node = P.lora(3, alpha=6, init="olora")(jax.random.key(0), w)
    # peft olora_init on the torch weight W^T = Q R: B = Q[:, :r], A = R[:r]; W_res = W - s B A
    q, r = np.linalg.qr(f64(w).T)
    delta_torch = q[:, :3] @ r[:3]                 # (n, m); invariant to QR sign conventions
    np.testing.assert_allclose(f64(node.a) @ f64(node.b), delta_torch.T, atol=1e-5)
    np.testing.assert_allclose(f64(node.base), f64(w) - node.scale * delta_torch.T, atol=1e-5)
    np.testing.assert_allclose(f64(node.materialize()), f64(w), atol=1e-5)
    # the adapter's b rows are orthonormal (B = Q_r)
    np.testing.assert_allclose(f64(node.b) @ f64(node.b).T, np.eye(3), atol=1e-5)
