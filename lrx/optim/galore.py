"""GaLore: gradient low-rank projection (Zhao et al., "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection", ICML 2024, arXiv 2403.03507), faithful to the official
``galore_torch`` (github.com/jiaweizzhao/GaLore).

Per projected matrix ``G_t (m x n)`` with ``t`` the step count before this update (Alg. 2):

* refresh when ``t % update_proj_gap == 0`` (so at ``t = 0``): ``P`` = top-r singular vectors of the
  float32 thin SVD of ``G_t`` on the side chosen by ``proj_type`` (:mod:`lrx.optim.subspace`);
* ``R_t = proj(G_t)``; ``M ← β1 M + (1-β1) R_t``; ``V ← β2 V + (1-β2) R_t²``;
* ``N_t = M / (sqrt(V) + eps)`` and the step
  ``ΔW = -lr · scale · sqrt(1-β2^k)/(1-β1^k) · back(N_t)`` with ``k = t + 1`` (bias
  correction folded into the step size, eps added to ``sqrt(V)``: the
  transformers ``AdamW`` that the official code copies; default ``eps=1e-6`` as that class);
* decoupled weight decay in the full space *after* the update: ``W ← (W + ΔW)(1 - lr·wd)``.

Unprojected leaves get the same AdamW at full rank (the official recipe gives embeddings, LM head
and norms plain Adam with the same lr). Moments are kept in the old basis across refreshes and the
bias correction continues (``moments='keep'``, official). Extensions (not in the paper):
``moments='reset'`` (zero moments and restart the bias correction, FRUGAL's default) and
``moments='project'`` (rotate ``M`` into the new basis with ``C = P_newᵀ P_old``; ``V`` is mapped
with the entrywise square ``C∘C``, which keeps it non-negative and is exact when the bases agree up
to signs/permutations); ``projector='randomized'|'random'``; float32 projectors for bf16 params.

Deviations from the official code: projectors are stored in ``projector_dtype`` (float32) instead
of the gradient dtype; the projection matmuls run in float32 when the projector is float32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optax

from lrx.optim import lowrank
from lrx.optim.lowrank import LowRankState

ScaleByGaloreState = LowRankState


def scale_by_galore(rank: int = 128, *, update_proj_gap: int = 200, stagger: bool = False,
                    scale: float = 0.25,
                    proj_type: str = "std", projector: str = "svd", moments: str = "keep",
                    base_optimizer: optax.GradientTransformation | None = None,
                    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, mask: Any = None,
                    dimension_numbers: Any = None, oversample: int = 8, power_iters: int = 1,
                    warm_start: bool = False, projector_dtype: Any = jnp.float32,
                    moment_dtype: Any = None, seed: int = 0) -> optax.GradientTransformation:
    """GaLore's preconditioned direction ``u`` (the caller applies ``-lr``; see :func:`galore`).

    Args:
      rank: r, clipped to ``min(m, n)`` per matrix.
      update_proj_gap: T, refresh the projectors when ``count % T == 0``.
      stagger: refresh matrix ``j`` of ``J`` (every layer of a stack counted) at its own offset,
        when ``count % T == (j·T) // J`` (and at ``count == 0``), so no step pays every SVD.
        Refreshes always run one matrix at a time (``lax.map`` over a stack, leaves chained by
        data dependencies), so the peak holds one matrix's decomposition workspace.
      scale: α, multiplies the back-projected update of projected leaves.
      proj_type: 'std' | 'reverse_std' | 'left' | 'right' | 'full' (GaLore's side rule for the
        ``(m, n)`` matrix as given; 'reverse_std' minimises optimizer memory).
      projector: 'svd' (exact, official) | 'randomized' (range finder with ``oversample`` extra
        probes, ``power_iters`` subspace iterations, optional ``warm_start`` from the previous
        projector) | 'random' (seeded random orthonormal basis).
      moments: 'keep' (official) | 'reset' | 'project' on refresh.
      base_optimizer: optional optax transform applied to the projected gradients instead of the
        built-in (transformers-style) Adam; supports ``moments`` 'keep' and 'reset'.
      b1, b2, eps: Adam hyperparameters of the built-in Adam.
      mask: which leaves are projected: a pytree of bools like the params, or a callable
        ``params -> bools``. Default: every leaf with ``ndim >= 2`` (extra leading axes are a stack
        of independent matrices). See :func:`lrx.optim.path_mask`.
      dimension_numbers: None, one :class:`lrx.optim.DimensionNumbers` for every projected leaf, or
        a pytree of them (None entries use the default layout).
      projector_dtype / moment_dtype: storage dtypes (default float32 / float32).
      seed: PRNG seed of random/randomized projectors (kept in the state).

    Returns:
      A GradientTransformation with :class:`LowRankState`.
    """
    return lowrank.make(lowrank.Settings(
        method="galore", rank=rank, update_proj_gap=update_proj_gap, stagger=stagger, scale=scale,
        proj_type=proj_type, projector=projector, moments=moments, b1=b1, b2=b2, eps=eps,
        mask=mask, dimension_numbers=dimension_numbers, oversample=oversample,
        power_iters=power_iters, warm_start=warm_start, projector_dtype=projector_dtype,
        moment_dtype=moment_dtype, seed=seed, base_optimizer=base_optimizer))


def galore(learning_rate: float | Callable, *, rank: int = 128, update_proj_gap: int = 200,
           stagger: bool = False,
           scale: float = 0.25, proj_type: str = "std", projector: str = "svd",
           moments: str = "keep", b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
           weight_decay: float = 0.0, mask: Any = None, weight_decay_mask: Any = None,
           base_optimizer: optax.GradientTransformation | None = None,
           dimension_numbers: Any = None, oversample: int = 8, power_iters: int = 1,
           warm_start: bool = False, projector_dtype: Any = jnp.float32,
           moment_dtype: Any = None, seed: int = 0) -> optax.GradientTransformation:
    """GaLore-AdamW as in the official code: :func:`scale_by_galore`, then ``-learning_rate``
    (a float or an optax schedule) and decoupled weight decay applied after the update.

    ``mask`` selects the projected leaves (the rest get full-rank AdamW with the same lr);
    ``weight_decay_mask`` selects the decayed leaves (default: all). The other arguments are
    those of :func:`scale_by_galore`. Works with ``optax.inject_hyperparams`` (learning_rate,
    scale, b1, b2, eps, weight_decay; keep ``rank`` and ``update_proj_gap`` static, e.g. with
    ``functools.partial``).

    Example::

        opt = lrx.optim.galore(optax.cosine_decay_schedule(0.01, 1000), rank=128,
                               mask=lrx.optim.path_mask(params, lrx.optim.ATTN_MLP))
    """
    return optax.chain(
        scale_by_galore(rank, update_proj_gap=update_proj_gap, stagger=stagger, scale=scale,
                        proj_type=proj_type,
                        projector=projector, moments=moments, b1=b1, b2=b2, eps=eps, mask=mask,
                        base_optimizer=base_optimizer, dimension_numbers=dimension_numbers,
                        oversample=oversample, power_iters=power_iters, warm_start=warm_start,
                        projector_dtype=projector_dtype, moment_dtype=moment_dtype, seed=seed),
        lowrank.learning_rate_then_decay(learning_rate, weight_decay, weight_decay_mask))
