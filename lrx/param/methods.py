"""Data-driven inits and rank-adaptive adapters (lrx.param v2).

Shapes use the ``(in, out)`` kernel layout of :mod:`lrx.param.nodes` (``W: (m, n)``,
``y = x @ W``); a torch ``(out, in)`` weight is ``W^T``, torch ``A: (r, in)`` is our ``a = A^T``
and torch ``B: (out, r)`` our ``b = B^T``.

- LoRA-GA - "LoRA-GA: Low-Rank Adaptation with Gradient Approximation" (Wang et al., arXiv
  2407.05000; peft ``LoraLayer.lora_ga_init``, defaults ``direction='ArB2r'``,
  ``scale='stable'``, ``stable_gamma=16``): SVD of the loss gradient ``G = dL/dW = U S V^T`` (ours);
  ``a = U[:, :r]``, ``b = diag(S[r:2r]) V[:, r:2r]^T * n^(1/4) / sqrt(gamma)`` (peft multiplies B
  by its singular values, and ``n`` = out features) and the frozen base becomes ``W - s a b``, so
  the step-0 weight is ``W``. peft uses the randomized ``svd_lowrank``; we use the exact SVD.
- LoRA-SB - "Initialization using update approximation is a silver bullet for extreme efficient
  low-rank fine-tuning" (Ponkshe et al., arXiv 2411.19557; RaghavSinghal10/lora-sb
  ``utils/gradient_utils.py``): the first full fine-tuning update is approximated by
  ``Delta = -lr * sign(G)`` (Adam's first step; ``G`` the gradient summed over a few batches); its
  SVD ``Delta = U S V^T`` gives frozen ``u = U_r: (m, r)``, ``v = V_r^T: (r, n)`` and the trainable
  ``r x r`` core ``R = diag(S_r)``: ``W = W0 + u R v``. Only ``r^2`` parameters train; the
  official ``train_arithmetic.py`` uses ``lr = lr_peak / (warmup_ratio * total_steps)`` for the
  approximation and ``alpha = r`` (scale 1). The official
  ``initialization_utils.py`` is not in our stored snapshot; following the reference notes, the
  base is not corrected, so the step-0 weight is ``W0 + U_r S_r V_r^T`` (the best rank-r
  approximation of the approximated first update).
- EVA - "One Initialization to Rule them All: Fine-tuning via Explained Variance Adaptation"
  (Paischer et al., arXiv 2410.07170; peft ``tuners/lora/eva.py``): ``a`` = the top-``r`` right
  singular vectors of the layer's input activations ``X: (tokens, m)`` (their principal
  directions), ``b = 0``. :func:`eva_ranks` redistributes a total budget of ``rank *
  num_layers`` by explained variance: each layer offers its top ``rho * rank`` components, the
  globally largest explained-variance ratios are kept.
- SoRA - "Sparse Low-rank Adaptation of Pre-trained Language Models" (Ding et al., arXiv
  2311.11696; TsinghuaC3I/SoRA ``src/lora.py``, ``src/sparse_optimizer.py``):
  ``W = W0 + s a diag(g) b`` with a trainable gate ``g: (r,)`` (``randn`` init in the official
  code), ``a`` Kaiming-uniform, ``b = 0``; after each optimizer step the gate is soft-thresholded,
  ``g <- sign(g) max(|g| - xi, 0)`` (:func:`sora_proximal`, an optax transform on the gate leaves).
- DyLoRA - "DyLoRA: Parameter-Efficient Tuning of Pre-trained Models using Dynamic Search-Free
  Low-Rank Adaptation" (Valipour et al., arXiv 2210.07558): LoRA with ``r_max``; each step a rank
  ``b ~ U{1..r_max}`` is sampled and only the first ``b`` columns of ``a`` / rows of ``b`` are used
  with scale ``alpha / b`` (:func:`dylora_sample_rank` sets it from a per-step key); afterwards
  the adapter works at every rank ``<= r_max`` (:func:`set_rank`). The active rank is a float
  scalar leaf (frozen), so changing it does not recompile.
- Trained Rank Pruning - "TRP: Trained Rank Pruning for Efficient Deep Neural Networks" (Xu et
  al., arXiv 1812.02402 / IJCAI 2020; yuhuixu1993/Trained-Rank-Pruning): every ``period`` steps each
  dense matrix is replaced by its truncated SVD keeping the smallest ``k`` with energy
  ``sum_{i<=k} s_i^2 / sum s^2 >= energy`` (:func:`trp_truncate`); the nuclear-norm
  subgradient ``U_k V_k^T`` is added to the gradient with weight ``nuclear_weight``
  (:func:`trp_nuclear_regularizer`, an optax transform).
- WeLore LRC fine-tuning - "From GaLore to WeLore" (Jaiswal et al., arXiv 2407.11239):
  :func:`welore_lrc` factorises the Low-Rank Components found by
  :func:`lrx.analysis.welore_classify` into trainable :class:`~lrx.param.LowRank` nodes at their
  reduced rank and marks every other matrix frozen (via :func:`frozen_labels`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lrx.param.core import Factored, frozen, is_node, register_node, static, trainable
from lrx.param.nodes import (
    Factory,
    LoRA,
    _alpha_or_rank,
    _check_matrix,
    _check_rank,
    _check_rank_fits,
    _f32,
    _kaiming,
    _positive_or_none,
)

Array = jax.Array
PyTree = Any


def _check_stat(stat: Any, shape: tuple[int, ...] | None, method: str, what: str) -> Array:
    if stat is None:
        raise ValueError(f"{method}: needs {what}; pass lrx.param.apply(..., stats=...) with an "
                         "entry at this parameter's path")
    stat = jnp.asarray(stat)
    if shape is not None and tuple(stat.shape) != tuple(shape):
        raise ValueError(f"{method}: {what} has shape {tuple(stat.shape)}, expected {shape}")
    return stat


# --------------------------------------------------------------------------------------------
# LoRA-GA and EVA: data-driven LoRA inits (the node is a plain LoRA)


@dataclasses.dataclass(frozen=True)
class LoRAGAFactory(Factory):
    """LoRA-GA init from the loss gradient ``stat = dL/dW: (m, n)`` (peft defaults).

    Attributes:
      rank: ``1 <= rank <= min(m, n) / 2`` (the init uses ``2 rank`` singular directions).
      alpha: ``None`` means ``alpha = rank``; ``s = alpha / rank``.
      stable_gamma: ``gamma`` of peft's ``'stable'`` scaling ``n^(1/4) / sqrt(gamma)``.
    """

    rank: int
    alpha: float | None = None
    stable_gamma: float = 16.0
    method: ClassVar[str] = "lora_ga"
    needs_stat: ClassVar[str] = "gradient"

    def __post_init__(self) -> None:
        _check_rank(self.rank, self.method)
        _positive_or_none(self.alpha, "alpha", self.method)
        _positive_or_none(self.stable_gamma, "stable_gamma", self.method)

    def __call__(self, key: Array, w: Array, stat: Array | None = None) -> LoRA:
        shape = _check_matrix(w, self.method)
        _check_rank_fits(2 * self.rank, shape, self.method + " (2 * rank)")
        g = _check_stat(stat, shape, self.method, "the loss gradient dL/dW")
        w = jnp.asarray(w)
        r, s = self.rank, _alpha_or_rank(self.alpha, self.rank) / self.rank
        u, sv, vt = jnp.linalg.svd(_f32(g), full_matrices=False)
        a = u[:, :r]
        b = sv[r:2 * r, None] * vt[r:2 * r] * (shape[1] ** 0.25 / math.sqrt(self.stable_gamma))
        base = _f32(w) - s * (a @ b)
        return LoRA(shape=shape, base=base.astype(w.dtype), a=a.astype(w.dtype),
                    b=b.astype(w.dtype), scale=s, init="lora_ga")


@dataclasses.dataclass(frozen=True)
class EVAFactory(Factory):
    """EVA init from the layer's input activations ``stat = X: (tokens, m)``: ``a`` = top-``rank``
    right singular vectors of ``X``, ``b = 0``.

    Attributes:
      rank: ``1 <= rank <= min(m, n, tokens)`` (per layer; see :func:`eva_ranks`).
      alpha: ``None`` means ``alpha = rank``; ``s = alpha / rank``.
    """

    rank: int
    alpha: float | None = None
    method: ClassVar[str] = "eva"
    needs_stat: ClassVar[str] = "activations"

    def __post_init__(self) -> None:
        _check_rank(self.rank, self.method)
        _positive_or_none(self.alpha, "alpha", self.method)

    def __call__(self, key: Array, w: Array, stat: Array | None = None) -> LoRA:
        shape = _check_matrix(w, self.method)
        _check_rank_fits(self.rank, shape, self.method)
        x = _check_stat(stat, None, self.method, "the layer's input activations (tokens, m)")
        x = x.reshape(-1, x.shape[-1])
        if x.shape[1] != shape[0] or x.shape[0] < self.rank:
            raise ValueError(f"eva: activations {tuple(x.shape)} need {shape[0]} features and >= "
                             f"rank={self.rank} tokens")
        w = jnp.asarray(w)
        _, _, vt = jnp.linalg.svd(_f32(x), full_matrices=False)
        a = vt[:self.rank].T
        return LoRA(shape=shape, base=w, a=a.astype(w.dtype),
                    b=jnp.zeros((self.rank, shape[1]), w.dtype),
                    scale=_alpha_or_rank(self.alpha, self.rank) / self.rank, init="eva")


def eva_ranks(activations: Mapping[str, Array], rank: int, rho: float = 2.0) -> dict[str, int]:
    """EVA's rank redistribution: ranks per layer summing to ``rank * len(activations)``.

    Each layer offers the explained-variance ratios ``s_i^2 / sum_j s_j^2`` of its top
    ``min(floor(rho * rank), m, tokens)`` components (``s`` = singular values of its activations
    ``(tokens, m)``); the globally largest ``rank * num_layers`` ratios are kept (ties by order).
    Every layer keeps at least one component.

    Args:
      activations: ``{path: X (..., m)}`` input activations of each adapted layer.
      rank: the uniform rank the budget is computed from.
      rho: maximum rank of one layer as a multiple of ``rank`` (peft ``rho=2``).
    Returns:
      ``{path: r_l}``.
    """
    _check_rank(rank, "eva_ranks")
    if rho < 1:
        raise ValueError(f"eva_ranks: rho must be >= 1, got {rho}")
    offers = []
    for path, x in activations.items():
        x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
        s = np.linalg.svd(x, compute_uv=False)
        ratio = s**2 / np.sum(s**2)
        k = min(int(math.floor(rho * rank)), len(s))
        offers += [(-ratio[i], path, i) for i in range(k)]
    offers.sort()
    budget = rank * len(activations)
    ranks = {path: 0 for path in activations}
    for _, path, _ in offers[:budget]:
        ranks[path] += 1
    for path in ranks:
        ranks[path] = max(ranks[path], 1)
    return ranks


# --------------------------------------------------------------------------------------------
# LoRA-SB


@register_node
class LoRASB(Factored):
    """``W = base + scale * u @ core @ v``; ``base: (m, n)``, ``u: (m, r)``, ``v: (r, n)`` frozen,
    ``core: (r, r)`` trainable."""

    shape: tuple[int, int] = static()
    base: Array = frozen()
    u: Array = frozen()
    core: Array = trainable()
    v: Array = frozen()
    scale: float = static(1.0)

    def materialize(self) -> Array:
        return self.base + self.scale * (self.u @ self.core @ self.v)

    def dot(self, x: Array) -> Array:
        dt = x.dtype
        h = (x @ self.u.astype(dt)) @ self.core.astype(dt)
        return x @ self.base.astype(dt) + self.scale * (h @ self.v.astype(dt))


@dataclasses.dataclass(frozen=True)
class LoRASBFactory(Factory):
    """LoRA-SB from the loss gradient ``stat = G: (m, n)`` (summed over the estimation batches).

    Attributes:
      rank: ``1 <= rank <= min(m, n)``; ``rank^2`` trainable parameters per matrix.
      learning_rate: ``lr`` of the approximated first update ``-lr * sign(G)``.
    """

    rank: int
    learning_rate: float = 1e-3
    method: ClassVar[str] = "lora_sb"
    needs_stat: ClassVar[str] = "gradient"

    def __post_init__(self) -> None:
        _check_rank(self.rank, self.method)
        _positive_or_none(self.learning_rate, "learning_rate", self.method)

    def __call__(self, key: Array, w: Array, stat: Array | None = None) -> LoRASB:
        shape = _check_matrix(w, self.method)
        _check_rank_fits(self.rank, shape, self.method)
        g = _check_stat(stat, shape, self.method, "the loss gradient dL/dW")
        w = jnp.asarray(w)
        delta = -self.learning_rate * jnp.sign(_f32(g))
        u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
        r = self.rank
        return LoRASB(shape=shape, base=w, u=u[:, :r].astype(w.dtype),
                      core=jnp.diag(s[:r]).astype(w.dtype), v=vt[:r].astype(w.dtype), scale=1.0)


# --------------------------------------------------------------------------------------------
# SoRA


@register_node
class SoRA(Factored):
    """``W = base + scale * a @ diag(gate) @ b``; ``base`` frozen; ``a: (m, r)``, ``gate: (r,)``,
    ``b: (r, n)`` trainable. Zero gates prune rank-one terms (:meth:`effective_rank`)."""

    shape: tuple[int, int] = static()
    base: Array = frozen()
    a: Array = trainable()
    gate: Array = trainable()
    b: Array = trainable()
    scale: float = static(1.0)

    def materialize(self) -> Array:
        return self.base + self.scale * ((self.a * self.gate[None, :]) @ self.b)

    def dot(self, x: Array) -> Array:
        dt = x.dtype
        h = (x @ self.a.astype(dt)) * self.gate.astype(dt)
        return x @ self.base.astype(dt) + self.scale * (h @ self.b.astype(dt))

    def effective_rank(self) -> Array:
        """Number of nonzero gates ``()``."""
        return jnp.sum(self.gate != 0)


@dataclasses.dataclass(frozen=True)
class SoRAFactory(Factory):
    """SoRA adapter with ``r_max = rank`` gated components.

    Attributes:
      rank: ``r_max``, ``1 <= rank <= min(m, n)``.
      alpha: ``None`` means ``alpha = rank``; ``s = alpha / rank``.
    """

    rank: int
    alpha: float | None = None
    method: ClassVar[str] = "sora"

    def __post_init__(self) -> None:
        _check_rank(self.rank, self.method)
        _positive_or_none(self.alpha, "alpha", self.method)

    def __call__(self, key: Array, w: Array) -> SoRA:
        shape = _check_matrix(w, self.method)
        _check_rank_fits(self.rank, shape, self.method)
        w = jnp.asarray(w)
        k_a, k_g = jax.random.split(key)
        return SoRA(shape=shape, base=w, a=_kaiming(k_a, (shape[0], self.rank), shape[0], w.dtype),
                    gate=jax.random.normal(k_g, (self.rank,), jnp.float32).astype(w.dtype),
                    b=jnp.zeros((self.rank, shape[1]), w.dtype),
                    scale=_alpha_or_rank(self.alpha, self.rank) / self.rank)


def _node_field_tree(tree: PyTree, node_type: type, field: str, fn: Callable[[Array], Array]
                     ) -> PyTree:
    """``fn`` applied to ``field`` of every ``node_type`` node (other leaves unchanged)."""

    def one(x: Any) -> Any:
        if isinstance(x, node_type) and getattr(x, field) is not None:
            return x.replace(**{field: fn(getattr(x, field))})
        return x

    return jax.tree.map(one, tree, is_leaf=is_node)


class SoRAProximalState(NamedTuple):
    """Stateless."""


def sora_proximal(threshold: float) -> optax.GradientTransformation:
    """SoRA's proximal step on the gates, to chain *after* the optimizer:
    ``g_new = sign(g + u) max(|g + u| - threshold, 0)``; the update of a gate leaf becomes
    ``g_new - g`` (needs ``params``); every other update passes unchanged. ``threshold`` is the
    absolute ``xi`` of the official ``SparseAdamW`` (``sparse_lambda_2``, 3e-4 in its scripts).

    Works on trees containing :class:`SoRA` nodes (full or partitioned trainable part).
    """
    if threshold < 0:
        raise ValueError(f"sora_proximal: threshold must be >= 0, got {threshold}")

    def init_fn(params: PyTree) -> SoRAProximalState:
        del params
        return SoRAProximalState()

    def update_fn(updates: PyTree, state: SoRAProximalState, params: PyTree | None = None):
        if params is None:
            raise ValueError("sora_proximal needs params (optax.apply_updates convention)")

        def one(u: Any, p: Any) -> Any:
            if not isinstance(u, SoRA) or u.gate is None:
                return u
            z = p.gate + u.gate
            new = jnp.sign(z) * jnp.maximum(jnp.abs(z) - threshold, 0.0)
            return u.replace(gate=(new - p.gate).astype(u.gate.dtype))

        return jax.tree.map(one, updates, params, is_leaf=is_node), state

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# DyLoRA


@register_node
class DyLoRA(Factored):
    """``W = base + (alpha / b) a[:, :b] @ b_[:b]`` with the active rank ``b = active_rank``;
    ``base`` and ``active_rank: ()`` (float32, an integer value) frozen; ``a: (m, r_max)``,
    ``b: (r_max, n)`` trainable."""

    shape: tuple[int, int] = static()
    base: Array = frozen()
    a: Array = trainable()
    b: Array = trainable()
    active_rank: Array = frozen()
    alpha: float = static(1.0)

    def _mask_scale(self) -> tuple[Array, Array]:
        r_max = self.a.shape[1]
        active = _f32(self.active_rank)
        mask = (jnp.arange(r_max, dtype=jnp.float32) < active).astype(jnp.float32)
        return mask, self.alpha / active

    def materialize(self) -> Array:
        mask, s = self._mask_scale()
        delta = (_f32(self.a) * mask[None, :]) @ _f32(self.b)
        return (self.base + s * delta).astype(self.base.dtype)

    def dot(self, x: Array) -> Array:
        dt = x.dtype
        mask, s = self._mask_scale()
        h = (x @ self.a.astype(dt)) * mask.astype(dt)
        return x @ self.base.astype(dt) + s.astype(dt) * (h @ self.b.astype(dt))


@dataclasses.dataclass(frozen=True)
class DyLoRAFactory(Factory):
    """DyLoRA adapter with nested ranks ``1..rank``.

    Attributes:
      rank: ``r_max``, ``1 <= rank <= min(m, n)``; starts active at ``r_max``.
      alpha: ``None`` means ``alpha = rank``; scale ``alpha / b`` at active rank ``b``.
    """

    rank: int
    alpha: float | None = None
    method: ClassVar[str] = "dylora"

    def __post_init__(self) -> None:
        _check_rank(self.rank, self.method)
        _positive_or_none(self.alpha, "alpha", self.method)

    def __call__(self, key: Array, w: Array) -> DyLoRA:
        shape = _check_matrix(w, self.method)
        _check_rank_fits(self.rank, shape, self.method)
        w = jnp.asarray(w)
        return DyLoRA(shape=shape, base=w,
                      a=_kaiming(key, (shape[0], self.rank), shape[0], w.dtype),
                      b=jnp.zeros((self.rank, shape[1]), w.dtype),
                      active_rank=jnp.asarray(float(self.rank), jnp.float32),
                      alpha=_alpha_or_rank(self.alpha, self.rank))


def set_rank(tree: PyTree, rank: int | Array) -> PyTree:
    """Every :class:`DyLoRA` node of ``tree`` (full or frozen part) set to active rank ``rank``
    (clipped to ``[1, r_max]`` of each node); works under ``jit``."""

    def one(x: Any) -> Any:
        if isinstance(x, DyLoRA) and x.active_rank is not None:
            r_max = x.a.shape[1] if x.a is not None else None
            r = jnp.asarray(rank, jnp.float32)
            r = jnp.clip(r, 1.0, float(r_max)) if r_max is not None else jnp.maximum(r, 1.0)
            return x.replace(active_rank=r)
        return x

    return jax.tree.map(one, tree, is_leaf=is_node)


def dylora_sample_rank(key: Array, r_max: int) -> Array:
    """The rank of one DyLoRA step, ``b ~ U{1..r_max}`` (float32 scalar); pass a fresh key per
    step, e.g. ``fold_in(key, step)``."""
    return jax.random.randint(key, (), 1, r_max + 1).astype(jnp.float32)


# --------------------------------------------------------------------------------------------
# Trained Rank Pruning


def _energy_rank(s: Array, energy: float) -> Array:
    e = jnp.cumsum(s**2) / jnp.maximum(jnp.sum(s**2), 1e-30)
    return jnp.minimum(jnp.sum(e < energy) + 1, s.shape[0])


def trp_truncate(params: PyTree, energy: float = 0.9, mask: Callable[[str, Array], bool]
                 | None = None) -> PyTree:
    """TRP's periodic truncation: each dense 2-D leaf (or those where ``mask(path, x)``) replaced
    by ``U_k S_k V_k^T`` with the smallest ``k`` whose energy ``sum_{i<=k} s_i^2 / sum s^2`` reaches
    ``energy`` (official default 0.9). Works under ``jit`` (``k`` is data-dependent, applied as a
    mask on the spectrum)."""
    if not 0 < energy <= 1:
        raise ValueError(f"trp_truncate: energy must be in (0, 1], got {energy}")
    from lrx.paths import path_str

    def one(path: Any, x: Any) -> Any:
        if is_node(x) or np.ndim(x) != 2 or (mask is not None and not mask(path_str(path), x)):
            return x
        u, s, vt = jnp.linalg.svd(_f32(x), full_matrices=False)
        k = _energy_rank(s, energy)
        s = jnp.where(jnp.arange(s.shape[0]) < k, s, 0.0)
        return ((u * s[None, :]) @ vt).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_node)


def trp_nuclear_regularizer(nuclear_weight: float = 3e-4, energy: float = 0.9
                            ) -> optax.GradientTransformation:
    """Adds TRP's nuclear-norm subgradient ``nuclear_weight * U_k V_k^T`` (``k`` at ``energy`` as
    in :func:`trp_truncate`) to the gradient of every dense 2-D leaf; chain it before the
    optimizer. Needs ``params``."""

    def init_fn(params: PyTree) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates: PyTree, state: optax.EmptyState, params: PyTree | None = None):
        if params is None:
            raise ValueError("trp_nuclear_regularizer needs params")

        def one(g: Any, p: Any) -> Any:
            if is_node(p) or g is None or np.ndim(p) != 2:
                return g
            u, s, vt = jnp.linalg.svd(_f32(p), full_matrices=False)
            k = _energy_rank(s, energy)
            keep = (jnp.arange(s.shape[0]) < k).astype(jnp.float32)
            return (g + nuclear_weight * ((u * keep[None, :]) @ vt)).astype(g.dtype)

        return jax.tree.map(one, updates, params, is_leaf=is_node), state

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------------
# WeLore: fine-tune only the low-rank components


def welore_lrc(params: PyTree, target_reduction: float, *, paths_regex: str = ".*",
               min_ratio: float = 0.4) -> tuple[PyTree, PyTree]:
    """WeLore's LRC fine-tuning: classify the 2-D matrices matching ``paths_regex`` with
    :func:`lrx.analysis.welore_classify`; each Low-Rank Component becomes a trainable
    :class:`~lrx.param.LowRank` node at its reduced rank (spectral init = its truncated SVD).

    Returns:
      ``(params, labels)``: the new tree, and a label tree (``'train'`` for the LRC nodes,
      ``'freeze'`` for every other leaf) for ``optax.multi_transform`` with
      ``optax.set_to_zero()`` on ``'freeze'``.
    """
    import re

    from lrx.analysis import spectra
    from lrx.param.nodes import LowRankFactory
    from lrx.paths import path_str

    regex = re.compile(paths_regex)
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)[0]
    mats = {path_str(p): x for p, x in flat
            if not is_node(x) and np.ndim(x) == 2 and regex.fullmatch(path_str(p))}
    sv = {p: jnp.linalg.svd(_f32(x), compute_uv=False) for p, x in mats.items()}
    info = spectra.welore_classify(sv, target_reduction, min_ratio=min_ratio)
    ranks = {p: max(1, int(e["kept_rank"])) for p, e in info.items() if e["lrc"]}

    def one(path: Any, x: Any) -> Any:
        p = path_str(path)
        if p in ranks:
            return LowRankFactory(rank=min(ranks[p], min(np.shape(x))))(jax.random.key(0), x)
        return x

    new = jax.tree_util.tree_map_with_path(one, params, is_leaf=is_node)
    labels = jax.tree.map(lambda x: "train" if is_node(x) else "freeze", new, is_leaf=is_node)
    return new, labels


FACTORIES_V2: dict[str, type[Factory]] = {
    f.method: f for f in (LoRAGAFactory, EVAFactory, LoRASBFactory, SoRAFactory, DyLoRAFactory)}

__all__ = [
    "DyLoRA", "DyLoRAFactory", "EVAFactory", "LoRAGAFactory", "LoRASB",
    "LoRASBFactory", "SoRA", "SoRAFactory", "dylora_sample_rank", "eva_ranks", "set_rank",
    "sora_proximal", "trp_nuclear_regularizer", "trp_truncate", "welore_lrc",
]
