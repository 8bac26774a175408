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

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrx.optim import lowrank
from lrx.optim import subspace as sub

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


def _plan(layout: sub.Layout, rank: int, proj_type: str) -> tuple[str, int, int]:
    """``(side, dim, r)`` of one projected leaf."""
    side = sub.resolve_side(layout.m, layout.n, proj_type)
    dim = layout.m if side == "left" else layout.n
    return side, dim, min(rank, dim)


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
      moment_dtype: storage dtype of the moments (default float32).
      seed: PRNG seed of the projections (kept in the state).
    """
    sub.check_choice(scale_type, SCALE_TYPES, "scale_type")
    sub.check_choice(proj_type, ("std", "reverse_std", "left", "right"), "proj_type")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive Python int, got {rank!r}")
    if not isinstance(update_proj_gap, int) or update_proj_gap <= 0:
        raise ValueError(f"update_proj_gap must be a positive int, got {update_proj_gap!r}")
    mdtype = moment_dtype or jnp.float32

    def window_key(key, i, count):
        return jax.random.fold_in(jax.random.fold_in(key, i), count // update_proj_gap)

    def init_fn(params):
        layouts, _, treedef, leaves = lowrank.select_layouts(params, mask, dimension_numbers)
        key = jax.random.PRNGKey(seed)
        count = jnp.zeros([], jnp.int32)
        proj, mus, nus, lims = [], [], [], []
        for i, (lay, x) in enumerate(zip(layouts, leaves, strict=True)):
            if lay is None:
                proj.append(None)
                lims.append(None)
                mus.append(jnp.zeros(x.shape, mdtype))
                nus.append(jnp.zeros(x.shape, mdtype))
                continue
            side, dim, r = _plan(lay, rank, proj_type)
            proj.append(SeededProjection(window_key(key, i, count), side, lay.batch, dim, r))
            rshape = sub.projected_shape(lay.batch, lay.m, lay.n, side, r)
            mus.append(jnp.zeros(rshape, mdtype))
            nus.append(jnp.zeros(rshape, mdtype))
            lims.append(jnp.zeros((lay.batch,), jnp.float32))
        tree = treedef.unflatten
        return ScaleByApolloState(count, key, tree(proj), tree(mus), tree(nus), tree(lims))

    def update_fn(updates, state, params=None):
        layouts, _, treedef, _ = lowrank.select_layouts(
            updates if params is None else params, mask, dimension_numbers)
        raw = treedef.flatten_up_to(updates)
        grads = [lowrank.leaf_value(g) for g in raw]
        mus, nus = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        lims = treedef.flatten_up_to(state.limiter_norm)
        count = state.count
        k = (count + 1).astype(jnp.float32)
        # Adam's bias correction folded into the step size (transformers AdamW).
        f = jnp.sqrt(1.0 - jnp.power(b2, k)) / (1.0 - jnp.power(b1, k))
        out, new_proj, new_mu, new_nu, new_lim = [], [], [], [], []
        for i, (lay, g) in enumerate(zip(layouts, grads, strict=True)):
            mu = b1 * mus[i].astype(jnp.float32)
            nu = b2 * nus[i].astype(jnp.float32)
            if lay is None:
                g32 = g.astype(jnp.float32)
                mu, nu = mu + (1 - b1) * g32, nu + (1 - b2) * g32 * g32
                out.append((f * mu / (jnp.sqrt(nu) + eps)).astype(g.dtype))
                new_proj.append(None)
                new_lim.append(None)
                new_mu.append(mu.astype(mdtype))
                new_nu.append(nu.astype(mdtype))
                continue
            side, dim, r = _plan(lay, rank, proj_type)
            projection = SeededProjection(window_key(state.key, i, count), side, lay.batch, dim, r)
            g3 = lay.to3(g).astype(jnp.float32)
            pr = projection.projector()
            # Low-rank Adam moments on R = proj(G).
            low = sub.project(g3, pr)
            mu, nu = mu + (1 - b1) * low, nu + (1 - b2) * low * low
            psi = mu / (jnp.sqrt(nu) + eps)
            # Gradient scaling factor s = ‖ψ‖ / ‖R‖ along the rank axis (channel) or overall.
            axes = ((-2,) if side == "left" else (-1,)) if scale_type == "channel" else (-2, -1)
            factor = (jnp.sqrt(jnp.sum(psi * psi, axis=axes, keepdims=True))
                      / (jnp.sqrt(jnp.sum(low * low, axis=axes, keepdims=True)) + 1e-8))
            scaled = g3 * factor
            if scale_front:
                scaled = scaled * jnp.sqrt(jnp.float32(scale))
            lim = lims[i]
            if limiter:
                # Norm-growth limiter: from the 2nd step on, ‖S‖ grows at most by γ per step.
                norm = jnp.sqrt(jnp.sum(scaled * scaled, axis=(-2, -1)))           # (B,)
                shrink = jnp.maximum(norm / (lims[i] + 1e-8), gamma) / gamma
                shrink = jnp.where(count == 0, 1.0, shrink)
                scaled = scaled / shrink[:, None, None]
                lim = norm / shrink
            if not scale_front:
                scaled = scaled * jnp.sqrt(jnp.float32(scale))
            out.append(lay.from3(f * scaled).astype(g.dtype))
            new_proj.append(projection)
            new_lim.append(lim)
            new_mu.append(mu.astype(mdtype))
            new_nu.append(nu.astype(mdtype))
        tree = treedef.unflatten
        out = [lowrank.rewrap(r, x) for r, x in zip(raw, out, strict=True)]
        return tree(out), ScaleByApolloState(optax.safe_increment(count), state.key,
                                              tree(new_proj), tree(new_mu), tree(new_nu),
                                              tree(new_lim))

    return optax.GradientTransformation(init_fn, update_fn)


def apollo(learning_rate: float | Callable, *, rank: int = 256, scale_type: str = "channel",
           scale: float = 1.0, update_proj_gap: int = 200, proj_type: str = "std",
           b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6, gamma: float = 1.01,
           limiter: bool = True, scale_front: bool = False, weight_decay: float = 0.0,
           mask: Any = None, weight_decay_mask: Any = None, dimension_numbers: Any = None,
           moment_dtype: Any = None, seed: int = 0) -> optax.GradientTransformation:
    """APOLLO-AdamW as the official code: :func:`scale_by_apollo`, then ``-learning_rate`` (float
    or optax schedule) and decoupled weight decay after the update. Defaults are the official
    pre-training scripts' APOLLO (channel-wise, scale 1, T 200, proj_type 'std'); see
    :func:`apollo_mini` for APOLLO-Mini.

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
        lowrank.learning_rate_then_decay(learning_rate, weight_decay, weight_decay_mask))


def apollo_mini(learning_rate: float | Callable, *, rank: int = 1, scale: float = 128.0,
                **kwargs: Any) -> optax.GradientTransformation:
    """APOLLO-Mini: :func:`apollo` with rank 1, tensor-wise scaling and ``scale=128`` (so the
    update carries ``sqrt(128)``), the official scripts' setting."""
    kwargs.setdefault("scale_type", "tensor")
    return apollo(learning_rate, rank=rank, scale=scale, **kwargs)
