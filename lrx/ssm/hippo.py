"""HiPPO-LegS and its diagonal-plus-low-rank (DPLR) form, in float64 NumPy.

Reference: A. Gu, K. Goel, C. Re, "Efficiently Modeling Long Sequences with Structured State
Spaces" (S4), arXiv 2111.00396, eq. (2) (HiPPO-LegS), Thm. 1 / Cor. 3.1 (NPLR -> DPLR), and
A. Gu, A. Gupta, K. Goel, C. Re, "On the Parameterization and Initialization of Diagonal State
Space Models" (S4D), arXiv 2206.11893, Sec. 4 (S4D-LegS, S4D-Inv, S4D-Lin).

Math (paper notation):

    A[n, k] = -sqrt(2n+1) sqrt(2k+1)  (n > k),  -(n+1)  (n = k),  0  (n < k);   B[n] = sqrt(2n+1)
    P[n]    = sqrt(n + 1/2),   A + P P^T = -1/2 I + S   with S real skew-symmetric
    S = V diag(i w) V^H        (Hermitian eigensolver on -iS, so V is unitary)
    A = V (diag(Lambda) - Pt Pt^H) V^H,   Lambda = -1/2 + i w,   Pt = V^H P,   Bt = V^H B

Conjugate pairing: the eigenvalues of -iS come in pairs +-w. For even N the modes are ordered as
``[half, conj(half)]`` where ``half`` holds the N/2 eigenvalues with negative imaginary part (as the
official code keeps) and the second half of V is built as the *exact* conjugate of the first half's
eigenvectors (eigh returns arbitrary phases for the -w eigenvectors; pairing by value while keeping
those phases breaks the conjugate-symmetric kernel). Then ``Lambda[N/2:] = conj(Lambda[:N/2])`` and
likewise for ``Pt`` and ``Bt``, so the first N/2 entries are what a conjugate-symmetric
(``conj_sym=True``) kernel needs.

Deviation from the official code: no clipping of Im(Bt) (``B_clip``); the float64 reconstruction is
checked (error <= 1e-10) instead of a warning threshold of 1e-5.
"""

from __future__ import annotations

import numpy as np

INITS = ("legs", "lin", "inv", "random")


def _check_state_size(N: int) -> None:
    if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 1:
        raise ValueError(f"state size N must be a positive integer, got {N!r}")


def hippo_legs(N: int) -> tuple[np.ndarray, np.ndarray]:
    """HiPPO-LegS state matrix and input vector (S4 eq. 2).

    Args:
      N: state size (>= 1).
    Returns:
      ``(A, B)``: ``A`` of shape ``(N, N)`` and ``B`` of shape ``(N,)``, float64.
    """
    _check_state_size(N)
    q = np.sqrt(2.0 * np.arange(N) + 1.0)
    A = -np.tril(np.outer(q, q), k=-1) - np.diag(np.arange(N) + 1.0)
    return A, q.copy()


def legs_low_rank(N: int) -> np.ndarray:
    """The rank-1 term ``P[n] = sqrt(n + 1/2)`` that makes ``A + P P^T`` normal. Shape ``(N,)``."""
    _check_state_size(N)
    return np.sqrt(np.arange(N) + 0.5)


def legs_dplr(N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """DPLR form of HiPPO-LegS: ``A == V (diag(Lambda) - outer(P, conj(P))) V^H`` (S4 Cor. 3.1).

    Args:
      N: state size (>= 1). For even N the modes are conjugate-paired as ``[half, conj(half)]``.
    Returns:
      ``(Lambda, P, B, V)``, complex128: ``Lambda (N,)`` eigenvalues of the normal part,
      ``P (N,)`` and ``B (N,)`` expressed in the eigenbasis (``V^H P``, ``V^H B``), ``V (N, N)``
      unitary.
    Raises:
      ValueError: for a bad ``N`` or if the float64 reconstruction error exceeds 1e-10.
    """
    A, B = hippo_legs(N)
    P = legs_low_rank(N)
    normal = A + np.outer(P, P)
    S = normal + 0.5 * np.eye(N)                      # real skew-symmetric part
    w, U = np.linalg.eigh(-1j * S)                    # -iS Hermitian: S = U diag(i w) U^H
    if N % 2 == 0:
        # eigh sorts w ascending: the first N/2 are the negative ones (pairs with the last N/2).
        half = U[:, : N // 2]
        w_half = w[: N // 2]
        if np.any(w_half >= 0):
            raise ValueError("HiPPO-LegS skew part has a zero eigenvalue; cannot pair modes")
        V = np.concatenate([half, half.conj()], axis=1)
        w = np.concatenate([w_half, -w_half])
    else:
        V = U
    Lambda = -0.5 + 1j * w
    Pt = V.conj().T @ P
    Bt = V.conj().T @ B
    recon = V @ (np.diag(Lambda) - np.outer(Pt, Pt.conj())) @ V.conj().T
    err = np.max(np.abs(recon - A)) / max(1.0, np.max(np.abs(A)))
    if not err <= 1e-10:
        raise ValueError(f"DPLR reconstruction error {err:.3g} exceeds 1e-10 for N={N}")
    return Lambda, Pt, Bt, V


def s4d_init(N: int, init: str = "legs", *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Diagonal (S4D) initialisations: the N/2 stored modes of a conjugate-symmetric system.

    * ``'legs'`` (S4D-LegS): the eigenvalues of the normal part of HiPPO-LegS (the DPLR
      ``Lambda`` with the low-rank term dropped) and ``B = V^H B_legs``.
    * ``'lin'`` (S4D-Lin): ``lambda_n = -1/2 + i pi n``, ``B = 1``.
    * ``'inv'`` (S4D-Inv): ``lambda_n = -1/2 + i (N/pi) (N/(2n+1) - 1)``, ``B = 1``.
    * ``'random'``: ``lambda_n = -1/2 + i pi u_n``, ``u_n ~ Uniform[0, N/2)`` sorted (random
      frequencies with S4D-Lin's range; an lrx baseline, not from the paper), ``B = 1``.

    Args:
      N: full state size (even, >= 2); ``N/2`` modes are returned.
      init: one of ``INITS``.
      seed: seed of the ``'random'`` init.
    Returns:
      ``(Lambda, B)``, complex128, each of shape ``(N/2,)``.
    """
    _check_state_size(N)
    if N % 2:
        raise ValueError(f"S4D inits store N/2 conjugate modes: N must be even, got {N}")
    if init not in INITS:
        raise ValueError(f"init={init!r} is not valid. Valid choices: {', '.join(INITS)}")
    n = np.arange(N // 2)
    ones = np.ones(N // 2, dtype=np.complex128)
    if init == "legs":
        Lambda, _, B, _ = legs_dplr(N)
        return Lambda[: N // 2], B[: N // 2]
    if init == "lin":
        return -0.5 + 1j * np.pi * n, ones
    if init == "inv":
        return -0.5 + 1j * (N / np.pi) * (N / (2 * n + 1) - 1), ones
    u = np.sort(np.random.default_rng(seed).uniform(0.0, N / 2, size=N // 2))
    return -0.5 + 1j * np.pi * u, ones
