"""Recurrent (step-by-step) view of S4 and S4D: ``x_k = Abar x_{k-1} + Bbar u_k``, ``y_k = C x_k``.

Reference: S4, arXiv 2111.00396, eq. (3) and App. C.2 ("computing the discrete representation"):
for ``A = Lambda - P Q^H`` the bilinear step never forms a dense matrix,

    A0 = (2/D) I + A,      Dg = diag(1 / (2/D - Lambda)),
    A1 = (2/D I - A)^-1 = Dg - Dg P (I + Q^H Dg P)^-1 Q^H Dg       (Woodbury),
    Abar = A1 A0,          Bbar = 2 A1 B,

so ``x_k = A1 (A0 x_{k-1} + 2 B u_k)`` costs O(n r) per step. The output matrix for stepping is
``C = Ct (I - Abar^L)^-1`` recovered once from the trained C-tilde (:func:`c_from_ctilde`).

With ``conj_sym=True`` only the first half ``x`` of the conjugate-symmetric state ``[x, conj x]``
is carried (real inputs keep it conjugate-symmetric); every inner product over the full state
becomes ``2 Re(sum over the half)``. Outputs are real: ``Re(C x)`` (``2 Re`` with conj_sym).

Functions take leading batch dims ``...`` (e.g. batch x H channels) that broadcast between the
step parameters and the state.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lrx.ssm import kernels


class DPLRStep(NamedTuple):
    """Precomputed O(n) step of a DPLR SSM. Shapes: ``(..., n)``; ``P, Q (..., r, n)``;
    ``W (..., r, r)`` = ``(I + Q^H Dg P)^-1``; ``two_over_step (...)``."""

    Lambda: jax.Array
    P: jax.Array
    Q: jax.Array
    B: jax.Array
    C: jax.Array
    d: jax.Array
    W: jax.Array
    two_over_step: jax.Array


class DiagStep(NamedTuple):
    """Precomputed step of a diagonal SSM: ``Abar, Bbar, C``, each ``(..., n)``."""

    Abar: jax.Array
    Bbar: jax.Array
    C: jax.Array


def _inner(a: jax.Array, x: jax.Array, conj_sym: bool) -> jax.Array:
    """``sum_n a_n x_n`` over the full state (``2 Re`` of the half with conj_sym)."""
    out = jnp.sum(a * x, -1)
    return 2 * jnp.real(out) if conj_sym else out


def dplr_step_params(Lambda, P, Q, B, Ctilde, step, L: int, conj_sym: bool = False,
                     C: jax.Array | None = None) -> DPLRStep:
    """Discretised O(n) step of ``A = diag(Lambda) - P Q^H`` from the kernel's parameters.

    Args:
      Lambda, B, Ctilde: ``(..., n)``; P, Q: ``(..., n)`` or ``(..., r, n)``; step: ``()`` or
        ``(...)``; L: the length ``Ctilde`` was formed for; conj_sym: as in
        :func:`lrx.ssm.dplr_kernel`; C: the stepping output matrix if already known (skips the
        dense recovery :func:`recover_c`).
    Returns:
      a :class:`DPLRStep`.
    """
    step = kernels._check_step(step)
    Lambda, B, Ctilde = kernels._complex(Lambda, B, Ctilde)
    P = kernels._low_rank(jnp.asarray(P, Lambda.dtype), Lambda)
    Q = kernels._low_rank(jnp.asarray(Q, Lambda.dtype), Lambda)
    step = jnp.asarray(step, jnp.real(Lambda).dtype)
    if C is None:
        C = recover_c(Lambda, P, Q, B, Ctilde, step, L, conj_sym)
    two_over_step = 2.0 / step
    d = 1.0 / (two_over_step[..., None] - Lambda)
    # (Q^H Dg P)[i, j] over the full state.
    QDP = jnp.sum(jnp.conj(Q)[..., :, None, :] * (d[..., None, :] * P)[..., None, :, :], -1)
    if conj_sym:
        QDP = 2 * jnp.real(QDP)
    r = P.shape[-2]
    W = jnp.linalg.inv(jnp.eye(r, dtype=Lambda.dtype) + QDP)
    return DPLRStep(Lambda, P, Q, B, C, d, W, two_over_step)


def recover_c(Lambda, P, Q, B, Ctilde, step, L: int, conj_sym: bool = False) -> jax.Array:
    """``C = Ct (I - Abar^L)^-1`` (dense, once per sequence); with conj_sym via the full system.
    Shapes ``(..., n)``; P, Q ``(..., n)`` or ``(..., r, n)``."""
    if not conj_sym:
        return kernels.c_from_ctilde(Lambda, P, Q, B, Ctilde, step, L)
    Lambda = jnp.asarray(Lambda)
    P = kernels._low_rank(P, Lambda)
    Q = kernels._low_rank(Q, Lambda)
    full = [kernels.expand_conj(x) for x in (Lambda, P, Q, B, Ctilde)]
    return kernels.c_from_ctilde(*full, step, L)[..., : Lambda.shape[-1]]


def diag_step_params(Lambda, B, C, step, method: str = "zoh") -> DiagStep:
    """Discretised step of a diagonal SSM (S4D); shapes ``(..., n)``."""
    Abar, Bbar = kernels.discretize_diag(Lambda, B, step, method)
    return DiagStep(Abar, Bbar, jnp.asarray(C, Abar.dtype))


def init_state(params: DPLRStep | DiagStep, batch_shape: tuple[int, ...] = ()) -> jax.Array:
    """Zero state of shape ``batch_shape + params' (..., n)``."""
    ref = params.Lambda if isinstance(params, DPLRStep) else params.Abar
    return jnp.zeros(tuple(batch_shape) + ref.shape, ref.dtype)


