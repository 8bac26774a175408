"""The recurrent view (O(n) DPLR step, diagonal step) equals the convolution view."""

import numpy as np
import pytest

import lrx.ssm as ssm
from tests.ssm import _reference as ref


@pytest.mark.parametrize("conj_sym", [False, True])
@pytest.mark.parametrize("rank", [1, 2])
def test_dplr_recurrence_equals_convolution(conj_sym, rank):
    rng = np.random.default_rng(10 + rank)
    n, L, step = 8, 48, 0.2
    Lam, P, Q, B, C = ref.random_stable_system(rng, n, rank, conj_pairs=True)
    A = ref.dense_A(Lam, P, Q)
    Abar, Bbar = ref.bilinear(A, B, step)
    K = ref.power_kernel(Abar, Bbar, C, L)
    Ct = C @ (np.eye(n) - np.linalg.matrix_power(Abar, L))
    u = rng.normal(size=(3, L))
    y_ref = np.stack([ref.causal_conv(ui, K) for ui in u])
    PP, QQ = (P[0], Q[0]) if rank == 1 else (P, Q)
    h = n // 2 if conj_sym else n
    params = ssm.dplr_step_params(Lam[:h], PP[..., :h], QQ[..., :h], B[:h], Ct[:h], step, L,
                                  conj_sym=conj_sym)
    np.testing.assert_allclose(np.asarray(params.C), C[:h], rtol=1e-3, atol=1e-3)
    y, x = ssm.scan(params, u, conj_sym=conj_sym)
    assert y.shape == (3, L) and x.shape == (3, h)
    np.testing.assert_allclose(np.asarray(y), y_ref, rtol=1e-4, atol=1e-4 * np.abs(y_ref).max())
    # the O(n) step reproduces Abar x + Bbar u of the dense discretisation
    x0 = rng.normal(size=n) + 1j * rng.normal(size=n)
    if conj_sym:
        x0 = np.concatenate([x0[:h], x0[:h].conj()])
    x1, _ = ssm.step(params, x0[:h], 0.7, conj_sym=conj_sym)
    np.testing.assert_allclose(np.asarray(x1), (Abar @ x0 + Bbar * 0.7)[:h], rtol=1e-4,
                               atol=1e-4)


def test_legs_recurrence_equals_dplr_kernel_convolution():
    N, L, step = 64, 256, 0.05
    Lam, P, B, _ = ssm.legs_dplr(N)
    rng = np.random.default_rng(0)
    n = N // 2
    Ct = rng.normal(size=n) + 1j * rng.normal(size=n)
    K = np.asarray(ssm.dplr_kernel(Lam[:n], P[:n], P[:n], B[:n], Ct, step, L, conj_sym=True))
    u = rng.normal(size=L)
    y_conv = np.convolve(u, K)[:L]
    params = ssm.dplr_step_params(Lam[:n], P[:n], P[:n], B[:n], Ct, step, L, conj_sym=True)
    y, _ = ssm.scan(params, u, conj_sym=True)
    assert np.max(np.abs(np.asarray(y) - y_conv)) <= 1e-4 * np.max(np.abs(y_conv))


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_diag_recurrence_equals_s4d_kernel(method):
    Lam, B = ssm.s4d_init(32, "legs")
    rng = np.random.default_rng(1)
    C = rng.normal(size=16) + 1j * rng.normal(size=16)
    L, step = 128, 0.02
    K = np.asarray(ssm.s4d_kernel(Lam, B, C, step, L, method=method, conj_sym=True))
    u = rng.normal(size=L)
    y, _ = ssm.scan(ssm.diag_step_params(Lam, B, C, step, method), u, conj_sym=True)
    y_conv = np.convolve(u, K)[:L]
    assert np.max(np.abs(np.asarray(y) - y_conv)) <= 1e-4 * np.max(np.abs(y_conv))
