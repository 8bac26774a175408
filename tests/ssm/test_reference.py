"""lrx.ssm.reference (the float64 powering references of the reports) against the tests' own
independent float64 derivations (tests/ssm/_reference.py: dense A, bilinear step, powers)."""

import numpy as np
import pytest

from lrx.ssm import reference
from tests.ssm import _reference as ref


def _system(seed, n=6, rank=2):
    rng = np.random.default_rng(seed)
    lam = -rng.uniform(0.1, 1.0, n) + 1j * rng.normal(size=n)
    p = 0.3 * (rng.normal(size=(rank, n)) + 1j * rng.normal(size=(rank, n)))
    q = 0.3 * (rng.normal(size=(rank, n)) + 1j * rng.normal(size=(rank, n)))
    b = rng.normal(size=n) + 1j * rng.normal(size=n)
    c = rng.normal(size=n) + 1j * rng.normal(size=n)
    return lam, p, q, b, c


def test_dense_bilinear_power_kernel_and_ctilde_match_independent_derivations():
    lam, p, q, b, c = _system(0)
    step, length = 0.1, 9
    abar, bbar = ref.bilinear(ref.dense_A(lam, p, q), b, step)
    got_a, got_b = reference.dense_bilinear_f64(lam, p, q, b, step)
    np.testing.assert_allclose(got_a, abar, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(got_b, bbar, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(reference.power_kernel_f64(lam, p, q, b, c, step, length),
                               ref.power_kernel(abar, bbar, c, length), rtol=1e-11, atol=1e-13)
    # C~ = C (I - Abar^L) makes the truncated generating function exact at the L-th roots of
    # unity (S4 Lemma C.3): FFT_k(C Abar^l Bbar) = C~ (I - Abar w_k)^-1 Bbar, w_k = e^(-2 pi i k/L)
    ctilde = reference.ctilde_f64(lam, p, q, b, c, step, length)
    x, complex_kernel = bbar.copy(), []
    for _ in range(length):
        complex_kernel.append(c @ x)
        x = abar @ x
    omega = np.exp(-2j * np.pi * np.arange(length) / length)
    generating = [ctilde @ np.linalg.solve(np.eye(len(lam)) - abar * w, bbar) for w in omega]
    np.testing.assert_allclose(np.fft.fft(complex_kernel), generating, rtol=1e-10, atol=1e-12)


def test_rank_one_vectors_are_accepted_as_one_row():
    lam, p, q, b, _ = _system(1, rank=1)
    a1, b1 = reference.dense_bilinear_f64(lam, p[0], q[0], b, 0.05)
    a2, b2 = reference.dense_bilinear_f64(lam, p, q, b, 0.05)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(b1, b2)


def test_abar_power_norm_and_relative_max_error():
    lam, p, q, b, _ = _system(2)
    abar, _ = ref.bilinear(ref.dense_A(lam, p, q), b, 0.1)
    # spectral norm = the largest singular value, from an independent SVD of the powered matrix
    power = np.eye(len(lam))
    for _ in range(5):
        power = power @ abar
    expected = np.linalg.svd(power, compute_uv=False)[0]
    assert reference.abar_power_norm_f64(lam, p, q, b, 0.1, 5) == pytest.approx(expected,
                                                                                  rel=1e-10)
    assert reference.relative_max_error([1.0, 2.5, -4.0], [1.0, 2.0, -4.0]) == pytest.approx(
        0.5 / 4.0)
    # complex differences count by modulus: |1j - 0| = 1, |0 - 2| = 2, over max |ref| = 2
    assert reference.relative_max_error(np.array([1j, 0]), np.array([0, 2.0])) == pytest.approx(
        2.0 / 2.0)
    assert reference.relative_max_error(np.array([1j, 2.0]), np.array([0, 2.0])) == pytest.approx(
        1.0 / 2.0)
    with pytest.raises(ValueError, match="shapes differ"):
        reference.relative_max_error([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="all zeros"):
        reference.relative_max_error([1.0], [0.0])
