"""Fira: GaLore plus the scaled out-of-subspace residual (Chen et al., "Fira: Can We Achieve
Full-rank Training of LLMs Under Low-rank Constraint?", arXiv 2410.01623), faithful to the official
``optimizer_torch/fira_adamw.py`` (github.com/xichen-fy/Fira).

Per projected matrix (one-sided projection ``P``, ``R = proj(G)``; Adam moments on ``R``):

* ``ψ(R) = M / (sqrt(V) + eps)`` (no bias correction inside ψ);
* norm-based scaling ``φ_i = ‖ψ(R)_i‖ / (‖R_i‖ + 1e-8)`` for every column ``i`` of ``R (r x n)``
  (left projection) or row of ``R (m x r)`` (right projection): the kept dimension (Eq. 5);
* residual ``S = φ ⊙ (G - scale·back(R))`` (``residual='official'``, what the code does) or
  ``S = φ ⊙ (G - back(R))`` (``residual='paper'``, Eq. 4);
* norm-growth limiter (Eq. 7): from the second step on, if ``‖S_t‖ > γ‖S_{t-1}‖`` then
  ``S_t ← S_t · γ‖S_{t-1}‖/‖S_t‖``; the stored norm is the limited one (one scalar per matrix);
* ``ΔW = -lr · sqrt(1-β2^k)/(1-β1^k) · (scale·back(ψ(R)) + S)``: the residual is not scaled by α;
  decoupled weight decay after the update (as GaLore).

The official code chooses φ's axis from the shape of ``R`` (``dim 0 if R.shape[0] < R.shape[1]``);
lrx chooses it from the projection side, which is the same whenever ``r < min(m, n)`` and stays
well-defined when ``r = min(m, n)``. Moments are kept on refresh (official); ``moments`` and the
projector choices of :func:`lrx.optim.scale_by_galore` also apply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optax

from lrx.optim import lowrank
from lrx.optim.lowrank import LowRankState

ScaleByFiraState = LowRankState


def scale_by_fira(rank: int = 128, *, update_proj_gap: int = 200, stagger: bool = False,
                  scale: float = 0.25,
                  proj_type: str = "std", projector: str = "svd", moments: str = "keep",
                  gamma: float = 1.01, residual: str = "official", b1: float = 0.9,
                  b2: float = 0.999, eps: float = 1e-6, mask: Any = None,
                  dimension_numbers: Any = None, oversample: int = 8, power_iters: int = 1,
                  warm_start: bool = False, projector_dtype: Any = jnp.float32,
                  moment_dtype: Any = None, seed: int = 0) -> optax.GradientTransformation:
    """Fira's direction ``u`` (apply ``-lr`` after; see :func:`fira`). Arguments as
    :func:`lrx.optim.scale_by_galore`, plus ``gamma`` (limiter γ) and ``residual``
    ('official' | 'paper'). ``proj_type='full'`` is rejected (φ needs a kept dimension)."""
    return lowrank.make(lowrank.Settings(
        method="fira", rank=rank, update_proj_gap=update_proj_gap, stagger=stagger, scale=scale,
        proj_type=proj_type, projector=projector, moments=moments, gamma=gamma,
        residual=residual, b1=b1, b2=b2, eps=eps, mask=mask, dimension_numbers=dimension_numbers,
        oversample=oversample, power_iters=power_iters, warm_start=warm_start,
        projector_dtype=projector_dtype, moment_dtype=moment_dtype, seed=seed))


def fira(learning_rate: float | Callable, *, rank: int = 128, update_proj_gap: int = 200,
         stagger: bool = False,
         scale: float = 0.25, proj_type: str = "std", gamma: float = 1.01,
         residual: str = "official", projector: str = "svd", moments: str = "keep",
         b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0,
         mask: Any = None, weight_decay_mask: Any = None, dimension_numbers: Any = None,
         oversample: int = 8, power_iters: int = 1, warm_start: bool = False,
         projector_dtype: Any = jnp.float32, moment_dtype: Any = None,
         seed: int = 0) -> optax.GradientTransformation:
    """Fira-AdamW: :func:`scale_by_fira`, then ``-learning_rate`` (float or schedule) and
    decoupled weight decay after the update (official order)."""
    return optax.chain(
        scale_by_fira(rank, update_proj_gap=update_proj_gap, stagger=stagger, scale=scale,
                      proj_type=proj_type,
                      projector=projector, moments=moments, gamma=gamma, residual=residual,
                      b1=b1, b2=b2, eps=eps, mask=mask, dimension_numbers=dimension_numbers,
                      oversample=oversample, power_iters=power_iters, warm_start=warm_start,
                      projector_dtype=projector_dtype, moment_dtype=moment_dtype, seed=seed),
        lowrank.learning_rate_then_decay(learning_rate, weight_decay, weight_decay_mask))
