"""S4 / S4D flax layers: conv mode == autoregressive step mode, bidirectional convolution, parameter
labels and the SSM learning rate, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrx.models import s4


def _x(L=24, d=3, batch=2, seed=1):
    return jax.random.normal(jax.random.PRNGKey(seed), (batch, L, d))


@pytest.mark.parametrize("mode,ssm_init,disc", [("dplr", "legs", "zoh"), ("diag", "legs", "zoh"),
                                                ("diag", "lin", "bilinear")])
def test_decode_matches_convolution(mode, ssm_init, disc):
    L = 24
    x = _x(L)
    model = s4.S4Model(d_output=2, d_model=8, n_layers=2, d_state=16, mode=mode,
                       ssm_init=ssm_init, disc=disc, pool="none", l_max=L, chunk_size=5)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    y = jax.jit(model.apply)(variables, x)
    step_model = model.clone(decode=True)
    apply = jax.jit(lambda v, xt: step_model.apply(v, xt, mutable=["cache"]))
    ys, cache = [], None        # the first call builds a fresh cache from the parameters
    for t in range(L):
        v = {"params": variables["params"]} if cache is None else \
            {"params": variables["params"], "cache": cache}
        yt, mutated = apply(v, x[:, t:t + 1])
        cache = mutated["cache"]
        ys.append(yt)
    ys = jnp.concatenate(ys, axis=1)
    np.testing.assert_allclose(np.asarray(ys), np.asarray(y), atol=1e-4 * float(jnp.abs(y).max()))


def test_bidirectional_conv_matches_two_sided_sum():
    rng = np.random.default_rng(0)
    L = 9
    u, K, K2 = rng.normal(size=L), rng.normal(size=L), rng.normal(size=L)
    y = np.asarray(s4.bidirectional_conv(jnp.asarray(u), jnp.asarray(K), jnp.asarray(K2)))
    y_ref = [sum(K[t - s] * u[s] for s in range(t + 1))
             + sum(K2[s - t - 1] * u[s] for s in range(t + 1, L)) for t in range(L)]
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    y_c = np.asarray(s4.causal_conv(jnp.asarray(u), jnp.asarray(K)))
    np.testing.assert_allclose(y_c, np.convolve(u, K)[:L], rtol=1e-5, atol=1e-5)


def test_bidirectional_model_sees_the_future():
    model = s4.S4Model(d_output=1, d_model=8, n_layers=1, d_state=8, bidirectional=True,
                       pool="none")
    x = _x(16)
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
    grad = jax.jit(jax.grad(lambda xx: model.apply(variables, xx)[0, 3, 0]))(x)
    assert float(jnp.abs(grad[0, 10:]).sum()) > 0           # depends on later inputs
    causal = s4.S4Model(d_output=1, d_model=8, n_layers=1, d_state=8, pool="none")
    v2 = jax.jit(causal.init)(jax.random.PRNGKey(0), x)
    grad = jax.jit(jax.grad(lambda xx: causal.apply(v2, xx)[0, 3, 0]))(x)
    assert float(jnp.abs(grad[0, 4:]).sum()) < 1e-5 * float(jnp.abs(grad[0, :4]).sum())


def test_params_are_real_and_labelled():
    model = s4.S4Model(d_output=3, d_model=8, n_layers=1, d_state=16)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), _x(32))["params"]
    for leaf in jax.tree.leaves(params):
        assert jnp.isrealobj(leaf) and leaf.dtype == jnp.float32
    layer = params["s4_0"]
    assert layer["P"].shape == (8, 8, 2) and layer["C"].shape == (8, 8, 2)
    step = np.exp(np.asarray(layer["log_step"]))
    assert np.all((step >= 1e-3) & (step <= 1e-1))
    labels = s4.ssm_labels(params)["s4_0"]
    assert {k for k, v in labels.items() if v == "ssm"} == {
        "log_Lambda_real", "Lambda_imag", "P", "B", "log_step"}
    assert labels["C"] == "default" and labels["out"]["kernel"] == "default"


def test_ssm_params_get_small_lr_and_no_weight_decay():
    model = s4.S4Model(d_output=3, d_model=8, n_layers=1, d_state=8)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), _x(16))["params"]
    opt = s4.s4_optimizer(learning_rate=0.1, weight_decay=0.5, ssm_learning_rate=1e-3)
    grads = jax.tree.map(jnp.zeros_like, params)       # zero gradient: only weight decay acts
    updates, _ = opt.update(grads, opt.init(params), params)
    layer, upd = params["s4_0"], updates["s4_0"]
    for name in s4.SSM_PARAMS:
        np.testing.assert_array_equal(np.asarray(upd[name]), 0.0)
    np.testing.assert_allclose(np.asarray(upd["C"]), -0.1 * 0.5 * np.asarray(layer["C"]),
                               rtol=1e-5)
    grads = jax.tree.map(jnp.ones_like, params)         # Adam's first step: -lr * sign(g)
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_allclose(np.asarray(updates["s4_0"]["log_step"]), -1e-3, rtol=1e-3)
    assert isinstance(opt, optax.GradientTransformation)


def test_gradients_finite_through_model():
    model = s4.S4Model(d_output=3, d_model=8, n_layers=2, d_state=16, chunk_size=8)
    x = _x(64)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), x)["params"]
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x) ** 2)))(params)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("kwargs,match", [
    (dict(d_state=7), "even"), (dict(mode="dense"), "Valid choices"),
    (dict(mode="dplr", ssm_init="lin"), "ssm_init='legs'"), (dict(activation="relu"), "Valid"),
    (dict(bidirectional=True, decode=True, l_max=8), "bidirectional"),
    (dict(decode=True), "l_max"), (dict(dt_min=0.1, dt_max=0.01), "dt_min"),
])
def test_bad_layer_config(kwargs, match):
    model = s4.S4Model(d_output=2, d_model=4, n_layers=1, **kwargs)
    with pytest.raises(ValueError, match=match):
        model.init(jax.random.PRNGKey(0), _x(8 if not kwargs.get("decode") else 1))


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_init_follows_official_c_and_d(mode):
    """Official state-spaces/s4: C ~ CN(0, 1), stored as C-tilde = C (I - Abar^L) for DPLR
    (SSMKernelDPLR._setup_C), D ~ N(0, 1). Recover C in float64 NumPy from the stored parameters,
    independently of lrx.ssm, and check the moments."""
    H, N, L = 128, 8, 16
    layer = s4.S4Layer(d_state=N, mode=mode, l_max=L)
    params = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, L, H)))["params"]
    cplx = lambda x: np.asarray(x[..., 0], np.float64) + 1j * np.asarray(x[..., 1], np.float64)  # noqa: E731
    stored = cplx(params["C"])                                     # (H, n)
    if mode == "dplr":
        lam = -np.exp(np.asarray(params["log_Lambda_real"], np.float64)) + 1j * np.asarray(
            params["Lambda_imag"], np.float64)
        P = cplx(params["P"])
        step = np.exp(np.asarray(params["log_step"], np.float64))
        C = np.empty_like(stored)
        for h in range(H):
            lf = np.concatenate([lam[h], lam[h].conj()])
            pf = np.concatenate([P[h], P[h].conj()])
            A = np.diag(lf) - np.outer(pf, pf.conj())
            left = np.eye(N) - step[h] / 2 * A
            Abar = np.linalg.solve(left, np.eye(N) + step[h] / 2 * A)
            ct = np.concatenate([stored[h], stored[h].conj()])
            # Ct = C (I - Abar^L)  =>  C = Ct (I - Abar^L)^-1 (row vectors)
            c_full = np.linalg.solve((np.eye(N) - np.linalg.matrix_power(Abar, L)).T, ct)
            np.testing.assert_allclose(c_full[N // 2:], c_full[: N // 2].conj(), atol=1e-4)
            C[h] = c_full[: N // 2]
        assert not np.allclose(C, stored, atol=1e-2)               # the correction is not trivial
    else:
        C = stored
    size = C.size                                                   # H * N/2 = 512 samples
    for part in (C.real, C.imag):                                   # each N(0, 1/2)
        assert abs(part.mean()) < 4 * np.sqrt(0.5 / size)
        assert abs(part.var() - 0.5) < 4 * 0.5 * np.sqrt(2 / size)
    assert abs(np.mean(np.abs(C) ** 2) - 1.0) < 4 * np.sqrt(1 / size)
    D = np.asarray(params["D"], np.float64)
    assert abs(D.mean()) < 4 / np.sqrt(H) and abs(D.var() - 1) < 4 * np.sqrt(2 / H)
