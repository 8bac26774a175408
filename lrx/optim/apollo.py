"""APOLLO and APOLLO-Mini (Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance",
MLSys 2025, arXiv 2412.05270), following the official ``apollo_torch`` (``apollo.py``,
``random_projector.py``, version 1.0.3).

APOLLO keeps Adam moments only for a *random* projection of the gradient and uses them to estimate
how much Adam would rescale each channel; the raw full-rank gradient is then scaled by that
estimate (Alg. 1). Per selected matrix ``G (m x n)`` (``t`` = step count before the update,
``T = update_proj_gap``, ``k = t + 1``):

* projection (regenerated, never stored): on the side GaLore's ``proj_type`` picks
  (:func:`lrx.optim.resolve_side`), ``P (m x r)`` or ``Q (n x r)`` with i.i.d. ``N(0, 1/r)``
  entries (the official "variance sqrt(1/r)" Gaussian), drawn from the seed in the state and the
  window index ``t // T`` (a fresh matrix every ``T`` steps, as the official seed advances);
* ``R = Pᵀ G (r x n)`` or ``R = G Q (m x r)``;
  ``M ← β1 M + (1-β1) R``; ``V ← β2 V + (1-β2) R²`` (kept across projection changes);
* ``ψ = M / (sqrt(V) + eps)``; the gradient scaling factor (Eq. 6) is
  ``s = ‖ψ‖ / (‖R‖ + 1e-8)``, channel-wise (``scale_type='channel'``, APOLLO: one factor per entry
  of the kept, non-projected dimension, the norms taken along the rank axis) or tensor-wise
  (``'tensor'``, APOLLO-Mini: one scalar per matrix);
* ``S = G ⊙ s`` on the raw gradient; norm-growth limiter (Fira's, γ = 1.01): from the second
  step on ``S ← S / max(‖S‖ / (‖S_prev‖ + 1e-8), γ) · γ`` and the limited norm is stored (one
  scalar per matrix);
* ``ΔW = -lr · sqrt(1-β2^k)/(1-β1^k) · sqrt(scale) · S``; ``scale`` (α) is 1 for APOLLO and 128
  for APOLLO-Mini in the official scripts (``scale_front=True`` applies ``sqrt(scale)`` before the
  limiter, as the official option); decoupled weight decay after the update
  (``W ← W - lr·wd·W``).

Unselected leaves get the same transformers-style AdamW (``f · M/(sqrt(V)+eps)``) at full rank.

Official-code notes. The official channel axis is ``0 if G.shape[0] < G.shape[1] else 1`` on the
PyTorch gradient, which is the rank axis of ``R`` under ``proj_type='std'`` (its only working
case); lrx takes the rank axis for every side. The projection matrix is
``torch.randn(..., generator=seed)``, so lrx's random stream differs (the distribution is the
same). State per projected matrix: ``2·r·max(m, n)`` moments (``std``) plus one limiter scalar; for
APOLLO-Mini (r = 1) that is about ``2·max(m, n)`` numbers against AdamW's ``2·m·n``.
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

SCALE_TYPES = ("channel", "tensor")


@jax.tree_util.register_pytree_node_class
class SeededProjection:
    """A random projection kept as its PRNG key only: ``key`` (uint32 ``[2]``) plus the static
    ``side`` ('left' | 'right'), ``batch`` B, ``dim`` (m or n) and ``rank`` r.
    :meth:`matrix` regenerates the ``(B, dim, r)`` Gaussian with ``N(0, 1/r)`` entries."""

    def __init__(self, key: jax.Array, side: str, batch: int, dim: int, rank: int):
        self.key, self.side, self.batch, self.dim, self.rank = key, side, batch, dim, rank

    def tree_flatten(self):
        return (self.key,), (self.side, self.batch, self.dim, self.rank)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    def matrix(self) -> jax.Array:
        """The ``(B, dim, rank)`` float32 projection."""
        gauss = jax.random.normal(self.key, (self.batch, self.dim, self.rank), jnp.float32)
        return gauss / jnp.sqrt(jnp.float32(self.rank))

    def projector(self) -> sub.Projector:
        """As a :class:`lrx.optim.Projector` (``left (B, m, r)`` or ``right (B, n, r)``)."""
        mat = self.matrix()
        return sub.Projector(mat, None) if self.side == "left" else sub.Projector(None, mat)

    def __repr__(self):
        return (f"SeededProjection(side={self.side!r}, batch={self.batch}, dim={self.dim}, "
                f"rank={self.rank})")


class ApolloLeaf(NamedTuple):
    """One leaf of :class:`ScaleByApolloState` (fields as there)."""

    projection: Any
    mu: Any
    nu: Any
    limiter_norm: Any


class ScaleByApolloState(NamedTuple):
    """State of :func:`scale_by_apollo` (leaf-aligned trees have the params' structure).

    count: int32 ``[]`` updates done so far. key: uint32 ``[2]`` the seed.
    projection: per projected leaf the current :class:`SeededProjection` (its key only), else None.
    mu, nu: Adam moments: ``R``'s shape ``(B, r, n)`` / ``(B, m, r)`` on projected leaves, the leaf
      shape otherwise.
    limiter_norm: per projected leaf ``(B,)`` the limited ``‖S‖`` of the previous step, else None.
    """

    count: jax.Array
    key: jax.Array
    projection: Any
    mu: Any
    nu: Any
    limiter_norm: Any


@dataclasses.dataclass(frozen=True, eq=False)
class Apollo(engine.Strategy):
    """APOLLO's per-leaf rules on the shared engine (layouts, sides, per-leaf sequencing). Its
    "refresh" needs no gradient: the projection of window ``t // T`` is a function of the seed, so
    it is regenerated inside :meth:`update_leaf` and nothing is decomposed."""

    Leaf = ApolloLeaf
    State = ScaleByApolloState

    rank: int = 256
    scale_type: str = "channel"
    scale: Any = 1.0
    update_proj_gap: int = 200
    proj_type: str = "std"
    b1: Any = 0.9
    b2: Any = 0.999
    eps: Any = 1e-6
    gamma: Any = 1.01
    limiter: bool = True
    scale_front: bool = False
    mask: Any = None
    dimension_numbers: Any = None
    moment_dtype: Any = None
    seed: int = 0
    needs_key: bool = True

    def plan(self, layout: sub.Layout | None, name: str) -> Plan:
        if layout is None:
            return Plan("dense", name=name)
        side = sub.resolve_side(layout.m, layout.n, self.proj_type)
        dim = layout.m if side == "left" else layout.n
        return Plan("apollo", layout, side, min(self.rank, dim), name)

    def projection(self, plan: Plan, key: jax.Array, count: jax.Array) -> SeededProjection:
        """The projection of leaf ``plan.index`` in the window of step ``count``."""
        lay = plan.layout
        window_key = jax.random.fold_in(jax.random.fold_in(key, plan.index),
                                        count // self.update_proj_gap)
        return SeededProjection(window_key, plan.side, lay.batch,
                                lay.m if plan.side == "left" else lay.n, plan.rank)

    def init_leaf(self, plan: Plan, x: jax.Array) -> ApolloLeaf:
        zeros = lambda shape: jnp.zeros(  # noqa: E731
            shape, engine.state_dtype(self.moment_dtype, x))
        if plan.kind == "dense":
            return ApolloLeaf(None, zeros(x.shape), zeros(x.shape), None)
        lay = plan.layout
        rshape = sub.projected_shape(lay.batch, lay.m, lay.n, plan.side, plan.rank)
        return ApolloLeaf(self.projection(plan, jax.random.PRNGKey(self.seed), jnp.int32(0)),
                          zeros(rshape), zeros(rshape), jnp.zeros((lay.batch,), jnp.float32))

    def update_leaf(self, plan: Plan, g: jax.Array, g3: jax.Array | None, leaf: ApolloLeaf,
                    count: jax.Array, key: jax.Array | None) -> tuple[jax.Array, ApolloLeaf]:
        """The step of the module docstring for one leaf (unselected leaves: AdamW)."""
        b1, b2, eps = self.b1, self.b2, self.eps
        dtype = leaf.mu.dtype
        # Adam's bias correction folded into the step size (transformers AdamW).
        f = engine.bias_factor(b1, b2, count + 1)
        if plan.kind == "dense":
            mu, nu = engine.adam_moments(leaf.mu, leaf.nu, g, b1, b2)
            return f * mu / (jnp.sqrt(nu) + eps), leaf._replace(mu=mu.astype(dtype),
                                                                 nu=nu.astype(dtype))
        projection = self.projection(plan, key, count)
        g3 = g3.astype(jnp.float32)
        low = sub.project(g3, projection.projector())          # R = proj(G), low-rank moments
        mu, nu = engine.adam_moments(leaf.mu, leaf.nu, low, b1, b2)
        psi = mu / (jnp.sqrt(nu) + eps)
        # Gradient scaling factor s = ‖ψ‖ / ‖R‖ along the rank axis (channel) or overall.
        if self.scale_type == "channel":
            axes = (-2,) if plan.side == "left" else (-1,)
        else:
            axes = (-2, -1)
        factor = (jnp.sqrt(jnp.sum(psi * psi, axis=axes, keepdims=True))
                  / (jnp.sqrt(jnp.sum(low * low, axis=axes, keepdims=True)) + 1e-8))
        scaled = g3 * factor                                   # S = G ⊙ s on the raw gradient
        if self.scale_front:
            scaled = scaled * jnp.sqrt(jnp.float32(self.scale))
        lim = leaf.limiter_norm
        if self.limiter:
            # Norm-growth limiter: from the 2nd step on, ‖S‖ grows at most by γ per step.
            norm = jnp.sqrt(jnp.sum(scaled * scaled, axis=(-2, -1)))           # (B,)
            shrink = jnp.maximum(norm / (lim + 1e-8), self.gamma) / self.gamma
            shrink = jnp.where(count == 0, 1.0, shrink)
            scaled = scaled / shrink[:, None, None]
            lim = norm / shrink
        if not self.scale_front:
            scaled = scaled * jnp.sqrt(jnp.float32(self.scale))
        return plan.layout.from3(f * scaled), ApolloLeaf(projection, mu.astype(dtype),
                                                         nu.astype(dtype), lim)


def scale_by_apollo(rank: int = 256, *, scale_type: str = "channel", scale: float = 1.0,
                    update_proj_gap: int = 200, proj_type: str = "std", b1: float = 0.9,
                    b2: float = 0.999, eps: float = 1e-6, gamma: float = 1.01,
                    limiter: bool = True, scale_front: bool = False, mask: Any = None,
                    dimension_numbers: Any = None, moment_dtype: Any = None,
                    seed: int = 0) -> optax.GradientTransformation:
    """APOLLO's direction ``u`` (apply ``-lr`` and weight decay after; see :func:`apollo`).

    Args:
      rank: r of the random projection, clipped to the projected dimension.
      scale_type: 'channel' (APOLLO) | 'tensor' (APOLLO-Mini).
      scale: α; the update is multiplied by ``sqrt(scale)``.
      update_proj_gap: T, a new random projection every T steps.
      proj_type: 'std' | 'reverse_std' | 'left' | 'right' (side rule of
        :func:`lrx.optim.resolve_side`).
      b1, b2, eps: Adam hyperparameters (transformers-style, eps added to ``sqrt(V)``).
      gamma: the norm-growth limiter's γ; ``limiter=False`` disables it (official
        ``disable_nl``); ``scale_front``: ``sqrt(scale)`` before the limiter.
      mask, dimension_numbers: which leaves are projected and their ``(B, m, n)`` layout, as in
        :func:`lrx.optim.scale_by_galore`.
      moment_dtype: storage dtype of the moments (default None: each parameter's own dtype,
        as optax; bf16 params get bf16 moments).
      seed: PRNG seed of the projections (kept in the state).

    Returns:
      A GradientTransformation with :class:`ScaleByApolloState`.
    """
    sub.check_choice(scale_type, SCALE_TYPES, "scale_type")
    sub.check_choice(proj_type, ("std", "reverse_std", "left", "right"), "proj_type")
    engine.check_rank(rank)
    engine.check_common(update_proj_gap=update_proj_gap, b1=b1, b2=b2, eps=eps, stagger=False)
    strategy = Apollo(rank=rank, scale_type=scale_type, scale=scale,
                      update_proj_gap=update_proj_gap, proj_type=proj_type, b1=b1, b2=b2,
                      eps=eps, gamma=gamma, limiter=limiter, scale_front=scale_front, mask=mask,
                      dimension_numbers=dimension_numbers, moment_dtype=moment_dtype, seed=seed)
    return engine.transform(strategy)


def apollo(learning_rate: float | Callable, *, rank: int = 256, scale_type: str = "channel",
           scale: float = 1.0, update_proj_gap: int = 200, proj_type: str = "std",
           b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, gamma: float = 1.01,
           limiter: bool = True, scale_front: bool = False, weight_decay: float = 0.0,
           mask: Any = None, weight_decay_mask: Any = None, dimension_numbers: Any = None,
           moment_dtype: Any = None, seed: int = 0) -> optax.GradientTransformation:
    """APOLLO-AdamW as the official code: :func:`scale_by_apollo`, then ``-learning_rate`` (float
    or optax schedule) and decoupled weight decay after the update. Defaults are the official
    pre-training scripts' APOLLO (github.com/zhuhanqing/APOLLO ``scripts/pretrain_c4``:
    channel-wise, scale 1, T 200, proj_type 'std', rank 256 as for 350M/1B/7B; the 60M script
    uses 128 and the 130M one 192, see ``configs/apollo.py``); see :func:`apollo_mini` for
    APOLLO-Mini.

    Example::

        opt = lrx.optim.apollo(0.01, rank=128,
                               mask=lrx.optim.path_mask(params, lrx.optim.ATTN_MLP))
    """
    return optax.chain(
        scale_by_apollo(rank, scale_type=scale_type, scale=scale,
                        update_proj_gap=update_proj_gap, proj_type=proj_type, b1=b1, b2=b2,
                        eps=eps, gamma=gamma, limiter=limiter, scale_front=scale_front,
                        mask=mask, dimension_numbers=dimension_numbers,
                        moment_dtype=moment_dtype, seed=seed),
        engine.learning_rate_then_decay(learning_rate, weight_decay, weight_decay_mask))


def apollo_mini(learning_rate: float | Callable, *, rank: int = 1, scale: float = 128.0,
                **kwargs: Any) -> optax.GradientTransformation:
    """APOLLO-Mini: :func:`apollo` with rank 1, tensor-wise scaling and ``scale=128`` (so the
    update carries ``sqrt(128)``), the official scripts' setting."""
    kwargs.setdefault("scale_type", "tensor")
    return apollo(learning_rate, rank=rank, scale=scale, **kwargs)
