"""S4 / S4D kernels against NumPy float64 powering of the dense discretised matrix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lrx.ssm as ssm
from tests.ssm import _reference as ref


def _legs_system(N, seed=0):
    Lam, P, B, _ = ssm.legs_dplr(N)
    rng = np.random.default_rng(seed)
    c = rng.normal(size=N // 2) + 1j * rng.normal(size=N // 2)
    return Lam, P, B, np.concatenate([c, c.conj()])


def _relerr(a, b):
    return np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b))


@pytest.mark.parametrize("N,L,step", [(8, 16, 0.1), (16, 64, 0.01), (64, 256, 0.05),
                                      (64, 1024, 0.001), (32, 301, 0.02)])
def test_dplr_kernel_matches_power_reference(N, L, step):
    Lam, P, B, C = _legs_system(N)
    Abar, Bbar = ref.bilinear(ref.dense_A(Lam, P, P), B, step)
    K_ref = ref.power_kernel(Abar, Bbar, C, L)
    Ct = C @ (np.eye(N) - np.linalg.matrix_power(Abar, L))
    K = ssm.dplr_kernel(Lam, P, P, B, Ct, step, L)
    assert K.shape == (L,) and K.dtype == jnp.float32
    assert _relerr(K, K_ref) < 1e-4
    n = N // 2
    K_half = ssm.dplr_kernel(Lam[:n], P[:n], P[:n], B[:n], Ct[:n], step, L, conj_sym=True)
    assert _relerr(K_half, K_ref) < 1e-4
    K_chunk = ssm.dplr_kernel(Lam[:n], P[:n], P[:n], B[:n], Ct[:n], step, L, conj_sym=True,
                              chunk_size=7)
    assert _relerr(K_chunk, K_ref) < 1e-4
    K_sep = ssm.dplr_kernel_separate(Lam[:n], P[:n], P[:n], B[:n], Ct[:n], step, L, True)
    assert _relerr(K_sep, K_ref) < 1e-4


def test_ctilde_correction_matters_at_small_step_times_length():
    N, L, step = 16, 128, 1e-3          # ||Abar^L|| close to 1: the correction is O(1)
    Lam, P, B, C = _legs_system(N, seed=1)
    Abar, Bbar = ref.bilinear(ref.dense_A(Lam, P, P), B, step)
    K_ref = ref.power_kernel(Abar, Bbar, C, L)
    Ct_ref = C @ (np.eye(N) - np.linalg.matrix_power(Abar, L))
    Ct = ssm.ctilde(Lam, P, P, B, C, step, L)
    np.testing.assert_allclose(np.asarray(Ct), Ct_ref, rtol=1e-4, atol=1e-5)
    assert _relerr(ssm.dplr_kernel(Lam, P, P, B, Ct, step, L), K_ref) < 1e-4
    assert _relerr(ssm.dplr_kernel(Lam, P, P, B, C, step, L), K_ref) > 0.1   # without C-tilde
    C_back = ssm.c_from_ctilde(Lam, P, P, B, Ct_ref, step, L)
    np.testing.assert_allclose(np.asarray(C_back), C, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("conj_pairs", [False, True])
def test_dplr_kernel_any_rank(rank, conj_pairs):
    rng = np.random.default_rng(rank)
    n, L, step = 8, 40, 0.3
    Lam, P, Q, B, C = ref.random_stable_system(rng, n, rank, conj_pairs)
    Abar, Bbar = ref.bilinear(ref.dense_A(Lam, P, Q), B, step)
    K_ref = ref.power_kernel(Abar, Bbar, C, L)
    Ct = C @ (np.eye(n) - np.linalg.matrix_power(Abar, L))
    PP, QQ = (P[0], Q[0]) if rank == 1 else (P, Q)
    assert _relerr(ssm.dplr_kernel(Lam, PP, QQ, B, Ct, step, L, chunk_size=6), K_ref) < 1e-4
    if conj_pairs:
        h = n // 2
        K = ssm.dplr_kernel(Lam[:h], PP[..., :h], QQ[..., :h], B[:h], Ct[:h], step, L,
                            conj_sym=True)
        assert _relerr(K, K_ref) < 1e-4


def test_dplr_kernel_batched_over_channels():
    N, L = 16, 64
    Lam, P, B, C = _legs_system(N)
    n = N // 2
    steps = np.array([0.003, 0.03, 0.3])
    Cs = np.stack([C * (k + 1) for k in range(3)])
    Ct = np.stack([Cs[k] @ (np.eye(N) - np.linalg.matrix_power(
        ref.bilinear(ref.dense_A(Lam, P, P), B, s)[0], L)) for k, s in enumerate(steps)])
    tile = lambda x: np.tile(x[None, :n], (3, 1))  # noqa: E731
    K = ssm.dplr_kernel(tile(Lam), tile(P), tile(P), tile(B), Ct[:, :n], steps, L,
                        conj_sym=True, chunk_size=10)
    assert K.shape == (3, L)
    for k, s in enumerate(steps):
        Abar, Bbar = ref.bilinear(ref.dense_A(Lam, P, P), B, s)
        assert _relerr(K[k], ref.power_kernel(Abar, Bbar, Cs[k], L)) < 1e-4


def test_discretize_and_krylov_match_reference():
    rng = np.random.default_rng(3)
    Lam, P, Q, B, C = ref.random_stable_system(rng, 6, 2)
    Abar, Bbar = ssm.discretize_bilinear(Lam, P, Q, B, 0.2)
    Abar_ref, Bbar_ref = ref.bilinear(ref.dense_A(Lam, P, Q), B, 0.2)
    np.testing.assert_allclose(np.asarray(Abar), Abar_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(Bbar), Bbar_ref, rtol=1e-5, atol=1e-5)
    K = ssm.krylov_kernel(Abar, Bbar, jnp.asarray(C, jnp.complex64), 30)
    assert _relerr(K, ref.power_kernel(Abar_ref, Bbar_ref, C, 30)) < 1e-4


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_s4d_kernel_direct_evaluation(method):
    rng = np.random.default_rng(4)
    Lam, B = ssm.s4d_init(16, "inv")
    C = rng.normal(size=8) + 1j * rng.normal(size=8)
    step, L = 0.05, 100
    if method == "zoh":
        Abar = np.exp(step * Lam)
        Bbar = (Abar - 1) / Lam * B
    else:
        Abar = (1 + step * Lam / 2) / (1 - step * Lam / 2)
        Bbar = step * B / (1 - step * Lam / 2)
    K_ref = np.array([np.real(np.sum(C * Bbar * Abar ** i)) for i in range(L)])
    K = ssm.s4d_kernel(Lam, B, C, step, L, method=method)
    assert _relerr(K, K_ref) < 1e-4
    K2 = ssm.s4d_kernel(Lam, B, C, step, L, method=method, conj_sym=True)
    assert _relerr(K2, 2 * K_ref) < 1e-4
    if method == "bilinear":   # = the DPLR kernel with a zero low-rank term and C-tilde
        Ct = C * (1 - Abar ** L)
        Kd = ssm.dplr_kernel(Lam, np.zeros(8), np.zeros(8), B, Ct, step, L)
        assert _relerr(Kd, K_ref) < 1e-4


def test_gradients_are_finite():
    Lam, P, B, C = _legs_system(16)
    n = 8

    def loss(lam_re, lam_im, p, b, c, log_step):
        lam = jax.lax.complex(lam_re, lam_im)
        K = ssm.dplr_kernel(lam, p, p, b, c, jnp.exp(log_step), 512, conj_sym=True,
                            chunk_size=64)
        K2 = ssm.s4d_kernel(lam, b, c, jnp.exp(log_step), 512, conj_sym=True)
        return jnp.sum(K ** 2) + jnp.sum(K2 ** 2)

    args = (Lam[:n].real, Lam[:n].imag, jnp.asarray(P[:n], jnp.complex64),
            jnp.asarray(B[:n], jnp.complex64), jnp.asarray(C[:n], jnp.complex64), np.log(0.01))
    grads = jax.jit(jax.grad(loss, argnums=range(6)))(*[jnp.asarray(a) for a in args])
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g)))


def test_chunked_kernel_bounds_compiled_memory():
    H, n, L = 8, 32, 8192
    Lam, P, B, C = _legs_system(2 * n)
    tile = lambda x: jnp.asarray(np.tile(x[None, :n], (H, 1)), jnp.complex64)  # noqa: E731
    args = (tile(Lam), tile(P), tile(B), tile(C), jnp.full((H,), 0.01))

    def temp_bytes(chunk):
        f = jax.jit(lambda lam, p, b, c, s: ssm.dplr_kernel(lam, p, p, b, c, s, L, True,
                                                            chunk_size=chunk))
        return f.lower(*args).compile().memory_analysis().temp_size_in_bytes

    full, chunked = temp_bytes(None), temp_bytes(256)
    matrix_bytes = H * (L // 2 + 1) * n * 8
    assert chunked < full
    assert chunked < matrix_bytes / 4


def test_bad_inputs_give_clear_errors():
    Lam, P, B, C = _legs_system(8)
    for L in (0, -4, 3.5):
        with pytest.raises(ValueError, match="L must be a positive integer"):
            ssm.dplr_kernel(Lam, P, P, B, C, 0.1, L)
    for step in (0.0, -0.1, np.nan):
        with pytest.raises(ValueError, match="step"):
            ssm.dplr_kernel(Lam, P, P, B, C, step, 16)
        with pytest.raises(ValueError, match="step"):
            ssm.s4d_kernel(Lam, B, C, step, 16)
    with pytest.raises(ValueError, match="low-rank factor"):
        ssm.dplr_kernel(Lam, np.zeros((2, 3, 8)), P, B, C, 0.1, 16)
    with pytest.raises(ValueError, match="Valid choices"):
        ssm.s4d_kernel(Lam, B, C, 0.1, 16, method="euler")
    with pytest.raises(ValueError, match="chunk_size"):
        ssm.dplr_kernel(Lam, P, P, B, C, 0.1, 64, chunk_size=-2)
