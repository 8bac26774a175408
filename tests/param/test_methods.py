"""lrx.param.methods (LoRA-GA, EVA, LoRA-SB, SoRA, DyLoRA, TRP, WeLore LRC): forwards, inits and
one training step against NumPy float64 re-derivations."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lrx.param as P

M, N, T = 10, 14, 32


def f64(x):
    return np.asarray(x, dtype=np.float64)


@pytest.fixture(scope="module")
def data():
    k = jax.random.split(jax.random.key(0), 4)
    w = jax.random.normal(k[0], (M, N)) * 0.3
    x = jax.random.normal(k[1], (T, M))
    y = jax.random.normal(k[2], (T, N))
    return w, x, y


def dense_grad(w, x, y):
    """dL/dW of L = 0.5 ||x W - y||^2 (float64)."""
    x, y = f64(x), f64(y)
    return x.T @ (x @ f64(w) - y)


def sgd_step(node, x, y, lr, extra=None):
    """One SGD step of L = 0.5 ||x W - y||^2 on the trainable part of ``node`` (lrx + optax)."""
    t, fz = P.partition(node)
    loss = lambda t: 0.5 * jnp.sum((P.dot(x, P.combine(t, fz)) - y) ** 2)  # noqa: E731
    opt = optax.sgd(lr) if extra is None else optax.chain(optax.sgd(lr), extra)
    g = jax.grad(loss)(t)
    upd, _ = opt.update(g, opt.init(t), t)
    return P.combine(optax.apply_updates(t, upd), fz)


def test_lora_ga_init_matches_numpy_svd(data):
    w, x, y = data
    g = dense_grad(w, x, y)
    r, alpha, gamma = 3, 6.0, 16.0
    node = P.apply({"k": w}, [("k", P.LoRAGAFactory(rank=r, alpha=alpha))], jax.random.key(0),
                   stats={"k": jnp.asarray(g, jnp.float32)})["k"]
    assert isinstance(node, P.LoRA) and node.init == "lora_ga"
    u, s, vt = np.linalg.svd(g, full_matrices=False)
    s_lora = alpha / r
    # a spans U[:, :r] (sign-free check: |cos| = 1 column by column)
    np.testing.assert_allclose(np.abs(np.sum(f64(node.a) * u[:, :r], 0)), 1.0, atol=1e-4)
    # b rows are +-S[r+i] V[:, r+i]^T * n^(1/4) / sqrt(gamma) (peft 'ArB2r', 'stable')
    scale = N ** 0.25 / math.sqrt(gamma)
    for i in range(r):
        ref = s[r + i] * vt[r + i] * scale
        got = f64(node.b)[i]
        assert min(np.abs(got - ref).max(), np.abs(got + ref).max()) < 1e-3 * np.abs(ref).max()
    np.testing.assert_allclose(f64(node.materialize()), f64(w), atol=1e-4)
    np.testing.assert_allclose(f64(node.base), f64(w) - s_lora * f64(node.a) @ f64(node.b),
                               atol=1e-5)
    with pytest.raises(ValueError, match="needs the loss gradient"):
        P.apply({"k": w}, [("k", P.LoRAGAFactory(rank=2))], jax.random.key(0))


def test_eva_init_and_rank_redistribution(data):
    w, x, _ = data
    node = P.apply({"k": w}, [("k", P.EVAFactory(rank=3))], jax.random.key(0),
                   stats={"k": x})["k"]
    _, _, vt = np.linalg.svd(f64(x), full_matrices=False)
    np.testing.assert_allclose(np.abs(np.sum(f64(node.a) * vt[:3].T, 0)), 1.0, atol=1e-4)
    assert np.all(np.asarray(node.b) == 0)
    np.testing.assert_allclose(f64(node.materialize()), f64(w), atol=1e-6)
    # redistribution: one layer with a dominant direction, one isotropic layer
    rng = np.random.default_rng(0)
    iso = rng.normal(size=(200, 8))
    spiky = rng.normal(size=(200, 8)) * np.array([10.0, 8.0, 6.0, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3])
    ranks = P.eva_ranks({"iso": iso, "spiky": spiky}, rank=3, rho=2.0)
    assert sum(ranks.values()) == 6
    # independent recomputation: the 6 largest explained-variance ratios of the 2 x 6 offers
    offers = []
    for name, a in (("iso", iso), ("spiky", spiky)):
        s = np.linalg.svd(a, compute_uv=False)
        offers += [(v, name) for v in (s**2 / np.sum(s**2))[:6]]
    top = sorted(offers, reverse=True)[:6]
    assert ranks == {n: sum(1 for _, k in top if k == n) for n in ("iso", "spiky")}
    assert ranks["spiky"] == 3 and ranks["iso"] == 3


def test_lora_sb_forward_step_and_count(data):
    w, x, y = data
    g = dense_grad(w, x, y)
    r, lr0 = 3, 1e-2
    node = P.apply({"k": w}, [("k", P.LoRASBFactory(rank=r, learning_rate=lr0))],
                   jax.random.key(0), stats={"k": jnp.asarray(g, jnp.float32)})["k"]
    delta = -lr0 * np.sign(g)
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    top = (u[:, :r] * s[:r]) @ vt[:r]
    np.testing.assert_allclose(f64(node.u) @ f64(node.core) @ f64(node.v), top, atol=1e-5)
    np.testing.assert_allclose(f64(node.materialize()), f64(w) + top, atol=1e-5)
    np.testing.assert_allclose(f64(P.dot(x, node)), f64(x) @ (f64(w) + top), atol=1e-4)
    # one SGD step on the core: dR = u^T (dL/dW) v^T
    lr = 0.01
    new = sgd_step(node, x, y, lr)
    w_eff = f64(w) + f64(node.u) @ f64(node.core) @ f64(node.v)
    d_core = f64(node.u).T @ dense_grad(w_eff, x, y) @ f64(node.v).T
    np.testing.assert_allclose(f64(new.core), f64(node.core) - lr * d_core, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(new.u), np.asarray(node.u))
    c = P.count({"k": node})
    assert c["trainable"] == r * r and c["frozen"] == M * N + r * (M + N)


def test_sora_forward_step_proximal_and_count(data):
    w, x, y = data
    r, alpha = 4, 8.0
    node = P.SoRAFactory(rank=r, alpha=alpha)(jax.random.key(1), w)
    assert node.gate.shape == (r,) and np.all(np.asarray(node.b) == 0)
    np.testing.assert_allclose(f64(node.materialize()), f64(w), atol=1e-7)
    node = node.replace(b=jax.random.normal(jax.random.key(2), (r, N)) * 0.3,
                        gate=jnp.array([0.5, -0.01, 0.2, 0.0005]))
    s = alpha / r
    a, gt, b = f64(node.a), f64(node.gate), f64(node.b)
    w_eff = f64(w) + s * (a * gt) @ b
    np.testing.assert_allclose(f64(node.materialize()), w_eff, atol=1e-6)
    np.testing.assert_allclose(f64(P.dot(x, node)), f64(x) @ w_eff, atol=1e-5)
    # one SGD step, then the proximal step g <- sign(g) max(|g| - xi, 0) on the gate only
    lr, xi = 1e-3, 0.02
    new = sgd_step(node, x, y, lr, extra=P.sora_proximal(xi))
    gw = dense_grad(w_eff, x, y)
    ga = s * gw @ b.T * gt[None, :]
    gg = s * np.sum((a.T @ gw) * b, axis=1)
    gb = s * (a * gt).T @ gw
    z = gt - lr * gg
    np.testing.assert_allclose(f64(new.gate), np.sign(z) * np.maximum(np.abs(z) - xi, 0),
                               atol=1e-6)
    np.testing.assert_allclose(f64(new.a), a - lr * ga, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f64(new.b), b - lr * gb, rtol=1e-4, atol=1e-6)
    assert int(new.effective_rank()) == int(np.sum(np.abs(z) > xi)) < r
    assert P.count({"k": node})["trainable"] == r * (M + N) + r


def test_dylora_nested_ranks_forward_step_and_sampling(data):
    w, x, y = data
    r, alpha = 4, 8.0
    node = P.DyLoRAFactory(rank=r, alpha=alpha)(jax.random.key(1), w)
    node = node.replace(b=jax.random.normal(jax.random.key(2), (r, N)) * 0.3)
    a, b = f64(node.a), f64(node.b)
    for rank in (1, 2, 4):
        sub = P.set_rank({"k": node}, rank)["k"]
        ref = f64(w) + alpha / rank * a[:, :rank] @ b[:rank]
        np.testing.assert_allclose(f64(sub.materialize()), ref, atol=1e-6)
        np.testing.assert_allclose(f64(jax.jit(P.dot)(x, sub)), f64(x) @ ref, atol=1e-5)
    # one step at sampled rank 2: only the first 2 columns of a / rows of b move
    sub = P.set_rank(node, 2)
    lr = 1e-3
    new = sgd_step(sub, x, y, lr)
    w_eff = f64(w) + alpha / 2 * a[:, :2] @ b[:2]
    gw = dense_grad(w_eff, x, y)
    ga = np.zeros_like(a)
    gb = np.zeros_like(b)
    ga[:, :2] = alpha / 2 * gw @ b[:2].T
    gb[:2] = alpha / 2 * a[:, :2].T @ gw
    np.testing.assert_allclose(f64(new.a), a - lr * ga, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(f64(new.b), b - lr * gb, rtol=1e-4, atol=1e-6)
    # per-step keys: ranks in 1..r_max, all of them reached
    ranks = {int(P.dylora_sample_rank(jax.random.fold_in(jax.random.key(0), i), r))
             for i in range(200)}
    assert ranks == {1, 2, 3, 4}
    c = P.count({"k": node})
    assert c["trainable"] == r * (M + N) and c["frozen"] == M * N + 1   # + the active rank


def test_trp_truncation_and_nuclear_subgradient():
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.normal(size=(12, 12)))
    v, _ = np.linalg.qr(rng.normal(size=(9, 9)))
    s = np.array([5.0, 3.0, 1.0, 0.5, 0.1, 0.05, 0.01, 0.0, 0.0])
    w = (u[:, :9] * s) @ v.T
    params = {"w": jnp.asarray(w, jnp.float32), "bias": jnp.ones(3)}
    energy = 0.95
    cum = np.cumsum(s**2) / np.sum(s**2)
    k = int(np.argmax(cum >= energy)) + 1                     # smallest k reaching the energy
    assert k == 2
    out = jax.jit(lambda p: P.trp_truncate(p, energy))(params)
    np.testing.assert_allclose(f64(out["w"]), (u[:, :k] * s[:k]) @ v[:, :k].T, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out["bias"]), np.ones(3))
    reg = P.trp_nuclear_regularizer(nuclear_weight=0.1, energy=energy)
    g = {"w": jnp.zeros((12, 9)), "bias": jnp.zeros(3)}
    upd, _ = reg.update(g, reg.init(params), params)
    np.testing.assert_allclose(f64(upd["w"]), 0.1 * u[:, :k] @ v[:, :k].T, atol=1e-5)


def test_welore_lrc_factorises_low_rank_components_only():
    rng = np.random.default_rng(0)
    low = (rng.normal(size=(16, 2)) @ rng.normal(size=(2, 16))) + 1e-3 * rng.normal(size=(16, 16))
    full = rng.normal(size=(16, 16))
    params = {"low": jnp.asarray(low, jnp.float32), "full": jnp.asarray(full, jnp.float32),
              "norm": jnp.ones(16)}
    new, labels = P.welore_lrc(params, target_reduction=0.45, paths_regex="low|full")
    assert isinstance(new["low"], P.LowRank) and not P.is_node(new["full"])
    assert labels == {"low": "train", "full": "freeze", "norm": "freeze"}
    r = new["low"].u.shape[1]
    s = np.linalg.svd(low, compute_uv=False)
    sh = (s - s.min()) / (s.max() - s.min())
    assert r < 16 and r >= 2
    uu, ss, vv = np.linalg.svd(low)
    np.testing.assert_allclose(f64(new["low"].materialize()), (uu[:, :r] * ss[:r]) @ vv[:r],
                               atol=1e-4)
    assert np.sum(sh < 0.5) > 0
