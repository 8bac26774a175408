"""Spectral diagnostics of weights, gradients and updates for low-rank training research.

Every function is a pure function of arrays, works on one matrix ``(m, n)`` or on a stacked batch
``(..., m, n)`` (e.g. the leading layer axis of scanned blocks), and runs under ``jax.jit``. The
metrics act on a spectrum ``s`` (``(..., r)`` singular values, e.g. from :func:`singular_values`)
so that one SVD feeds many metrics.

What is implemented, and from where:

* :func:`singular_values` / :func:`randomized_svd` -- exact SVD, or the randomized range finder with
  power iterations of Halko, Martinsson & Tropp, "Finding structure with randomness" (arXiv
  0909.4061, Algorithms 4.4 and 5.1) for the top-k part of large matrices (``randomized_svd`` is
  :func:`lrx.optim.subspace.randomized_svd`, the one implementation GaLore's randomized projector
  shares).
* :func:`effective_rank` -- RankMe ("RankMe: Assessing the downstream performance of pretrained
  self-supervised representations by their rank", Garrido et al., arXiv 2210.02157, Eq. 1):
  ``p_k = sigma_k / ||sigma||_1 + eps``, ``RankMe = exp(-sum_k p_k log p_k)`` with ``eps = 1e-7``
  (the effective rank of Roy & Vetterli, 2007).
* :func:`stable_rank` -- ``||W||_F^2 / ||W||_2^2 = sum_k sigma_k^2 / sigma_1^2``.
* :func:`top_r_energy` / :func:`rank_at_energy` -- the fraction of ``||W||_F^2`` captured by the
  top-r singular directions (what a rank-r GaLore projector keeps of a gradient, "GaLore:
  Memory-Efficient LLM Training by Gradient Low-Rank Projection", Zhao et al., arXiv 2403.03507),
  and the smallest r that captures a given fraction.
* :func:`principal_angles` / :func:`subspace_overlap` -- principal angles between column spaces
  (Björck & Golub, 1973: the cosines are the singular values of ``Q_a^T Q_b``) and their mean
  squared cosine, e.g. the overlap of consecutive GaLore projectors.
* :func:`welore_rank_reduction` / :func:`welore_threshold` / :func:`welore_classify` -- WeLore
  ("From GaLore to WeLore: How Low-Rank Weights Non-uniformly Emerge from Low-Rank Gradients",
  Jaiswal et al., arXiv 2407.11239): each matrix's singular values are min-max normalised,
  ``s_hat = (s - min s) / (max s - min s)``; the ones below a global threshold ``tau`` form the
  heavy tail that is dropped, so the matrix's rank-reduction ratio is ``#{s_hat < tau} / r``;
  ``tau`` is set by the target total rank reduction over the model; a matrix whose reduction ratio
  exceeds ``min_ratio`` is a Low-Rank Component (LRC), the others are Non-Low-Rank Components
  (N-LRC). Deviation: the official code keeps a hand-tuned table of ``tau`` per target reduction for
  LLaMA-2; here ``tau`` is computed exactly as the quantile of the pooled normalised singular values
  at the target fraction (the total reduction is ``#{pooled s_hat < tau} / #pooled``).
  ``min_ratio`` defaults to 0.4, the value hard-coded in the official code's selective reduction
  (its command-line default is 0.0); the paper does not fix a single number for all settings.
* :func:`intruder_dimensions` -- "LoRA vs Full Fine-tuning: An Illusion of Equivalence"
  (Shuttleworth et al., arXiv 2410.21228, Sec. 3): a singular vector ``y_j`` among the top-k of the
  tuned matrix is an intruder dimension iff ``max_i |cos(y_j, x_i)| < epsilon`` over all singular
  vectors ``x_i`` of the pre-trained matrix. As in the authors' code: left singular vectors of the
  PyTorch ``(out, in)`` weight (= the *right* singular vectors of a Flax ``(in, out)`` kernel, use
  ``side='right'`` for lrx kernels), absolute cosines, ``k = 10`` by default; the paper sweeps
  ``epsilon``, 0.5 is the default here.
* :func:`layer_metrics` -- the per-parameter entry point that the training-loop hook calls.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lrx.optim.subspace import randomized_svd, resolve_side
from lrx.paths import path_str

RANKME_EPS = 1e-7
METRICS = ("effective_rank", "stable_rank", "top_r_energy", "rank_at_energy", "spectral_norm",
           "frobenius_norm", "nuclear_norm")
SVD_METHODS = ("exact", "randomized")


def _check_matrix(x: jax.Array, name: str = "x") -> None:
    if jnp.ndim(x) < 2:
        raise ValueError(f"{name} must have shape (..., m, n) with at least 2 axes, got shape "
                         f"{jnp.shape(x)}")


def _mT(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def singular_values(x: jax.Array, k: int | None = None, *, method: str = "exact",
                    key: jax.Array | None = None, oversample: int = 10,
                    power_iters: int = 2) -> jax.Array:
    """Singular values of a matrix or a stacked batch, in descending order.

    Args:
      x: ``(..., m, n)``; computed in float32 (or wider).
      k: keep the top ``k`` (static); ``None`` keeps all ``min(m, n)``.
      method: ``'exact'`` (full SVD, then truncate) or ``'randomized'`` (:func:`randomized_svd`,
        needs ``k`` and ``key``).
      key: PRNG key for ``method='randomized'``.
      oversample, power_iters: see :func:`randomized_svd`.
    Returns:
      ``(..., k)`` or ``(..., min(m, n))`` non-negative singular values.
    """
    _check_matrix(x)
    if method not in SVD_METHODS:
        raise ValueError(f"method={method!r}: valid choices are {SVD_METHODS}")
    r = min(x.shape[-2:])
    if k is not None and not 1 <= k <= r:
        raise ValueError(f"k must be in [1, min(m, n)] = [1, {r}], got {k}")
    if method == "randomized":
        if k is None or key is None:
            raise ValueError("method='randomized' needs both k and key")
        return randomized_svd(x, k, key, oversample=oversample, power_iters=power_iters)[1]
    s = jnp.linalg.svd(x.astype(jnp.promote_types(x.dtype, jnp.float32)), compute_uv=False)
    return s if k is None else s[..., :k]


def effective_rank(s: jax.Array, eps: float = RANKME_EPS) -> jax.Array:
    """RankMe effective rank ``exp(-sum_k p_k log p_k)``, ``p_k = sigma_k / ||sigma||_1 + eps``.

    arXiv 2210.02157, Eq. 1. Equals ``n`` for ``n`` equal singular values and 1 for a rank-1
    matrix (up to ``eps``).

    Args:
      s: ``(..., r)`` singular values.
      eps: RankMe's smoothing constant (1e-7 in the paper).
    Returns:
      ``(...)``.
    """
    s = jnp.abs(s)
    p = s / jnp.maximum(jnp.sum(s, axis=-1, keepdims=True), jnp.finfo(s.dtype).tiny) + eps
    return jnp.exp(-jnp.sum(p * jnp.log(p), axis=-1))


def stable_rank(s: jax.Array) -> jax.Array:
    """Stable rank ``||W||_F^2 / ||W||_2^2 = sum_k sigma_k^2 / max_k sigma_k^2``.

    Args:
      s: ``(..., r)`` singular values.
    Returns:
      ``(...)``; ``n`` for an orthogonal ``n x n`` matrix, 1 for rank 1, 0 for the zero matrix.
    """
    sq = jnp.square(s)
    top = jnp.max(sq, axis=-1)
    return jnp.sum(sq, axis=-1) / jnp.where(top > 0, top, 1.0)


def _energy_cumsum(s: jax.Array) -> jax.Array:
    sq = jnp.square(-jnp.sort(-jnp.abs(s), axis=-1))
    total = jnp.sum(sq, axis=-1, keepdims=True)
    return jnp.cumsum(sq, axis=-1) / jnp.where(total > 0, total, 1.0)


def top_r_energy(s: jax.Array, r: int | jax.Array) -> jax.Array:
    """Fraction of ``||W||_F^2`` in the top-r singular directions, ``sum_{k<=r} s_k^2 / sum s^2``.

    This is ``||P_r^T W||_F^2 / ||W||_F^2`` for the rank-r projector ``P_r`` of GaLore
    (arXiv 2403.03507) built from the same matrix.

    Args:
      s: ``(..., n)`` singular values (any order).
      r: ``r >= 1``; values above ``n`` count as ``n``.
    Returns:
      ``(...)`` in ``[0, 1]``.
    """
    cum = _energy_cumsum(s)
    index = jnp.clip(jnp.asarray(r) - 1, 0, s.shape[-1] - 1)
    return jnp.take(cum, index, axis=-1)


def rank_at_energy(s: jax.Array, fraction: float | jax.Array) -> jax.Array:
    """Smallest ``r`` such that the top-r directions hold at least ``fraction`` of the energy.

    Args:
      s: ``(..., n)`` singular values (any order).
      fraction: in ``(0, 1]``.
    Returns:
      ``(...)`` int32 in ``[1, n]``.
    """
    cum = _energy_cumsum(s)
    # A tolerance of a few ulps so that fraction=1 is reached despite rounding in the cumsum.
    below = cum < jnp.asarray(fraction, cum.dtype) - 4 * jnp.finfo(cum.dtype).eps
    return jnp.clip(jnp.sum(below, axis=-1) + 1, 1, s.shape[-1]).astype(jnp.int32)


def orthonormal_basis(a: jax.Array) -> jax.Array:
    """Orthonormal basis of the column space of ``a`` ``(..., n, p)`` (full column rank), by QR.

    Returns:
      ``(..., n, p)`` with orthonormal columns.
    """
    _check_matrix(a, "a")
    q, _ = jnp.linalg.qr(a.astype(jnp.promote_types(a.dtype, jnp.float32)))
    return q


def _cross(a: jax.Array, b: jax.Array, orthonormal: bool) -> jax.Array:
    """``Q_a^T Q_b`` ``(..., p, q)`` for bases ``a (..., n, p)``, ``b (..., n, q)`` of one space."""
    _check_matrix(a, "a")
    _check_matrix(b, "b")
    if a.shape[-2] != b.shape[-2]:
        raise ValueError(f"a and b must live in the same space: a has {a.shape[-2]} rows, b has "
                         f"{b.shape[-2]}")
    qa = a if orthonormal else orthonormal_basis(a)
    qb = b if orthonormal else orthonormal_basis(b)
    return _mT(qa) @ qb


def principal_angles(a: jax.Array, b: jax.Array, *, orthonormal: bool = False) -> jax.Array:
    """Principal angles between the column spaces of ``a`` and ``b``.

    ``cos theta_i = sigma_i(Q_a^T Q_b)`` (Björck & Golub, 1973).

    Args:
      a: ``(..., n, p)``; b: ``(..., n, q)``; full column rank.
      orthonormal: skip the QR when the columns are already orthonormal (e.g. projectors).
    Returns:
      ``(..., min(p, q))`` angles in radians, ascending (most aligned first).
    """
    cos = jnp.linalg.svd(_cross(a, b, orthonormal), compute_uv=False)
    return jnp.arccos(jnp.clip(cos, 0.0, 1.0))


def subspace_overlap(a: jax.Array, b: jax.Array, *, orthonormal: bool = False) -> jax.Array:
    """Mean squared cosine of the principal angles, ``||Q_a^T Q_b||_F^2 / min(p, q)``.

    1 when one subspace contains the other, 0 when they are orthogonal; for two independent random
    r-dimensional subspaces of R^n it is about ``r / n``.

    Args:
      a: ``(..., n, p)``; b: ``(..., n, q)``; full column rank.
      orthonormal: skip the QR when the columns are already orthonormal.
    Returns:
      ``(...)`` in ``[0, 1]``.
    """
    cross = _cross(a, b, orthonormal)
    return jnp.sum(jnp.square(cross), axis=(-2, -1)) / min(a.shape[-1], b.shape[-1])


def singular_subspace(x: jax.Array, rank: int, *, side: str = "std") -> jax.Array:
    """Orthonormal basis of the top-``rank`` singular subspace of ``x`` (exact SVD).

    ``side='std'`` is GaLore's ``proj_type='std'`` (arXiv 2403.03507) through the one side rule of
    lrx, :func:`lrx.optim.resolve_side` on ``x`` viewed as ``(m, n) = (in, out)`` (a Flax kernel as
    stored): rows > cols -> the right subspace (rows of ``V^T``), else the left one, i.e. the
    smaller dimension, and on a tie (square) the input (row) side, as the official code does on
    the PyTorch weight of the same layer. Comparing this basis at two steps with
    :func:`subspace_overlap` gives the overlap of the projectors that ``lrx.optim.galore``
    refreshes at those steps would build.

    Args:
      x: ``(..., m, n)``.
      rank: ``1 <= rank <= min(m, n)`` (static).
      side: ``'left'`` -> ``(..., m, rank)``; ``'right'`` -> ``(..., n, rank)``; ``'std'``.
    Returns:
      ``(..., d, rank)`` with orthonormal columns.
    """
    _check_matrix(x)
    if side not in ("left", "right", "std"):
        raise ValueError(f"side={side!r}: valid choices are ('left', 'right', 'std')")
    m, n = x.shape[-2:]
    if not 1 <= rank <= min(m, n):
        raise ValueError(f"rank must be in [1, min(m, n)] = [1, {min(m, n)}], got {rank}")
    if side == "std":
        side = resolve_side(m, n, "std")
    return _singular_vectors(x, side)[..., :rank]


def truncate_rank(x: jax.Array, rank: int | jax.Array) -> jax.Array:
    """Best rank-``rank`` approximation of ``x`` (Eckart-Young), by a thin SVD.

    This is WeLore's compression of a Low-Rank Component to its kept rank. ``rank`` may be traced
    (the trailing singular values are masked, not sliced).

    Args:
      x: ``(..., m, n)``.
      rank: ``>= 0`` (broadcasts against the batch axes).
    Returns:
      ``(..., m, n)`` in the dtype of ``x``.
    """
    _check_matrix(x)
    u, s, vt = jnp.linalg.svd(x.astype(jnp.promote_types(x.dtype, jnp.float32)),
                              full_matrices=False)
    keep = jnp.arange(s.shape[-1]) < jnp.asarray(rank)[..., None]
    return ((u * jnp.where(keep, s, 0.0)[..., None, :]) @ vt).astype(x.dtype)


def welore_normalize(s: jax.Array) -> jax.Array:
    """WeLore's min-max normalised spectrum ``(s - min s) / (max s - min s)``.

    Args:
      s: ``(..., r)`` singular values.
    Returns:
      ``(..., r)`` in ``[0, 1]``. A flat spectrum (no tail; 0/0 in the paper's formula) maps to all
      ones, so nothing is dropped.
    """
    lo = jnp.min(s, axis=-1, keepdims=True)
    span = jnp.max(s, axis=-1, keepdims=True) - lo
    return jnp.where(span > 0, (s - lo) / jnp.where(span > 0, span, 1.0), 1.0)


def welore_rank_reduction(s: jax.Array, threshold: float | jax.Array) -> jax.Array:
    """WeLore rank-reduction ratio: the fraction of normalised singular values below ``threshold``.

    arXiv 2407.11239: the heavy tail ``{k : s_hat_k < tau}`` is dropped; the kept rank is
    ``r - #tail``.

    Args:
      s: ``(..., r)`` singular values.
      threshold: ``tau`` in ``[0, 1]``.
    Returns:
      ``(...)`` in ``[0, 1]``.
    """
    return jnp.mean(welore_normalize(s) < threshold, axis=-1)


def welore_threshold(spectra: Sequence[jax.Array] | Mapping[str, jax.Array],
                     target_reduction: float) -> float:
    """The global threshold ``tau`` that drops ``target_reduction`` of all singular values.

    The total reduction ``sum_W #{s_hat_W < tau} / sum_W r_W`` is the empirical CDF of the pooled
    normalised singular values, so ``tau`` is the smallest pooled value above the target quantile.

    Args:
      spectra: singular values of every matrix (each ``(r_W,)`` or stacked ``(L, r_W)``).
      target_reduction: in ``[0, 1)``, e.g. 0.5 for WeLore's 50% rank reduction.
    Returns:
      ``tau`` (a Python float).
    """
    if not 0.0 <= target_reduction < 1.0:
        raise ValueError(f"target_reduction must be in [0, 1), got {target_reduction}")
    values = spectra.values() if isinstance(spectra, Mapping) else spectra
    pooled = np.sort(np.concatenate([np.asarray(welore_normalize(jnp.asarray(s))).reshape(-1)
                                     for s in values]))
    if pooled.size == 0:
        raise ValueError("spectra is empty")
    count = int(round(target_reduction * pooled.size))
    if count == 0:
        return 0.0
    return float(np.nextafter(pooled[count - 1], np.inf, dtype=pooled.dtype))


def welore_classify(spectra: Mapping[str, jax.Array], target_reduction: float, *,
                    min_ratio: float = 0.4) -> dict[str, dict[str, Any]]:
    """WeLore's per-matrix rank reduction and LRC / N-LRC split (arXiv 2407.11239).

    Args:
      spectra: ``{name: (r,) singular values}`` of every matrix (use one entry per layer for
        stacked weights).
      target_reduction: total fraction of singular values to drop over all matrices.
      min_ratio: a matrix whose reduction ratio is ``> min_ratio`` is a Low-Rank Component.
    Returns:
      ``{name: {'ratio': float, 'kept_rank': int, 'rank': int, 'lrc': bool, 'threshold': tau}}``.
    """
    tau = welore_threshold(spectra, target_reduction)
    out = {}
    for name, s in spectra.items():
        s = jnp.asarray(s)
        if s.ndim != 1:
            raise ValueError(f"spectra[{name!r}] must be 1-D, got shape {s.shape}; split stacked "
                             "weights into one entry per layer")
        ratio = float(welore_rank_reduction(s, tau))
        rank = int(s.shape[0])
        dropped = int(round(ratio * rank))
        out[name] = {"ratio": ratio, "kept_rank": rank - dropped, "rank": rank,
                     "lrc": ratio > min_ratio, "threshold": tau}
    return out


def welore_kept_ranks(split: Mapping[str, Mapping[str, Any]]) -> tuple[dict[str, int], float]:
    """WeLore's compression (arXiv 2407.11239): Low-Rank Components are truncated to their kept
    rank, the other matrices stay full rank.

    Args:
      split: :func:`welore_classify`'s output.
    Returns:
      ``(kept, dropped_fraction)``: ``{name: rank kept}`` and the fraction of all singular values
      dropped (``sum (rank - kept) / sum rank``; only LRCs drop any).
    """
    kept = {name: int(v["kept_rank"] if v["lrc"] else v["rank"]) for name, v in split.items()}
    total = sum(int(v["rank"]) for v in split.values())
    if total == 0:
        raise ValueError("split is empty: nothing to compress")
    return kept, sum(int(v["rank"]) - kept[name] for name, v in split.items()) / total


def uniform_kept_ranks(ranks: Mapping[str, int], fraction: float) -> dict[str, int]:
    """The uniform baseline at the same budget: every matrix drops ``round(fraction * rank)`` of
    its ``rank`` singular values (``fraction`` in ``[0, 1]``). Returns ``{name: rank kept}``."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    return {name: int(r) - int(round(fraction * int(r))) for name, r in ranks.items()}


def _singular_vectors(x: jax.Array, side: str) -> jax.Array:
    u, _, vt = jnp.linalg.svd(x.astype(jnp.promote_types(x.dtype, jnp.float32)),
                              full_matrices=False)
    return u if side == "left" else _mT(vt)


def max_cosine_similarity(w_base: jax.Array, w_tuned: jax.Array, *, k: int = 10,
                          side: str = "left") -> jax.Array:
    """For each of the top-k singular vectors of ``w_tuned``, its largest absolute cosine with any
    singular vector of ``w_base`` (arXiv 2410.21228, Sec. 3).

    Args:
      w_base, w_tuned: ``(..., m, n)`` of the same shape.
      k: number of top singular vectors of ``w_tuned`` (static, ``<= min(m, n)``).
      side: ``'left'`` (columns of U, the ``m``-dim space) or ``'right'`` (rows of V^T).
    Returns:
      ``(..., k)`` in ``[0, 1]``.
    """
    _check_matrix(w_base, "w_base")
    if w_base.shape != w_tuned.shape:
        raise ValueError(f"w_base and w_tuned must have the same shape, got {w_base.shape} and "
                         f"{w_tuned.shape}")
    if side not in ("left", "right"):
        raise ValueError(f"side={side!r}: valid choices are ('left', 'right')")
    r = min(w_base.shape[-2:])
    if not 1 <= k <= r:
        raise ValueError(f"k must be in [1, min(m, n)] = [1, {r}], got {k}")
    base = _singular_vectors(w_base, side)
    tuned = _singular_vectors(w_tuned, side)[..., :k]
    return jnp.max(jnp.abs(_mT(tuned) @ base), axis=-1)


def intruder_dimensions(w_base: jax.Array, w_tuned: jax.Array, *, k: int = 10,
                        threshold: float = 0.5, side: str = "left"
                        ) -> tuple[jax.Array, jax.Array]:
    """Intruder dimensions of a fine-tuned matrix (arXiv 2410.21228, Sec. 3).

    ``y_j`` (among the top-k singular vectors of ``w_tuned``) is an intruder iff
    ``max_i |cos(y_j, x_i)| < threshold`` over all singular vectors ``x_i`` of ``w_base``.

    Args:
      w_base, w_tuned: ``(..., m, n)``. For lrx's Flax ``(in, out)`` kernels pass
        ``side='right'`` to match the paper (output-space vectors of the PyTorch weight).
      k: number of top tuned singular vectors examined (paper code default 10).
      threshold: ``epsilon``.
      side: ``'left'`` or ``'right'`` singular vectors.
    Returns:
      ``(mask (..., k) bool, count (...) int32)``.
    """
    mask = intruder_mask(max_cosine_similarity(w_base, w_tuned, k=k, side=side), threshold)
    return mask, jnp.sum(mask, axis=-1).astype(jnp.int32)


def intruder_mask(similarity: jax.Array, threshold: float) -> jax.Array:
    """The intruder rule (arXiv 2410.21228, Sec. 3): a tuned singular vector whose largest
    absolute cosine with the base singular vectors (:func:`max_cosine_similarity`, ``(..., k)``)
    is below ``threshold`` (``epsilon``) is an intruder. Returns ``(..., k)`` bool."""
    if isinstance(threshold, (int, float)) and not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold (epsilon) must be in (0, 1], got {threshold}")
    return similarity < threshold


def intruder_counts(similarities: Sequence[jax.Array] | Mapping[str, jax.Array],
                    thresholds: Sequence[float]) -> dict[float, int]:
    """Intruder dimensions summed over several matrices, for each threshold.

    Args:
      similarities: :func:`max_cosine_similarity` of every matrix (each ``(..., k)``).
      thresholds: the ``epsilon`` values.
    Returns:
      ``{epsilon: total number of intruders}`` (Python ints).
    """
    values = list(similarities.values() if isinstance(similarities, Mapping) else similarities)
    return {eps: int(sum(int(np.sum(np.asarray(intruder_mask(jnp.asarray(v), eps))))
                         for v in values)) for eps in thresholds}


def spectrum_metrics(s: jax.Array, metrics: Sequence[str], *, rank: int = 8,
                     energy_fraction: float = 0.9) -> dict[str, jax.Array]:
    """The named metrics of a spectrum (jit-able).

    Args:
      s: ``(..., r)`` singular values.
      metrics: names from :data:`METRICS`.
      rank: ``r`` of ``top_r_energy``.
      energy_fraction: fraction of ``rank_at_energy``.
    Returns:
      ``{name: (...) array}``.
    """
    _check_metrics(metrics)
    fns = {
        "effective_rank": lambda: effective_rank(s),
        "stable_rank": lambda: stable_rank(s),
        "top_r_energy": lambda: top_r_energy(s, rank),
        "rank_at_energy": lambda: rank_at_energy(s, energy_fraction),
        "spectral_norm": lambda: jnp.max(s, axis=-1),
        "frobenius_norm": lambda: jnp.sqrt(jnp.sum(jnp.square(s), axis=-1)),
        "nuclear_norm": lambda: jnp.sum(s, axis=-1),
    }
    return {name: fns[name]() for name in metrics}


def _check_metrics(metrics: Sequence[str]) -> None:
    if isinstance(metrics, str):
        raise ValueError(f"metrics must be a sequence of names, got the string {metrics!r}")
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}: valid choices are {METRICS}")


