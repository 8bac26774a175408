"""HiPPO-LegS closed form and its DPLR form (conjugate pairing, reconstruction)."""

import numpy as np
import pytest

import lrx.ssm as ssm
from tests.ssm._reference import legs_closed_form


@pytest.mark.parametrize("N", [1, 2, 5, 16, 64])
def test_hippo_legs_closed_form(N):
    A, B = ssm.hippo_legs(N)
    A_ref, B_ref = legs_closed_form(N)
    assert A.dtype == np.float64 and A.shape == (N, N) and B.shape == (N,)
    np.testing.assert_array_equal(A, A_ref)
    np.testing.assert_allclose(B, B_ref, rtol=1e-15)


@pytest.mark.parametrize("N", [2, 3, 8, 32, 64])
def test_legs_dplr_reconstruction(N):
    Lambda, P, B, V = ssm.legs_dplr(N)
    A, B_legs = legs_closed_form(N)
    assert Lambda.dtype == np.complex128
    np.testing.assert_allclose(V.conj().T @ V, np.eye(N), atol=1e-12)
    recon = V @ (np.diag(Lambda) - np.outer(P, P.conj())) @ V.conj().T
    assert np.max(np.abs(recon - A)) <= 1e-10 * max(1.0, np.abs(A).max())
    np.testing.assert_allclose(V @ B, B_legs, atol=1e-10)
    np.testing.assert_allclose(V @ P, np.sqrt(np.arange(N) + 0.5), atol=1e-10)
    np.testing.assert_allclose(Lambda.real, -0.5, atol=1e-12)
    if N > 8:   # A's eigenvectors are too ill-conditioned for eigvals beyond small N
        return
    eig = np.sort(np.linalg.eigvals(np.diag(Lambda) - np.outer(P, P.conj())).real)
    np.testing.assert_allclose(eig, -np.arange(N, 0, -1), atol=1e-6 * N)


@pytest.mark.parametrize("N", [4, 16, 64])
def test_legs_dplr_conjugate_pairing_is_exact(N):
    Lambda, P, B, V = ssm.legs_dplr(N)
    n = N // 2
    np.testing.assert_array_equal(V[:, n:], V[:, :n].conj())
    np.testing.assert_array_equal(Lambda[n:], Lambda[:n].conj())
    np.testing.assert_allclose(P[n:], P[:n].conj(), atol=1e-13)
    np.testing.assert_allclose(B[n:], B[:n].conj(), atol=1e-13)
    assert np.all(Lambda[:n].imag < 0)


@pytest.mark.parametrize("init", ssm.INITS)
def test_s4d_inits(init):
    N = 16
    Lambda, B = ssm.s4d_init(N, init)
    assert Lambda.shape == B.shape == (N // 2,)
    assert np.all(Lambda.real < 0)
    n = np.arange(N // 2)
    if init == "lin":
        np.testing.assert_allclose(Lambda, -0.5 + 1j * np.pi * n)
    if init == "inv":
        np.testing.assert_allclose(Lambda, -0.5 + 1j * N / np.pi * (N / (2 * n + 1) - 1))
    if init == "legs":
        Lam_full, _, B_full, _ = ssm.legs_dplr(N)
        np.testing.assert_allclose(Lambda, Lam_full[: N // 2])
        np.testing.assert_allclose(B, B_full[: N // 2])


def test_bad_state_sizes():
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="state size"):
            ssm.hippo_legs(bad)
    with pytest.raises(ValueError, match="even"):
        ssm.s4d_init(7, "lin")
    with pytest.raises(ValueError, match="Valid choices"):
        ssm.s4d_init(8, "legt")
