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

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrx.optim import engine
from lrx.optim import subspace as sub
from lrx.optim.engine import Plan

MOMENTS = ("keep", "reset", "project")


class GaloreLeaf(NamedTuple):
    """One leaf of :class:`ScaleByGaloreState`: ``projector`` a :class:`lrx.optim.Projector`
    (``(B, m, r)`` / ``(B, n, r)``; None for unprojected leaves); ``mu``, ``nu`` Adam moments of
    ``R`` ``(B, r, n)`` / ``(B, m, r)`` (the leaf shape for unprojected leaves; None under a user
    ``base_optimizer``); ``moment_count`` int32 ``(B,)`` steps since each matrix's last moment
    reset (``moments='reset'`` only, else None)."""

    projector: Any
    mu: Any
    nu: Any
    moment_count: Any


class ScaleByGaloreState(NamedTuple):
    """State of :func:`scale_by_galore`: ``count`` int32 ``[]`` (updates done), ``key`` PRNG key
    of random/randomized projectors (else None), the :class:`GaloreLeaf` fields as pytrees like
    the params, and ``base_state`` (the state of a user ``base_optimizer``, else None)."""

    count: jax.Array
    key: jax.Array | None
    projector: Any
    mu: Any
    nu: Any
    moment_count: Any
    base_state: Any


def rotate_moments(mu: jax.Array, nu: jax.Array, old: sub.Projector, new: sub.Projector
                   ) -> tuple[jax.Array, jax.Array]:
    """``moments='project'`` for ``R``-shaped moments ``(B, ...)``: ``M`` into the new basis with
    ``C = P_newᵀ P_old``, ``V`` with the entrywise square ``C∘C`` (stays non-negative)."""
    if new.left is not None:
        c = jnp.einsum("bmr,bms->brs", new.left, old.left).astype(jnp.float32)
        mu = jnp.einsum("brs,bsn->brn", c, mu)
        nu = jnp.einsum("brs,bsn->brn", c * c, nu)
    if new.right is not None:
        c = jnp.einsum("bnr,bns->brs", old.right, new.right).astype(jnp.float32)
        mu = jnp.einsum("bmr,brs->bms", mu, c)
        nu = jnp.einsum("bmr,brs->bms", nu, c * c)
    return mu, nu


def _expand(p: sub.Projector | None) -> sub.Projector | None:
    return None if p is None else sub.Projector(*(None if x is None else x[None] for x in p))


