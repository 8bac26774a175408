"""FRUGAL: state-full + state-free split updates (Zmushko et al., "FRUGAL: Memory-Efficient
Optimization by Reducing State Overhead for Scalable Training", ICML 2025, arXiv 2411.07837),
following the official code (commit c7ebe4c, ``frugal/proj_optimizer_templates.py``, ``adamw.py``).

Per selected matrix ``G`` (``t`` = step count before the update, ``T = update_proj_gap``):

* refresh when ``t % T == 0``: a new state-full subspace of density ρ (``subspace``):
  ``'svd'`` (top singular vectors, rank ``round(ρ·dim)`` of the side ``proj_type`` picks),
  ``'random'`` (random semi-orthogonal), ``'randperm'`` (random coordinate axes),
  ``'columns'``/``'rows'`` (``int(ρ·n)`` random columns / ``int(ρ·m)`` rows of the array as
  stored: for a Flax ``(in, out)`` kernel the official ``columns`` of the PyTorch ``(out, in)``
  weight are lrx's ``rows``), ``'blocks'`` (``round(ρ·#matrices)`` whole matrices, chosen by
  ``block_order``; a stacked ``(L, m, n)`` leaf counts as L matrices); with
  ``reset_on_refresh=True`` (all official scripts) the Adam state is zeroed and its bias correction
  restarts;
* state-full part: ``U = lr·proj_params_lr_scale · back(AdamStep(down(G)))`` with torch-style Adam
  ``(M/(1-β1^k)) / (sqrt(V)/sqrt(1-β2^k) + eps)`` (eps 1e-8 in FRUGAL; the lrx default ``eps`` is
  the GaLore value unless you pass it);
* state-free part: ``G_free = G - back(down(G))`` updated by signSGD (or SGD, or dropped) with
  ``lr·proj_params_lr_scale·state_free_lr_scale``;
* weight decay first, on every leaf: ``W ← W(1 - lr·wd) - U - lr·…·sign(G_free)``.

Unselected leaves (embeddings, norms, LM head) get plain torch-style AdamW at ``lr``.

Paper vs code: the paper's algorithm re-projects the state into the new subspace; the released code
resets it (``reset_statistics=True``); lrx follows the code. ``reset_on_refresh=False`` keeps the
stale moments (the code's option). Deviation: JAX needs static shapes, so ``'blocks'`` keeps a
full-size (zero) Adam state for inactive matrices: its state memory is not reduced.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optax

from lrx.optim import lowrank
from lrx.optim.lowrank import LowRankState

ScaleByFrugalState = LowRankState


def scale_by_frugal(density: float = 0.25, *, update_proj_gap: int = 200, stagger: bool = False,
                    subspace: str = "svd",
                    state_free: str = "signsgd", state_free_lr_scale: float = 1.0,
                    reset_on_refresh: bool = True, proj_type: str = "std",
                    proj_params_lr_scale: float = 1.0, block_order: str = "random",
                    block_order_key: Callable | None = None, b1: float = 0.9, b2: float = 0.999,
                    eps: float = 1e-6, mask: Any = None,
                    dimension_numbers: Any = None, projector_dtype: Any = jnp.float32,
                    moment_dtype: Any = None, seed: int = 0) -> optax.GradientTransformation:
    """FRUGAL's direction ``u`` (apply weight decay and ``-lr`` after; see :func:`frugal`).

    Args:
      density: ρ in [0, 1], the state-full fraction (0: every selected matrix is state-free).
      subspace: 'svd' | 'random' | 'randperm' | 'columns' | 'rows' | 'blocks'.
      state_free: 'signsgd' | 'sgd' | 'none'.
      reset_on_refresh: zero the Adam state and restart its bias correction at every refresh.
      proj_type: side rule for the projected subspaces (GaLore's 'std' | 'reverse_std' | 'left' |
        'right').
      block_order: 'random' | 'ascending' | 'descending' ('descending' is the pre-training
        scripts' choice) for ``subspace='blocks'``.
      mask, dimension_numbers, projector_dtype, moment_dtype, seed: as in
        :func:`lrx.optim.scale_by_galore`.
    """
    if not isinstance(reset_on_refresh, bool):
        raise ValueError(f"reset_on_refresh must be a bool, got {reset_on_refresh!r}")
    return lowrank.make(lowrank.Settings(
        method="frugal", density=density, update_proj_gap=update_proj_gap, stagger=stagger,
        subspace=subspace,
        state_free=state_free, state_free_lr_scale=state_free_lr_scale,
        moments="reset" if reset_on_refresh else "keep", proj_type=proj_type,
        proj_params_lr_scale=proj_params_lr_scale, block_order=block_order,
        block_order_key=block_order_key, b1=b1, b2=b2,
        eps=eps, mask=mask, dimension_numbers=dimension_numbers,
        projector_dtype=projector_dtype, moment_dtype=moment_dtype, seed=seed))


def frugal(learning_rate: float | Callable, *, density: float = 0.25, update_proj_gap: int = 200,
           stagger: bool = False,
           subspace: str = "svd", state_free: str = "signsgd", state_free_lr_scale: float = 1.0,
           reset_on_refresh: bool = True, proj_type: str = "std",
           proj_params_lr_scale: float = 1.0, block_order: str = "random",
           block_order_key: Callable | None = None, b1: float = 0.9,
           b2: float = 0.999, eps: float = 1e-6, weight_decay: float = 0.0, mask: Any = None,
           weight_decay_mask: Any = None, dimension_numbers: Any = None,
           projector_dtype: Any = jnp.float32, moment_dtype: Any = None,
           seed: int = 0) -> optax.GradientTransformation:
    """FRUGAL-AdamW: :func:`scale_by_frugal`, decoupled weight decay on the pre-update weight
    (the official order), then ``-learning_rate`` (float or schedule)."""
    return optax.chain(
        scale_by_frugal(density, update_proj_gap=update_proj_gap, stagger=stagger,
                        subspace=subspace,
                        state_free=state_free, state_free_lr_scale=state_free_lr_scale,
                        reset_on_refresh=reset_on_refresh, proj_type=proj_type,
                        proj_params_lr_scale=proj_params_lr_scale, block_order=block_order,
                        block_order_key=block_order_key, b1=b1, b2=b2, eps=eps, mask=mask,
                        dimension_numbers=dimension_numbers,
                        projector_dtype=projector_dtype, moment_dtype=moment_dtype, seed=seed),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate))
