"""Behavioural metrics that compare in-context learners with reference algorithms.

Reference: E. Akyürek, D. Schuurmans, J. Andreas, T. Ma, D. Zhou, "What learning algorithm is
in-context learning? Investigations with linear models", ICLR 2023, arXiv 2211.15661, Sec. 4.1
and App. F.

Shapes: predictions are ``(B, n)`` (prompt, prefix ``k``) or ``(B, n, m)`` (``m`` probe inputs per
prompt and prefix); every curve returned is ``(n,)``, one value per prefix ``k``.

  * :func:`spd` -- squared prediction difference ``SPD(A1, A2) = E_{D, x'} (A1(D)(x') -
    A2(D)(x'))^2``, divided by ``d`` ("dimension-normalised", as in the paper's plots).
  * :func:`implicit_weights` -- ``w_A = argmin_w sum_j (A(D)(x'_j) - w^T x'_j)^2`` over probe inputs
    ``x'_j`` (minimum-norm least squares), and the ``R^2`` of that fit (App. F, "linearity").
  * :func:`ilwd` -- implicit linear weight difference ``E_D ||w_A1 - w_A2||^2``. Not divided by
    ``d`` (the paper's definition); for linear learners pass their exact weights.
  * :func:`mspd` -- SPD averaged over a range of prefixes; the paper's MSPD is the average over
    the under-determined region ``1 <= k < d`` (Figs. 2-3), :func:`underdetermined_mspd`.
  * :func:`cosine` -- mean cosine similarity of two learners' (implicit) weights per prefix, the
    alignment von Oswald et al. report between a trained linear self-attention layer and one GD
    step ("Transformers learn in-context by gradient descent", ICML 2023, arXiv 2212.07677,
    Sec. 3).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _reduce_to_prefix(values: jax.Array) -> jax.Array:
    """Mean over every axis but axis 1 (the prefix axis): ``(B, n, ...) -> (n,)``."""
    if values.ndim < 2:
        raise ValueError(f"expected (B, n[, m]) values, got shape {values.shape}")
    axes = (0,) + tuple(range(2, values.ndim))
    return jnp.mean(values, axis=axes)


def spd(pred_a: jax.Array, pred_b: jax.Array, dim: int) -> jax.Array:
    """Dimension-normalised squared prediction difference per prefix.

    Args:
      pred_a, pred_b: ``(B, n)`` or ``(B, n, m)`` predictions of two learners on the same prompts
        and query inputs.
      dim: d, the input dimension (the normaliser).
    Returns:
      ``(n,)``: ``mean_{prompts, queries} (a - b)^2 / d``.
    """
    if pred_a.shape != pred_b.shape:
        raise ValueError(f"prediction shapes differ: {pred_a.shape} vs {pred_b.shape}")
    return _reduce_to_prefix((pred_a - pred_b) ** 2) / dim


def implicit_weights(preds: jax.Array, probes: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Least-squares linear fit of a learner's outputs on probe inputs, and its ``R^2``.

    Args:
      preds: ``(..., m)`` outputs at the probes.
      probes: ``(..., m, d)`` probe inputs (use ``m > d`` for a meaningful ``R^2``).
    Returns:
      ``(w, r2)``: ``w (..., d)`` (minimum-norm least squares, no intercept) and
      ``r2 (...)`` = ``1 - sum (pred - w^T x')^2 / sum (pred - mean pred)^2`` (1 where the outputs
      are constant and exactly fitted).
    """
    w = jnp.einsum("...dm,...m->...d", jnp.linalg.pinv(probes), preds)
    resid = preds - jnp.einsum("...md,...d->...m", probes, w)
    ss_res = jnp.sum(resid**2, axis=-1)
    ss_tot = jnp.sum((preds - jnp.mean(preds, axis=-1, keepdims=True)) ** 2, axis=-1)
    tiny = jnp.finfo(preds.dtype).tiny
    r2 = jnp.where(ss_tot > tiny, 1.0 - ss_res / jnp.maximum(ss_tot, tiny),
                   jnp.where(ss_res <= tiny, 1.0, 0.0))
    return w, r2


def ilwd(weights_a: jax.Array, weights_b: jax.Array) -> jax.Array:
    """Implicit linear weight difference per prefix: weights ``(B, n, d)`` -> ``(n,)``,
    ``mean_prompts ||w_a - w_b||^2``."""
    if weights_a.shape != weights_b.shape:
        raise ValueError(f"weight shapes differ: {weights_a.shape} vs {weights_b.shape}")
    return jnp.mean(jnp.sum((weights_a - weights_b) ** 2, axis=-1), axis=0)


def mspd(curve: jax.Array, k_min: int = 1, k_max: int | None = None) -> jax.Array:
    """Mean of a per-prefix curve ``(n,)`` over ``k_min <= k < k_max`` (default: to the end).

    For the paper's MSPD pass ``k_max = d`` (the under-determined region ``k < d``).
    """
    n = curve.shape[0]
    k_max = n if k_max is None else min(k_max, n)
    if not 0 <= k_min < k_max:
        raise ValueError(f"empty prefix range [{k_min}, {k_max}) for a curve of length {n}")
    return curve[k_min:k_max].mean()  # NumPy in (float64 kept), NumPy out; JAX in, JAX out


def underdetermined_mspd(curve: jax.Array, dim: int) -> jax.Array:
    """The paper's MSPD: the mean of ``curve (n,)`` over the under-determined prefixes
    ``1 <= k < d`` (``k = 1`` alone when ``d = 1``, so the range is never empty)."""
    return mspd(curve, 1, max(dim, 2))


def cosine(weights_a: jax.Array, weights_b: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Mean cosine similarity per prefix: weights ``(B, n, d)`` -> ``(n,)``,
    ``mean_prompts <w_a, w_b> / (||w_a|| ||w_b|| + eps)`` (``eps`` keeps zero weights at 0)."""
    if weights_a.shape != weights_b.shape:
        raise ValueError(f"weight shapes differ: {weights_a.shape} vs {weights_b.shape}")
    dot = jnp.sum(weights_a * weights_b, axis=-1)
    norms = jnp.linalg.norm(weights_a, axis=-1) * jnp.linalg.norm(weights_b, axis=-1)
    return jnp.mean(dot / (norms + eps), axis=0)


def linearity_r2(preds: jax.Array, probes: jax.Array) -> jax.Array:
    """Mean ``R^2`` of the best linear fit per prefix: preds ``(B, n, m)``, probes
    ``(B, n, m, d)`` -> ``(n,)``."""
    _, r2 = implicit_weights(preds, probes)
    return jnp.mean(r2, axis=0)


def error_curve(preds: jax.Array, targets: jax.Array, dim: int) -> jax.Array:
    """Dimension-normalised squared error against the targets per prefix: ``(B, n) -> (n,)``."""
    return spd(preds, targets, dim)


__all__ = ["spd", "implicit_weights", "ilwd", "mspd", "underdetermined_mspd", "cosine",
           "linearity_r2", "error_curve"]