@dataclasses.dataclass(frozen=True, eq=False)
class Galore(engine.Strategy):
    """GaLore's per-leaf rules (see the module docstring); :func:`scale_by_galore` builds it."""

    Leaf = GaloreLeaf
    State = ScaleByGaloreState

    rank: int = 128
    update_proj_gap: int = 200
    stagger: bool = False
    scale: Any = 0.25
    proj_type: str = "std"
    projector: str = "svd"
    moments: str = "keep"
    base_optimizer: Any = None
    b1: Any = 0.9
    b2: Any = 0.999
    eps: Any = 1e-6
    mask: Any = None
    dimension_numbers: Any = None
    oversample: int = 8
    power_iters: int = 1
    warm_start: bool = False
    projector_dtype: Any = jnp.float32
    moment_dtype: Any = None
    seed: int = 0
    per_matrix_update = True      # update_leaf is per matrix (Fira's too)

    @property
    def needs_key(self) -> bool:
        return self.projector != "svd"

    @property
    def resets(self) -> bool:
        """Per-matrix moment counts: moments restart on refresh (built-in Adam only)."""
        return self.moments == "reset" and self.base_optimizer is None

    def plan(self, layout: sub.Layout | None, name: str) -> Plan:
        if layout is None:
            return Plan("dense", name=name)
        side = sub.resolve_side(layout.m, layout.n, self.proj_type)
        return Plan("proj", layout, side, min(self.rank, layout.m, layout.n), name)

    def init_leaf(self, plan: Plan, x: jax.Array) -> GaloreLeaf:
        zeros = lambda shape: jnp.zeros(  # noqa: E731
            shape, engine.state_dtype(self.moment_dtype, x))
        own_adam = self.base_optimizer is None
        if plan.kind == "dense":
            return GaloreLeaf(None, zeros(x.shape) if own_adam else None,
                              zeros(x.shape) if own_adam else None, None)
        lay = plan.layout
        projector = sub.zero_projector(lay.batch, lay.m, lay.n, plan.side, plan.rank,
                                       self.projector_dtype)
        rshape = sub.projected_shape(lay.batch, lay.m, lay.n, plan.side, plan.rank)
        return GaloreLeaf(projector, zeros(rshape) if own_adam else None,
                          zeros(rshape) if own_adam else None,
                          jnp.zeros((lay.batch,), jnp.int32) if self.resets else None)

    def init_globals(self, plans, treedef, params, leaves):
        if self.base_optimizer is None:
            return (None,)
        rs = [x if p.kind == "dense" else jnp.zeros(sub.projected_shape(
            p.layout.batch, p.layout.m, p.layout.n, p.side, p.rank), jnp.float32)
            for p, x in zip(plans, params, strict=True)]
        return (self.base_optimizer.init(treedef.unflatten(rs)),)

    def refresh_fields(self, plan: Plan) -> tuple[str, ...]:
        if self.resets:
            return ("projector", "mu", "nu", "moment_count")
        if self.moments == "project":
            return ("projector", "mu", "nu")
        return ("projector",)

    def reads_old_projector(self) -> bool:
        return self.warm_start or self.moments == "project"

    def refresh_matrix(self, plan: Plan, g: jax.Array, part: GaloreLeaf, key: jax.Array,
                       count: jax.Array) -> GaloreLeaf:
        """New ``P`` from one matrix ``g (m, n)``, then the moment policy on refresh."""
        new = sub.first_matrix(sub.compute_projector(
            g[None], plan.side, plan.rank, self.projector, key, _expand(part.projector),
            oversample=self.oversample, power_iters=self.power_iters,
            warm_start=self.warm_start, warm_valid=count > 0, dtype=self.projector_dtype))
        if self.resets:                            # zero moments, restart the bias correction
            return GaloreLeaf(new, jnp.zeros_like(part.mu), jnp.zeros_like(part.nu),
                              jnp.zeros_like(part.moment_count))
        if self.moments == "project":              # rotate M (and V by C∘C) into the new basis
            mu, nu = rotate_moments(part.mu[None].astype(jnp.float32),
                                    part.nu[None].astype(jnp.float32),
                                    _expand(part.projector), _expand(new))
            return part._replace(projector=new, mu=mu[0].astype(part.mu.dtype),
                                 nu=nu[0].astype(part.nu.dtype))
        return part._replace(projector=new)

    def update_leaf(self, plan: Plan, g: jax.Array, g3: jax.Array | None, leaf: GaloreLeaf,
                    count: jax.Array, key: jax.Array | None) -> tuple[jax.Array, GaloreLeaf]:
        """``R = proj(G)``; ``M, V`` updated; ``u = scale · sqrt(1-β2^k)/(1-β1^k) · back(M /
        (sqrt(V) + eps))`` (unprojected leaves: the same Adam on ``G``, no scale)."""
        b1, b2, eps = self.b1, self.b2, self.eps
        dtype = leaf.mu.dtype
        if plan.kind == "dense":
            mu, nu = engine.adam_moments(leaf.mu, leaf.nu, g, b1, b2)
            u = engine.bias_factor(b1, b2, count + 1) * (mu / (jnp.sqrt(nu) + eps))
            return u, leaf._replace(mu=mu.astype(dtype), nu=nu.astype(dtype))
        # k: the bias-correction step, per matrix (B, 1, 1) when moments restart
        mc = leaf.moment_count
        k = count + 1 if mc is None else (mc + 1)[:, None, None]
        p = leaf.projector
        r = sub.project(g3, p)                                       # R_t = proj(G_t)
        mu, nu = engine.adam_moments(leaf.mu, leaf.nu, r, b1, b2)    # M, V on R_t
        n_t = mu / (jnp.sqrt(nu) + eps)                              # N_t = M / (sqrt(V) + eps)
        # u = scale · f_k · back(N_t); the scalars go on the small N_t (one pass over r x n, not
        # over the full m x n update)
        u3 = sub.project_back((self.scale * engine.bias_factor(b1, b2, k)) * n_t, p)
        return plan.layout.from3(u3), leaf._replace(
            mu=mu.astype(dtype), nu=nu.astype(dtype),
            moment_count=None if mc is None else optax.safe_increment(mc))

    def refreshes_in_update_all(self) -> bool:
        """With a user ``base_optimizer`` :meth:`update_all` refreshes each leaf just before
        its projection (see there)."""
        return self.base_optimizer is not None

    def update_all(self, plans, treedef, grads, g3, leaves, globals_, count, refresh=None):
        """With a user ``base_optimizer``: it sees the tree of projected gradients ``R`` (full
        gradients on unprojected leaves); ``u = scale · back(base(R))``. Each leaf is refreshed
        (``refresh``, given by the engine) and projected in turn, the next leaf's gradient read
        only once the previous projection exists (:func:`_projection_order`)."""
        if self.base_optimizer is None:
            return None
        (base_state,) = globals_
        if self.moments == "reset":
            # zeros == the state right after init for optax's adam/sgd/... (counts too)
            base_state = jax.lax.cond(
                count % self.update_proj_gap == 0,
                lambda s: jax.tree_util.tree_map(jnp.zeros_like, s), lambda s: s, base_state)
        # One refresh + projection after the other (engine.after): XLA:CPU otherwise made the
        # float32 copies of every gradient of a layer for these products at once (llama_7b per
        # layer: 7 copies, 772 MiB), and ran every SVD while all the layer's gradients were
        # alive. In _projection_order a leaf's gradient is dead (projected) before the next
        # leaf's SVD starts, and the small SVDs run first.
        leaves = list(leaves)
        rs, prev = [None] * len(plans), None
        for j in _projection_order(plans):
            p, g, x = plans[j], grads[j], g3[j]
            if p.kind == "dense":
                rs[j] = g
                continue
            if prev is not None:
                x = engine.after(x, prev)
            if refresh is not None and p.kind == "proj":
                leaves[j] = refresh(j, x)
                x = engine.after(x, jax.tree_util.tree_leaves(leaves[j].projector)[0])
            rs[j] = sub.project(x, leaves[j].projector)
            prev = rs[j]
        u_tree, base_state = self.base_optimizer.update(treedef.unflatten(rs), base_state)
        us = treedef.flatten_up_to(u_tree)
        out = [(u if p.kind == "dense" else
                p.layout.from3(self.scale * sub.project_back(u, s.projector))).astype(g.dtype)
               for p, u, s, g in zip(plans, us, leaves, grads, strict=True)]
        return out, leaves, (base_state,)