def step(params: DPLRStep | DiagStep, x: jax.Array, u: jax.Array, conj_sym: bool = False
         ) -> tuple[jax.Array, jax.Array]:
    """One recurrence step. ``x (..., n)`` complex state, ``u (...)`` real input.

    Returns ``(x_new (..., n), y (...))`` with ``y = Re(C x_new)`` (``2 Re`` with conj_sym).
    """
    u = jnp.asarray(u)
    if isinstance(params, DiagStep):
        x = params.Abar * x + params.Bbar * u[..., None]
        return x, jnp.real(_inner(params.C, x, conj_sym))
    p = params
    qx = _inner(jnp.conj(p.Q), x[..., None, :], conj_sym)                     # (..., r)
    v = (p.two_over_step[..., None] + p.Lambda) * x \
        - jnp.sum(p.P * qx[..., :, None], -2) + 2 * p.B * u[..., None]        # A0 x + 2 B u
    dv = p.d * v
    qdv = _inner(jnp.conj(p.Q), dv[..., None, :], conj_sym)                   # (..., r)
    wq = jnp.einsum("...ij,...j->...i", p.W, qdv.astype(p.W.dtype))
    x = dv - p.d * jnp.sum(p.P * wq[..., :, None], -2)                        # A1 v
    return x, jnp.real(_inner(p.C, x, conj_sym))


def scan(params: DPLRStep | DiagStep, u: jax.Array, conj_sym: bool = False,
         x0: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Runs the recurrence over the last axis of ``u (..., L)``; returns ``(y (..., L), x_L)``."""
    u = jnp.asarray(u)
    x = init_state(params, u.shape[:-1]) if x0 is None else x0
    x = jnp.broadcast_to(x, jnp.broadcast_shapes(x.shape, u.shape[:-1] + x.shape[-1:]))

    def body(x, uk):
        x, y = step(params, x, uk, conj_sym)
        return x, y

    x, y = jax.lax.scan(body, x, jnp.moveaxis(u, -1, 0))
    return jnp.moveaxis(y, 0, -1), x
