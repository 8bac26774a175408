"""Float64 NumPy references for S4 kernels (slow, exact up to float64 rounding), for reports and
benchmarks: the dense bilinear discretisation (S4 eq. 3) powered step by step (eq. 5).

Reference: S4, A. Gu, K. Goel, C. Re, arXiv 2111.00396, eqs. (3)-(5).
"""

from __future__ import annotations

import numpy as np


def dense_bilinear_f64(Lambda, P, Q, B, step: float) -> tuple[np.ndarray, np.ndarray]:
    """``Abar (n, n)``, ``Bbar (n,)`` in complex128 for ``A = diag(Lambda) - P Q^H``.
    ``Lambda, B (n,)``; ``P, Q (n,)`` or ``(r, n)``."""
    Lambda = np.asarray(Lambda, np.complex128)
    P = np.atleast_2d(np.asarray(P, np.complex128))
    Q = np.atleast_2d(np.asarray(Q, np.complex128))
    A = np.diag(Lambda) - P.T @ Q.conj()
    n = len(Lambda)
    left = np.eye(n) - step / 2 * A
    return np.linalg.solve(left, np.eye(n) + step / 2 * A), np.linalg.solve(left, step * B)


def power_kernel_f64(Lambda, P, Q, B, C, step: float, L: int) -> np.ndarray:
    """``K[l] = Re(C Abar^l Bbar)``, ``l < L``, by repeated float64 matrix-vector products."""
    Abar, x = dense_bilinear_f64(Lambda, P, Q, B, step)
    C = np.asarray(C, np.complex128)
    out = np.empty(L)
    for i in range(L):
        out[i] = np.real(C @ x)
        x = Abar @ x
    return out


def ctilde_f64(Lambda, P, Q, B, C, step: float, L: int) -> np.ndarray:
    """``C (I - Abar^L)`` in complex128."""
    Abar, _ = dense_bilinear_f64(Lambda, P, Q, B, step)
    C = np.asarray(C, np.complex128)
    return C - C @ np.linalg.matrix_power(Abar, L)


def abar_power_norm_f64(Lambda, P, Q, B, step: float, L: int) -> float:
    """``||Abar^L||_2`` (spectral norm, float64): how far ``C~ = C (I - Abar^L)`` is from ``C``."""
    Abar, _ = dense_bilinear_f64(Lambda, P, Q, B, step)
    return float(np.linalg.norm(np.linalg.matrix_power(Abar, L), 2))


def relative_max_error(x, reference) -> float:
    """``max |x - reference| / max |reference|`` (float64), the error measure of the kernel
    reports; ``x`` and ``reference`` of one shape."""
    x, reference = np.asarray(x), np.asarray(reference)
    if x.shape != reference.shape:
        raise ValueError(f"shapes differ: {x.shape} vs {reference.shape}")
    scale = np.max(np.abs(reference))
    if scale == 0:
        raise ValueError("the reference is all zeros: the relative error is undefined")
    return float(np.max(np.abs(x.astype(np.complex128) - reference)) / scale)