def matrix_metrics(x: jax.Array, metrics: Sequence[str], *, rank: int = 8,
                   energy_fraction: float = 0.9, method: str = "exact", k: int | None = None,
                   key: jax.Array | None = None) -> dict[str, jax.Array]:
    """:func:`spectrum_metrics` of ``singular_values(x)`` (jit-able; one SVD for all metrics).

    Args:
      x: ``(..., m, n)``.
      metrics, rank, energy_fraction: see :func:`spectrum_metrics`.
      method, k, key: see :func:`singular_values` (with ``'randomized'`` the metrics are those of
        the top-k part of the spectrum).
    Returns:
      ``{name: (...) array}``.
    """
    return spectrum_metrics(singular_values(x, k, method=method, key=key), metrics, rank=rank,
                            energy_fraction=energy_fraction)


_matrix_metrics_jit = jax.jit(matrix_metrics, static_argnames=("metrics", "rank", "method", "k"))


def layer_metrics(tree: Any, metrics: Sequence[str], paths_regex: str | None = None, *,
                  rank: int = 8, energy_fraction: float = 0.9, method: str = "exact",
                  k: int | None = None, key: jax.Array | None = None,
                  group_by_shape: bool = True) -> dict[str, float]:
    """Spectral metrics of every matrix leaf of a params / grads / updates pytree.

    Every leaf with 2 axes ``(m, n)`` gives ``'{path}/{metric}'``; every leaf with 3 axes
    ``(L, m, n)`` (stacked / scanned layers) gives ``'{path}[{i}]/{metric}'`` for ``i < L``. Other
    leaves are skipped. Leaves of equal matrix shape are stacked and go through one batched SVD
    (one compiled program per shape: a transformer has about three), unless ``group_by_shape`` is
    False (then one SVD per leaf and no stacked copy of the matrices in memory).

    Args:
      tree: a pytree of arrays (e.g. ``state.params`` or the gradients).
      metrics: names from :data:`METRICS`.
      paths_regex: keep only leaves whose ``'a/b/c'`` path matches (``re.search``; anchor it with
        ``^...$`` for a full match).
      rank, energy_fraction: see :func:`spectrum_metrics`.
      method, k, key: see :func:`singular_values`; ``'randomized'`` folds the group index into
        ``key``.
      group_by_shape: batch equal-shaped matrices into one SVD call.
    Returns:
      ``{name: float}`` in tree order, or ``{name: array}`` when called under a jax
      transformation.
    """
    _check_metrics(metrics)
    if method not in SVD_METHODS:
        raise ValueError(f"method={method!r}: valid choices are {SVD_METHODS}")
    if method == "randomized" and (k is None or key is None):
        raise ValueError("method='randomized' needs both k and key")
    pattern = re.compile(paths_regex) if paths_regex is not None else None
    metrics = tuple(metrics)
    # (names of the matrices, leaf) for every selected leaf, in tree order.
    selected: list[tuple[list[str], Any]] = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not hasattr(leaf, "ndim") or leaf.ndim not in (2, 3):
            continue
        name = path_str(path)
        if pattern is not None and not pattern.search(name):
            continue
        names = [name] if leaf.ndim == 2 else [f"{name}[{i}]" for i in range(leaf.shape[0])]
        selected.append((names, leaf))
    groups: dict[Any, list[int]] = {}
    for index, (_, leaf) in enumerate(selected):
        group = (tuple(leaf.shape[-2:]), jnp.dtype(leaf.dtype)) if group_by_shape else index
        groups.setdefault(group, []).append(index)
    values_by_name: dict[str, dict[str, Any]] = {}
    for group_index, members in enumerate(groups.values()):
        mats = [selected[i][1].reshape((-1, *selected[i][1].shape[-2:])) for i in members]
        stacked = mats[0] if len(mats) == 1 else jnp.concatenate(mats, axis=0)
        shape = stacked.shape[-2:]
        group_k = None if k is None else min(k, *shape)
        group_key = None if key is None else jax.random.fold_in(key, group_index)
        values = _matrix_metrics_jit(stacked, metrics, rank=rank,
                                     energy_fraction=energy_fraction, method=method, k=group_k,
                                     key=group_key)
        traced = any(isinstance(v, jax.core.Tracer) for v in values.values())
        if not traced:
            values = {m: np.asarray(v) for m, v in values.items()}
        names = [n for i in members for n in selected[i][0]]
        for row, name in enumerate(names):
            values_by_name[name] = {m: (v[row] if traced else float(v[row]))
                                    for m, v in values.items()}
    out: dict[str, Any] = {}
    for names, _ in selected:
        for name in names:
            for metric in metrics:
                out[f"{name}/{metric}"] = values_by_name[name][metric]
    return out


__all__ = [
    "METRICS",
    "effective_rank",
    "intruder_dimensions",
    "layer_metrics",
    "matrix_metrics",
    "max_cosine_similarity",
    "orthonormal_basis",
    "path_str",
    "principal_angles",
    "randomized_svd",
    "rank_at_energy",
    "singular_subspace",
    "singular_values",
    "spectrum_metrics",
    "stable_rank",
    "subspace_overlap",
    "top_r_energy",
    "truncate_rank",
    "welore_classify",
    "welore_normalize",
    "welore_rank_reduction",
    "welore_threshold",
]
