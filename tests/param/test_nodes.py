"""lrx.param.nodes: each factored weight and factory against NumPy float64 re-derivations of its
paper's formula (materialize, dot, init, gradients, shared random bases)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrx.param as P
from tests.param._common import FACTORIES, SEED_SCRIPT, M, N, f64, numpy_reference, perturb


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
