"""Independent NumPy float64 references for the S4 tests (written from the paper's formulas)."""

import numpy as np


def legs_closed_form(N):
    A = np.zeros((N, N))
    B = np.zeros(N)
    for n in range(N):
        B[n] = np.sqrt(2 * n + 1)
        for k in range(N):
            if n > k:
                A[n, k] = -np.sqrt(2 * n + 1) * np.sqrt(2 * k + 1)
            elif n == k:
                A[n, k] = -(n + 1)
    return A, B


def dense_A(Lambda, P, Q):
    """diag(Lambda) - sum_j P_j Q_j^H with P, Q of shape (n,) or (r, n)."""
    P = np.atleast_2d(P)
    Q = np.atleast_2d(Q)
    A = np.diag(Lambda).astype(np.complex128)
    for p, q in zip(P, Q, strict=True):
        A = A - np.outer(p, q.conj())
    return A


def bilinear(A, B, step):
    n = A.shape[0]
    left = np.linalg.inv(np.eye(n) - step / 2 * A)
    return left @ (np.eye(n) + step / 2 * A), left @ (step * B)


def power_kernel(Abar, Bbar, C, L):
    """Re(C Abar^l Bbar), l < L, by repeated multiplication."""
    out = np.zeros(L)
    x = Bbar.astype(np.complex128)
    for i in range(L):
        out[i] = np.real(C @ x)
        x = Abar @ x
    return out


def causal_conv(u, K):
    L = len(u)
    return np.array([sum(K[t - s] * u[s] for s in range(t + 1)) for t in range(L)])


def random_stable_system(rng, n, rank=1, conj_pairs=False):
    """Random Lambda (Re < 0), P, Q (rank r), B, C; conjugate-paired when conj_pairs (n even)."""
    m = n // 2 if conj_pairs else n
    Lam = -rng.uniform(0.2, 1.0, m) + 1j * rng.normal(0, 3, m)
    cplx = lambda *s: rng.normal(size=s) + 1j * rng.normal(size=s)  # noqa: E731
    P, Q, B, C = cplx(rank, m) * 0.5, cplx(rank, m) * 0.5, cplx(m), cplx(m)
    if conj_pairs:
        pair = lambda x: np.concatenate([x, x.conj()], -1)  # noqa: E731
        Lam, P, Q, B, C = map(pair, (Lam, P, Q, B, C))
    return Lam, P, Q, B, C
