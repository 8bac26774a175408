"""S4 / S4D convolution kernels: bilinear discretisation, the C-tilde correction, the DPLR kernel
via the truncated generating function at roots of unity (one shared Cauchy matrix for all Woodbury
numerators, chunked over frequency nodes), the naive powering reference, and the S4D Vandermonde
kernel.

References: S4, A. Gu, K. Goel, C. Re, arXiv 2111.00396 (eqs. 3-5 discretisation and kernel,
Lemma C.2 generating function, Lemma C.3 Woodbury, Alg. 1); S4D, arXiv 2206.11893 (eqs. 5-7).

Conventions: one SISO SSM per channel; every function accepts leading batch dims ``...`` (e.g. H
channels). ``Lambda (..., n)``; the low-rank factors ``P, Q`` are ``(..., n)`` for rank 1 or
``(..., r, n)`` for rank r (decided by their ndim relative to ``Lambda``); the state matrix is
``A = diag(Lambda) - sum_j P_j Q_j^H``. ``step`` (Delta) is a scalar or ``(...)``.

Kernel math (S4 Lemma C.2/C.3). With bilinear ``Abar = (I - D/2 A)^-1 (I + D/2 A)``,
``Bbar = (I - D/2 A)^-1 D B`` and ``Ct = C (I - Abar^L)``, the DFT of ``K[l] = C Abar^l Bbar`` is
``Khat(z_k) = Ct (I - Abar z_k)^-1 Bbar`` at ``z_k = exp(-2 pi i k / L)``. We use

    (I - Abar z)^-1 Bbar = D [ (1-z) I - s A ]^-1 B,        s = D (1+z) / 2,

which equals the paper's ``2/(1+z) [g(z) I - A]^-1 B`` with ``g = (2/D)(1-z)/(1+z)`` (the bilinear
factor 2/(1+z) is absorbed into the Cauchy denominators ``d_n = (1-z) - s lambda_n``), but has no
0 * inf at the node z = -1. Woodbury with ``A = Lambda - P Q^H``:

    Khat(z) = D [ k_CB - s k_CP (I + s k_QP)^-1 k_QB ],   k_ab(z) = sum_n a_n b_n / d_n(z),

one Cauchy matrix ``1/d_n(z)`` (nodes x modes) contracted with all (1+r)^2 numerators ``a_n b_n``
(a in {Ct, conj Q_1..r}, b in {B, P_1..r}). With ``conj_sym=True`` the n inputs are the first half
of a conjugate-symmetric system of 2n modes (``[x, conj x]``); each Cauchy sum runs over pairs
``v/d(lambda) + conj(v)/d(conj lambda)`` and, the kernel being real, only L//2+1 nodes are evaluated
and inverted with ``irfft``. Otherwise all L nodes are used and ``K = Re(ifft(Khat))``, which is
``Re(C Abar^l Bbar)``.

Memory: with ``chunk_size`` the nodes are processed in chunks with ``lax.map`` under
``jax.checkpoint``, so the peak temporary is ``(..., chunk_size, n)`` instead of ``(..., L, n)``
(forward and backward).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

DISCRETIZATIONS = ("zoh", "bilinear")


# ----------------------------------------------------------------------------- input checks

def _check_length(L) -> int:
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L <= 0:
        raise ValueError(f"kernel length L must be a positive integer, got {L!r}")
    return int(L)


def _check_step(step) -> jax.Array:
    if not isinstance(step, jax.core.Tracer):
        s = np.asarray(step)
        if not np.all(np.isfinite(s)) or np.any(s <= 0):
            raise ValueError(f"step (Delta) must be finite and > 0, got {step!r}")
    return jnp.asarray(step)


def _low_rank(X, Lambda) -> jax.Array:
    """``(..., n)`` -> ``(..., 1, n)``; ``(..., r, n)`` unchanged."""
    X = jnp.asarray(X)
    if X.ndim == Lambda.ndim:
        return X[..., None, :]
    if X.ndim == Lambda.ndim + 1:
        return X
    raise ValueError(f"low-rank factor must have shape (..., n) or (..., r, n) with Lambda "
                     f"(..., n); got {X.shape} with Lambda {Lambda.shape}")


def _complex(*xs):
    dtype = jnp.result_type(*xs, jnp.complex64)
    return [jnp.asarray(x, dtype) for x in xs]


def expand_conj(x: jax.Array, axis: int = -1) -> jax.Array:
    """``[x, conj(x)]`` along ``axis``: the full system of a conjugate-symmetric half."""
    return jnp.concatenate([x, jnp.conj(x)], axis=axis)


# ----------------------------------------------------------------------------- dense views

def dplr_matrix(Lambda: jax.Array, P: jax.Array, Q: jax.Array) -> jax.Array:
    """Dense ``A = diag(Lambda) - sum_j P_j Q_j^H``. Shapes: ``(..., n)`` -> ``(..., n, n)``."""
    Lambda = jnp.asarray(Lambda)
    P, Q = _low_rank(P, Lambda), _low_rank(Q, Lambda)
    n = Lambda.shape[-1]
    return Lambda[..., :, None] * jnp.eye(n) - jnp.einsum("...rn,...rm->...nm", P, jnp.conj(Q))


def discretize_bilinear(Lambda, P, Q, B, step) -> tuple[jax.Array, jax.Array]:
    """Dense bilinear discretisation (S4 eq. 3) of ``A = diag(Lambda) - P Q^H``.

    ``Abar = (I - step/2 A)^-1 (I + step/2 A)``, ``Bbar = (I - step/2 A)^-1 step B``.

    Args:
      Lambda: ``(..., n)``; P, Q: ``(..., n)`` or ``(..., r, n)``; B: ``(..., n)``; step: ``()``
        or ``(...)``, > 0.
    Returns:
      ``(Abar (..., n, n), Bbar (..., n))``, complex.
    """
    step = _check_step(step)
    Lambda, P, Q, B = _complex(Lambda, P, Q, B)
    A = dplr_matrix(Lambda, P, Q)
    n = Lambda.shape[-1]
    half = (step / 2)[..., None, None]
    left = jnp.eye(n) - half * A
    Abar = jnp.linalg.solve(left, jnp.eye(n) + half * A)
    Bbar = jnp.linalg.solve(left, (step[..., None] * B)[..., None])[..., 0]
    return Abar, Bbar


def _power(Abar: jax.Array, L: int) -> jax.Array:
    return jnp.linalg.matrix_power(Abar, L)


def ctilde(Lambda, P, Q, B, C, step, L: int) -> jax.Array:
    """The C-tilde correction ``Ct = C (I - Abar^L)`` (S4 Lemma C.2). Shapes ``(..., n)``."""
    L = _check_length(L)
    Abar, _ = discretize_bilinear(Lambda, P, Q, B, step)
    C = jnp.asarray(C, Abar.dtype)
    return C - jnp.einsum("...n,...nm->...m", C, _power(Abar, L))


def c_from_ctilde(Lambda, P, Q, B, Ctilde, step, L: int) -> jax.Array:
    """Inverse of :func:`ctilde`: ``C = Ct (I - Abar^L)^-1`` (a linear solve; ill-conditioned
    when ``Abar^L ~ I``, i.e. very small ``step * L``). Shapes ``(..., n)``."""
    L = _check_length(L)
    Abar, _ = discretize_bilinear(Lambda, P, Q, B, step)
    Ctilde = jnp.asarray(Ctilde, Abar.dtype)
    M = jnp.eye(Abar.shape[-1]) - _power(Abar, L)
    return jnp.linalg.solve(jnp.swapaxes(M, -1, -2), Ctilde[..., None])[..., 0]


def krylov_kernel(Abar: jax.Array, Bbar: jax.Array, C: jax.Array, L: int) -> jax.Array:
    """Naive kernel by powering: ``K[l] = Re(C Abar^l Bbar)``, O(n^2 L) (S4 eq. 5).

    ``lax.scan`` of ``x <- Abar x`` emitting ``C x``. Shapes: ``Abar (..., n, n)``, ``Bbar, C
    (..., n)`` -> ``K (..., L)``.
    """
    L = _check_length(L)

    def body(x, _):
        return jnp.einsum("...nm,...m->...n", Abar, x), jnp.real(jnp.sum(C * x, -1))

    _, K = jax.lax.scan(body, jnp.asarray(Bbar), None, length=L)
    return jnp.moveaxis(K, 0, -1)


# ----------------------------------------------------------------------------- DPLR kernel

def _nodes(L: int, conj_sym: bool) -> np.ndarray:
    count = L // 2 + 1 if conj_sym else L
    return np.exp(-2j * np.pi * np.arange(count) / L)


def _chunked(fn, z: np.ndarray, chunk_size: int | None, dtype) -> jax.Array:
    """``fn(z_chunk (c,)) -> (..., c)`` over all nodes, in chunks of ``chunk_size``."""
    m = z.shape[0]
    if chunk_size is None or chunk_size >= m:
        return fn(jnp.asarray(z, dtype))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) \
            or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive integer or None, got {chunk_size!r}")
    chunks = math.ceil(m / chunk_size)
    zp = np.concatenate([z, np.zeros(chunks * chunk_size - m, z.dtype)])  # z=0 pads are harmless
    out = jax.lax.map(jax.checkpoint(fn), jnp.asarray(zp.reshape(chunks, chunk_size), dtype))
    out = jnp.moveaxis(out, 0, -2)                        # (..., chunks, c)
    return out.reshape(*out.shape[:-2], chunks * chunk_size)[..., :m]


def _dplr_khat(Lambda, P, Q, B, Ctilde, step, z, conj_sym: bool) -> jax.Array:
    """Generating function ``Khat(z)``, one shared Cauchy matrix. z: ``(c,)`` -> ``(..., c)``."""
    r = P.shape[-2]
    left = jnp.concatenate([Ctilde[..., None, :], jnp.conj(Q)], axis=-2)     # (..., 1+r, n)
    right = jnp.concatenate([B[..., None, :], P], axis=-2)                   # (..., 1+r, n)
    v = left[..., :, None, :] * right[..., None, :, :]                       # (..., 1+r, 1+r, n)
    v = v.reshape(*v.shape[:-3], (1 + r) ** 2, v.shape[-1])
    s = step[..., None] * (1 + z) / 2                                         # (..., c)
    one_minus_z = (1 - z)[:, None]
    cauchy = 1.0 / (one_minus_z - s[..., None] * Lambda[..., None, :])        # (..., c, n)
    k = jnp.einsum("...cn,...mn->...cm", cauchy, v)
    if conj_sym:
        cauchy_c = 1.0 / (one_minus_z - s[..., None] * jnp.conj(Lambda)[..., None, :])
        k = k + jnp.einsum("...cn,...mn->...cm", cauchy_c, jnp.conj(v))
    k = k.reshape(*k.shape[:-1], 1 + r, 1 + r)
    k_cb, k_cp, k_qb, k_qp = k[..., 0, 0], k[..., 0, 1:], k[..., 1:, 0], k[..., 1:, 1:]
    if r == 1:
        corr = s * k_cp[..., 0] * k_qb[..., 0] / (1 + s * k_qp[..., 0, 0])
    else:
        eye = jnp.eye(r, dtype=k.dtype)
        sol = jnp.linalg.solve(eye + s[..., None, None] * k_qp, k_qb[..., None])[..., 0]
        corr = s * jnp.sum(k_cp * sol, -1)
    return step[..., None] * (k_cb - corr)


def dplr_kernel(Lambda, P, Q, B, Ctilde, step, L: int, conj_sym: bool = False, *,
                chunk_size: int | None = None) -> jax.Array:
    """S4 convolution kernel of ``A = diag(Lambda) - P Q^H`` (S4 Alg. 1), real, length L.

    ``K[l] = Re(C Abar^l Bbar)`` with ``Ctilde = C (I - Abar^L)`` given (the trained parameter).

    Args:
      Lambda: ``(..., n)``. P, Q: ``(..., n)`` (rank 1) or ``(..., r, n)``. B, Ctilde:
        ``(..., n)``. step: ``()`` or ``(...)``, > 0. L: kernel length (> 0).
      conj_sym: the n modes are half of a conjugate-symmetric 2n-mode system; returns that
        system's (real) kernel from L//2+1 nodes and ``irfft``.
      chunk_size: process the frequency nodes in chunks of this size (bounded memory).
    Returns:
      ``K (..., L)`` real.
    """
    L = _check_length(L)
    step = _check_step(step)
    Lambda, B, Ctilde = _complex(Lambda, B, Ctilde)
    P = _low_rank(jnp.asarray(P, Lambda.dtype), Lambda)
    Q = _low_rank(jnp.asarray(Q, Lambda.dtype), Lambda)
    step = jnp.asarray(step, jnp.real(Lambda).dtype)
    z = _nodes(L, conj_sym)
    khat = _chunked(lambda zc: _dplr_khat(Lambda, P, Q, B, Ctilde, step, zc, conj_sym),
                    z, chunk_size, Lambda.dtype)
    if conj_sym:
        return jnp.fft.irfft(khat, n=L, axis=-1)
    return jnp.real(jnp.fft.ifft(khat, axis=-1))


def _cauchy_sum(v, Lambda, step, z, conj_sym: bool) -> jax.Array:
    """One Cauchy sum ``sum_n v_n / d_n(z)`` with its own matrix. ``(..., n)`` -> ``(..., c)``."""
    s = step[..., None] * (1 + z) / 2
    one_minus_z = (1 - z)[:, None]
    out = jnp.sum(v[..., None, :] / (one_minus_z - s[..., None] * Lambda[..., None, :]), -1)
    if conj_sym:
        den = one_minus_z - s[..., None] * jnp.conj(Lambda)[..., None, :]
        out = out + jnp.sum(jnp.conj(v)[..., None, :] / den, -1)
    return out


def dplr_kernel_separate(Lambda, P, Q, B, Ctilde, step, L: int, conj_sym: bool = False
                         ) -> jax.Array:
    """Same kernel as :func:`dplr_kernel` (rank 1) but with four separate Cauchy sums, each
    forming its own ``(..., L, n)`` matrix (the Annotated-S4 style; a benchmark baseline)."""
    L = _check_length(L)
    step = _check_step(step)
    Lambda, P, Q, B, Ctilde = _complex(Lambda, P, Q, B, Ctilde)
    if P.ndim != Lambda.ndim or Q.ndim != Lambda.ndim:
        raise ValueError("dplr_kernel_separate supports rank 1 only (P, Q of shape (..., n))")
    step = jnp.asarray(step, jnp.real(Lambda).dtype)
    z = jnp.asarray(_nodes(L, conj_sym), Lambda.dtype)
    s = step[..., None] * (1 + z) / 2
    k_cb = _cauchy_sum(Ctilde * B, Lambda, step, z, conj_sym)
    k_cp = _cauchy_sum(Ctilde * P, Lambda, step, z, conj_sym)
    k_qb = _cauchy_sum(jnp.conj(Q) * B, Lambda, step, z, conj_sym)
    k_qp = _cauchy_sum(jnp.conj(Q) * P, Lambda, step, z, conj_sym)
    khat = step[..., None] * (k_cb - s * k_cp * k_qb / (1 + s * k_qp))
    if conj_sym:
        return jnp.fft.irfft(khat, n=L, axis=-1)
    return jnp.real(jnp.fft.ifft(khat, axis=-1))


# ----------------------------------------------------------------------------- S4D

def discretize_diag(Lambda, B, step, method: str = "zoh") -> tuple[jax.Array, jax.Array]:
    """Diagonal discretisation (S4D eq. 6). ``Lambda, B (..., n)``, step ``()``/``(...)``.

    ZOH: ``Abar = exp(D lambda)``, ``Bbar = (exp(D lambda) - 1)/lambda B``; bilinear:
    ``Abar = (1 + D lambda/2)/(1 - D lambda/2)``, ``Bbar = D B/(1 - D lambda/2)``.
    Returns ``(Abar, Bbar)``, each ``(..., n)``.
    """
    if method not in DISCRETIZATIONS:
        raise ValueError(f"method={method!r} is not valid. Valid choices: "
                         f"{', '.join(DISCRETIZATIONS)}")
    step = _check_step(step)
    Lambda, B = _complex(Lambda, B)
    dtA = jnp.asarray(step, jnp.real(Lambda).dtype)[..., None] * Lambda
    if method == "zoh":
        Abar = jnp.exp(dtA)
        return Abar, (Abar - 1) / Lambda * B
    return (1 + dtA / 2) / (1 - dtA / 2), step[..., None] * B / (1 - dtA / 2)


def s4d_kernel(Lambda, B, C, step, L: int, method: str = "zoh", conj_sym: bool = False
               ) -> jax.Array:
    """S4D kernel by a Vandermonde product (S4D eq. 7): ``K[l] = Re(sum_n C_n Bbar_n Abar_n^l)``
    (``2 Re`` of the half with ``conj_sym=True``). Shapes: ``(..., n)`` -> ``K (..., L)``."""
    L = _check_length(L)
    Abar, Bbar = discretize_diag(Lambda, B, step, method)
    C = jnp.asarray(C, Abar.dtype)
    log_abar = jnp.log(Abar)
    vander = jnp.exp(log_abar[..., None] * jnp.arange(L))             # (..., n, L)
    K = jnp.real(jnp.einsum("...n,...nl->...l", C * Bbar, vander))
    return 2 * K if conj_sym else K