def _projection_order(plans: list[Plan]) -> list[int]:
    """The order in which :meth:`Galore.update_all` refreshes and projects the leaves: the
    leaves of one block together (a block: the path up to its last name that ends in a digit,
    e.g. ``layers_3`` of ``layers_3/mlp/up/kernel``; one block when no name does, as in one
    layer's slice ``mlp/up/kernel`` or a scanned stack ``layers/mlp/up/kernel``), the blocks
    last first (the order in which a backward pass produces them), and within a block the
    smaller matrices first, ties last leaf first. The SVD of a refresh then runs while only the
    gradients of the larger matrices are still alive (llama_7b per layer: the attention
    gradients are projected before the first MLP SVD)."""
    def block(p: Plan) -> str:
        parts = p.name.split("/")
        ends = [k for k, part in enumerate(parts) if part[-1:].isdigit()]
        return "/".join(parts[:ends[-1] + 1]) if ends else ""

    def size(j: int) -> int:
        lay = plans[j].layout
        return 0 if lay is None else lay.batch * lay.m * lay.n

    order, blocks = [], {}
    for j in reversed(range(len(plans))):
        blocks.setdefault(block(plans[j]), []).append(j)
    for members in blocks.values():
        order.extend(sorted(members, key=size))
    return order


def validate(s: Galore, method: str = "galore") -> None:
    """ValueError for bad GaLore (and Fira) hyperparameters, naming the valid choices."""
    engine.check_rank(s.rank)
    sub.check_choice(s.projector, sub.PROJECTORS, "projector")
    engine.check_common(update_proj_gap=s.update_proj_gap, b1=s.b1, b2=s.b2, eps=s.eps,
                        stagger=s.stagger)
    sub.check_choice(s.proj_type, sub.PROJ_TYPES, "proj_type")
    sub.check_choice(s.moments, MOMENTS, "moments")
    engine.check_projector_args(s.oversample, s.power_iters)
    if s.base_optimizer is not None and s.moments == "project":
        raise ValueError("moments='project' needs the built-in Adam (base_optimizer=None); "
                         "use 'keep' or 'reset' with a custom base_optimizer")
    if s.stagger and s.base_optimizer is not None and s.moments == "reset":
        raise ValueError("stagger=True with moments='reset' needs the built-in Adam "
                         "(base_optimizer=None)")


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
        Refreshes always run one matrix at a time (one cond per leaf, a loop over a stack:
        :func:`lrx.optim.engine.map_matrices`), so the peak holds one matrix's decomposition
        workspace.
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
      projector_dtype / moment_dtype: storage dtypes (default float32 / None: the moments
        in each parameter's own dtype, as optax; bf16 params get bf16 moments).
      seed: PRNG seed of random/randomized projectors (kept in the state).

    Returns:
      A GradientTransformation with :class:`ScaleByGaloreState`.
    """
    strategy = Galore(
        rank=rank, update_proj_gap=update_proj_gap, stagger=stagger, scale=scale,
        proj_type=proj_type, projector=projector, moments=moments, base_optimizer=base_optimizer,
        b1=b1, b2=b2, eps=eps, mask=mask, dimension_numbers=dimension_numbers,
        oversample=oversample, power_iters=power_iters, warm_start=warm_start,
        projector_dtype=projector_dtype, moment_dtype=moment_dtype, seed=seed)
    validate(strategy)
    return engine.transform(strategy)


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
    :func:`lrx.optim.inject_hyperparams`).

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
        engine.learning_rate_then_decay(learning_rate, weight_decay, weight_decay_mask))
