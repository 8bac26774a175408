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
projector choices of :func:`lrx.optim.scale_by_galore` also apply (Fira is GaLore's strategy with
its own update rule: :class:`Fira` subclasses :class:`lrx.optim.galore.Galore`). The residual is
formed inside the per-leaf update, one matrix (leaf) at a time, never as a full tree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrx.optim import engine
from lrx.optim import subspace as sub
from lrx.optim.engine import Plan
from lrx.optim.galore import Galore, GaloreLeaf, validate

RESIDUALS = ("official", "paper")


class FiraLeaf(NamedTuple):
    """One leaf of :class:`ScaleByFiraState`: GaLore's fields (``projector``, ``mu``, ``nu``,
    ``moment_count``) plus ``limiter_norm`` ``(B,)`` float32, the limited ``‖S‖`` of the previous
    step per matrix (None for unprojected leaves)."""

    projector: Any
    mu: Any
    nu: Any
    moment_count: Any
    limiter_norm: Any


class ScaleByFiraState(NamedTuple):
    """State of :func:`scale_by_fira`: ``count``, ``key`` and the :class:`FiraLeaf` fields as
    pytrees like the params."""

    count: jax.Array
    key: jax.Array | None
    projector: Any
    mu: Any
    nu: Any
    moment_count: Any
    limiter_norm: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Fira(Galore):
    """Fira's per-leaf rules: GaLore's plan, init and refresh, Fira's update."""

    Leaf = FiraLeaf
    State = ScaleByFiraState

    gamma: Any = 1.01
    residual: str = "official"

    def init_leaf(self, plan: Plan, x: jax.Array) -> FiraLeaf:
        g = super().init_leaf(plan, x)
        limiter = None if plan.kind == "dense" else jnp.zeros((plan.layout.batch,), jnp.float32)
        return FiraLeaf(*g, limiter)

    def init_globals(self, plans, treedef, params, leaves):
        return ()

    def refresh_matrix(self, plan, g, part, key, count):
        new = super().refresh_matrix(plan, g, _galore(part), key, count)
        return FiraLeaf(*new, part.limiter_norm)

    def update_leaf(self, plan: Plan, g: jax.Array, g3: jax.Array | None, leaf: FiraLeaf,
                    count: jax.Array, key: jax.Array | None) -> tuple[jax.Array, FiraLeaf]:
        """ψ, φ, residual, limiter and step of the module docstring, for one leaf."""
        if plan.kind == "dense":                      # plain (transformers-style) AdamW
            u, new = super().update_leaf(plan, g, g3, _galore(leaf), count, key)
            return u, FiraLeaf(*new, None)
        b1, b2, eps = self.b1, self.b2, self.eps
        dtype = leaf.mu.dtype
        mc = leaf.moment_count
        k = count + 1 if mc is None else (mc + 1)[:, None, None]
        p = leaf.projector
        r = sub.project(g3, p).astype(jnp.float32)                   # R = proj(G)
        mu, nu = engine.adam_moments(leaf.mu, leaf.nu, r, b1, b2)
        psi = mu / (jnp.sqrt(nu) + eps)                              # ψ(R) = M / (sqrt(V) + eps)
        f = engine.bias_factor(b1, b2, k)
        # φ per entry of the kept (non-projected) dimension: columns of R (r x n) for a left
        # projection, rows of R (m x r) for a right one (Eq. 5)
        axis = -2 if plan.side == "left" else -1
        phi = jnp.linalg.norm(psi, axis=axis, keepdims=True) / (
            jnp.linalg.norm(r, axis=axis, keepdims=True) + 1e-8)
        back = sub.project_back(r, p)
        if self.residual == "official":
            back = self.scale * back
        resid = (g3.astype(jnp.float32) - back) * phi                # S = φ ⊙ (G - ·back(R))
        # norm-growth limiter (Eq. 7): ‖S_t‖ <= γ‖S_{t-1}‖ from the second step on
        norm = jnp.sqrt(jnp.sum(resid * resid, axis=(-2, -1)))                 # (B,)
        limiter = jnp.maximum(norm / (leaf.limiter_norm + 1e-8), self.gamma) / self.gamma
        limiter = jnp.where(count == 0, 1.0, limiter)
        resid = resid / limiter[:, None, None]
        u3 = f * (self.scale * sub.project_back(psi, p) + resid)     # ΔW / -lr
        return plan.layout.from3(u3), FiraLeaf(
            p, mu.astype(dtype), nu.astype(dtype),
            None if mc is None else optax.safe_increment(mc), norm / limiter)


def _galore(leaf: FiraLeaf) -> GaloreLeaf:
    """GaLore's view of a Fira leaf (without the limiter norm)."""
    return GaloreLeaf(leaf.projector, leaf.mu, leaf.nu, leaf.moment_count)


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
    ('official' | 'paper'). ``proj_type='full'`` is rejected (φ needs a kept dimension).

    Returns:
      A GradientTransformation with :class:`ScaleByFiraState`.
    """
    strategy = Fira(
        rank=rank, update_proj_gap=update_proj_gap, stagger=stagger, scale=scale,
        proj_type=proj_type, projector=projector, moments=moments, b1=b1, b2=b2, eps=eps,
        mask=mask, dimension_numbers=dimension_numbers, oversample=oversample,
        power_iters=power_iters, warm_start=warm_start, projector_dtype=projector_dtype,
        moment_dtype=moment_dtype, seed=seed, gamma=gamma, residual=residual)
    validate(strategy)
    sub.check_choice(residual, RESIDUALS, "residual")
    if proj_type == "full":
        raise ValueError("fira needs a one-sided projection: proj_type must be one of "
                         "'std', 'reverse_std', 'left', 'right'")
    if engine.is_number(gamma) and gamma < 1.0:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    return engine.transform(strategy)


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
        engine.learning_rate_then_decay(learning_rate, weight_decay, weight_decay_mask))
