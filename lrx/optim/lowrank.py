"""The engine behind ``scale_by_galore``, ``scale_by_frugal`` and ``scale_by_fira``.

One transformation, three per-leaf rules (see ``galore.py``, ``frugal.py``, ``fira.py`` for the
papers and equations). Shared structure:

* every selected leaf is a stack of independent matrices ``(B, m, n)`` (:mod:`lrx.optim.subspace`);
* the refresh (new projectors, moment policy, FRUGAL block choice) runs inside ONE ``lax.cond`` on
  the scalar predicate ``count % update_proj_gap == 0``; stacked leaves are refreshed by batched
  linear algebra (``jnp.linalg.svd``/``qr``/``eigh`` over the leading axis), never by ``vmap`` of a
  ``cond``, so under ``jit`` the SVDs run only on refresh steps (``vmap`` of a ``cond`` would turn
  into a ``select`` and compute them every step);
* the state is a NamedTuple of arrays (and ``None`` for absent parts), so it checkpoints with orbax.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrx.optim import subspace as sub
from lrx.optim.masks import path_name

MOMENTS = ("keep", "reset", "project")
SUBSPACES = ("svd", "random", "randperm", "columns", "rows", "blocks")
STATE_FREE = ("signsgd", "sgd", "none")
RESIDUALS = ("official", "paper")
BLOCK_ORDERS = ("random", "ascending", "descending")


class LowRankState(NamedTuple):
    """State of the low-rank transforms (leaf-aligned trees have the params' structure).

    count: int32 ``[]``, updates done so far (refresh when ``count % update_proj_gap == 0``).
    moment_count: per leaf int32 ``(B,)``: steps since each matrix's last moment restart (bias
      correction of projected leaves under ``moments='reset'`` and of FRUGAL blocks, which
      restart on every (re-)activation); ``None`` for other leaves.
    key: uint32 ``[2]`` PRNG key (the seed) or ``None`` for purely deterministic projectors.
    projector: per leaf a :class:`lrx.optim.subspace.Projector` (``(B, m, r)``/``(B, n, r)``)
      or None.
    mu, nu: per leaf Adam moments: projected ``R`` shape ``(B, ...)`` for projected leaves, the leaf
      shape otherwise, ``None`` for state-free leaves.
    extra: per leaf Fira's limiter norm ``(B,)`` / FRUGAL's block activity ``(B,)`` or None.
    base_state: state of a user ``base_optimizer`` (GaLore) or ``None``.
    """

    count: jax.Array
    moment_count: jax.Array | None
    key: jax.Array | None
    projector: Any
    mu: Any
    nu: Any
    extra: Any
    base_state: Any


@dataclasses.dataclass(frozen=True)
class Settings:
    """Static hyperparameters of the engine (validated by :func:`make`)."""

    method: str                        # 'galore' | 'frugal' | 'fira'
    rank: int | None = None            # galore/fira
    density: float | None = None       # frugal
    update_proj_gap: int = 200
    scale: Any = 0.25
    proj_type: str = "std"
    projector: str = "svd"             # svd | randomized | random | randperm
    moments: str = "keep"
    b1: Any = 0.9
    b2: Any = 0.999
    eps: Any = 1e-6
    # frugal
    subspace: str = "svd"
    state_free: str = "signsgd"
    state_free_lr_scale: Any = 1.0
    proj_params_lr_scale: Any = 1.0
    block_order: str = "random"
    # fira
    gamma: Any = 1.01
    residual: str = "official"
    # projector details
    oversample: int = 8
    power_iters: int = 1
    warm_start: bool = False
    projector_dtype: Any = jnp.float32
    moment_dtype: Any = None
    seed: int = 0
    stagger: bool = False
    block_order_key: Any = None
    mask: Any = None
    dimension_numbers: Any = None
    base_optimizer: Any = None


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static per-leaf plan."""

    kind: str                          # 'dense' (full-rank Adam) | 'proj' | 'block' | 'free'
    layout: sub.Layout | None = None
    side: str | None = None
    rank: int = 0
    name: str = ""                     # '/'-joined path


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def validate(s: Settings) -> None:
    """Raises ValueError for bad hyperparameters (names the key and the valid choices)."""
    sub.check_choice(s.method, ("galore", "frugal", "fira"), "method")
    if s.method in ("galore", "fira"):
        if not isinstance(s.rank, int) or isinstance(s.rank, bool) or s.rank <= 0:
            raise ValueError(f"rank must be a positive Python int, got {s.rank!r} (under "
                             "optax.inject_hyperparams use lrx.optim.inject_hyperparams, which "
                             "keeps shape-defining arguments static)")
        sub.check_choice(s.projector, sub.PROJECTORS, "projector")
    else:
        if not _is_number(s.density) or not 0.0 <= s.density <= 1.0:
            raise ValueError(f"density must be a number in [0, 1], got {s.density!r}")
        sub.check_choice(s.subspace, SUBSPACES, "subspace")
        sub.check_choice(s.state_free, STATE_FREE, "state_free")
        sub.check_choice(s.block_order, BLOCK_ORDERS, "block_order")
        if s.proj_type == "full":
            raise ValueError("frugal supports proj_type 'std', 'reverse_std', 'left', 'right'")
    if not isinstance(s.update_proj_gap, int) or s.update_proj_gap <= 0:
        raise ValueError(f"update_proj_gap must be a positive int, got {s.update_proj_gap!r}")
    sub.check_choice(s.proj_type, sub.PROJ_TYPES, "proj_type")
    sub.check_choice(s.moments, MOMENTS, "moments")
    if s.method == "fira":
        sub.check_choice(s.residual, RESIDUALS, "residual")
        if s.proj_type == "full":
            raise ValueError("fira needs a one-sided projection: proj_type must be one of "
                             "'std', 'reverse_std', 'left', 'right'")
        if _is_number(s.gamma) and s.gamma < 1.0:
            raise ValueError(f"gamma must be >= 1, got {s.gamma}")
    if s.base_optimizer is not None and s.moments == "project":
        raise ValueError("moments='project' needs the built-in Adam (base_optimizer=None); "
                         "use 'keep' or 'reset' with a custom base_optimizer")
    if not isinstance(s.stagger, bool):
        raise ValueError(f"stagger must be a bool, got {s.stagger!r}")
    if s.stagger and s.method == "frugal" and s.subspace == "blocks":
        raise ValueError("stagger=True does not apply to subspace='blocks' "
                         "(blocks switch together)")
    if s.stagger and s.base_optimizer is not None and s.moments == "reset":
        raise ValueError("stagger=True with moments='reset' needs the built-in Adam "
                         "(base_optimizer=None)")
    if s.block_order_key is not None and not callable(s.block_order_key):
        raise ValueError("block_order_key must be a callable (name, layer) -> sortable key")
    for name in ("oversample", "power_iters"):
        v = getattr(s, name)
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")
    for name in ("b1", "b2"):
        v = getattr(s, name)
        if _is_number(v) and not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    if _is_number(s.eps) and s.eps < 0:
        raise ValueError(f"eps must be >= 0, got {s.eps}")


# ----------------------------------------------------------------------------------------- plans

def _mask_leaves(s: Settings, tree: Any, treedef) -> list:
    leaves = treedef.flatten_up_to(tree)
    if s.mask is None:
        return [getattr(x, "ndim", 0) >= 2 for x in leaves]
    mask = s.mask(tree) if callable(s.mask) else s.mask
    try:
        flat = treedef.flatten_up_to(mask)
    except (ValueError, TypeError) as e:
        raise ValueError(f"mask must be a pytree of bools with the structure of the params: {e}"
                         ) from None
    return [bool(m) for m in flat]


def _dims_leaves(s: Settings, treedef, n: int) -> list:
    d = s.dimension_numbers
    if d is None or isinstance(d, sub.DimensionNumbers):
        return [d] * n
    return treedef.flatten_up_to(d)


def is_variable(x: Any) -> bool:
    """True for a ``flax.nnx.Variable`` (``nnx.Param`` ...): the engine treats one as a leaf
    holding its array, so nnx states work like plain pytrees (``nnx.Optimizer(model, tx,
    wrt=nnx.Param)``)."""
    try:
        from flax import nnx
    except ImportError:          # pragma: no cover - flax is a dependency
        return False
    return isinstance(x, nnx.Variable)


def flatten_with_path(tree: Any) -> tuple[list, Any]:
    """``jax.tree_util.tree_flatten_with_path`` with nnx Variables as leaves."""
    return jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_variable)


def leaf_value(x: Any) -> Any:
    """The array of a leaf (the value of an nnx Variable)."""
    return x.get_value() if is_variable(x) else x


def rewrap(like: Any, value: Any) -> Any:
    """``value`` in the container of ``like`` (an nnx Variable keeps its type and metadata)."""
    return like.replace(value) if is_variable(like) else value


def select_layouts(tree: Any, mask: Any = None, dimension_numbers: Any = None
                   ) -> tuple[list[sub.Layout | None], list[str], Any, list]:
    """The engine's leaf selection for any method: ``(layouts, names, treedef, leaves)`` with a
    :class:`lrx.optim.subspace.Layout` ``(B, m, n)`` per selected leaf (None for the others).

    ``mask``: None (every leaf with ``ndim >= 2``), a bool pytree like ``tree`` or a callable
    ``tree -> bools``; ``dimension_numbers``: None, one :class:`DimensionNumbers` or a pytree.
    """
    holder = Settings(method="galore", mask=mask, dimension_numbers=dimension_numbers)
    leaves_with_path, treedef = flatten_with_path(tree)
    leaves_with_path = [(path, leaf_value(x)) for path, x in leaves_with_path]
    leaves = [x for _, x in leaves_with_path]
    masks = _mask_leaves(holder, tree, treedef)
    dims = _dims_leaves(holder, treedef, len(leaves))
    layouts, names = [], []
    for (path, x), m, d in zip(leaves_with_path, masks, dims, strict=True):
        name = path_name(path)
        names.append(name)
        if not m:
            layouts.append(None)
            continue
        if d is None:
            if getattr(x, "ndim", 0) < 2:
                raise ValueError(f"mask selects leaf {name!r} of shape "
                                 f"{tuple(getattr(x, 'shape', ()))}, which is not a matrix; "
                                 "exclude it from the mask or give dimension_numbers")
            d = sub.DimensionNumbers()
        layouts.append(sub.Layout.of(x.shape, d))
    return layouts, names, treedef, leaves


def plans(s: Settings, tree: Any) -> tuple[list[Plan], Any, list]:
    """Per-leaf plans for ``tree`` (params or updates): ``(plans, treedef, leaves)``."""
    leaves_with_path, treedef = flatten_with_path(tree)
    leaves_with_path = [(path, leaf_value(x)) for path, x in leaves_with_path]
    leaves = [x for _, x in leaves_with_path]
    masks = _mask_leaves(s, tree, treedef)
    dims = _dims_leaves(s, treedef, len(leaves))
    out = []
    for (path, x), m, d in zip(leaves_with_path, masks, dims, strict=True):
        name = path_name(path)
        if not m:
            out.append(Plan("dense", name=name))
            continue
        ndim = getattr(x, "ndim", 0)
        if d is None:
            if ndim < 2:
                raise ValueError(f"mask selects leaf {path_name(path)!r} of shape "
                                 f"{tuple(getattr(x, 'shape', ()))}, which is not a matrix; "
                                 "exclude it from the mask or give dimension_numbers")
            d = sub.DimensionNumbers()
        layout = sub.Layout.of(x.shape, d)
        out.append(dataclasses.replace(_leaf_plan(s, layout), name=name))
    return out, treedef, leaves


# Module names in the order a LLaMA-style model defines them (lrx.models.llama and the HF names):
# FRUGAL's default block order walks the modules of a layer in this order.
MODULE_ORDER = ("embedding", "embed", "embed_tokens", "layers", "attn_norm", "input_layernorm",
                "attn", "self_attn", "q", "q_proj", "k", "k_proj", "v", "v_proj", "o", "o_proj",
                "mlp_norm", "post_attention_layernorm", "mlp", "gate", "gate_proj", "up",
                "up_proj", "down", "down_proj", "final_norm", "norm", "lm_head", "kernel")
_RANK = {name: i for i, name in enumerate(MODULE_ORDER)}
_INT = re.compile(r"\d+")


def _natural(text: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text) if t)


def model_order_key(name: str, layer: int | None) -> tuple:
    """Default FRUGAL block order: the model's order, layer by layer (as the official code walks
    ``model.named_parameters()``).

    ``name`` is the leaf path (``'layers_10/attn/q/kernel'``), ``layer`` the index along a scanned
    stack's batch axis (``None`` for unstacked leaves). The layer is the stack index, or else the
    first integer in the path (natural order: ``layers_2`` before ``layers_10``). Within a layer
    the modules follow :data:`MODULE_ORDER` (the definition order of lrx's LLaMA; unknown names
    after the known ones, in natural order). Leaves outside any layer come before the layers,
    except known post-layer modules (final norm, LM head), which come after. A Python dict's own
    insertion order cannot be used: every jax transformation rebuilds dicts with sorted keys.
    Pass ``block_order_key=`` (same signature, any sortable result) for other models."""
    parts = name.split("/")
    ranks = tuple((_RANK.get(_INT.sub("_", p).rstrip("_"), len(_RANK)), _natural(p))
                  for p in parts)
    if layer is None:
        found = _INT.search(name)
        layer = int(found.group()) if found else None
    if layer is None:
        first = ranks[0][0] if ranks else len(_RANK)
        after = _RANK["layers"] < first < len(_RANK)       # a known post-layer module
        return (2 if after else 0, 0, ranks)
    return (1, layer, ranks)


def _leaf_plan(s: Settings, layout: sub.Layout) -> Plan:
    m, n = layout.m, layout.n
    if s.method in ("galore", "fira"):
        side = sub.resolve_side(m, n, s.proj_type)
        return Plan("proj", layout, side, min(s.rank, m, n))
    if s.subspace == "blocks":
        return Plan("block", layout) if s.density > 0 else Plan("free", layout)
    if s.subspace in ("columns", "rows"):
        side = "right" if s.subspace == "columns" else "left"
        rank = int((n if side == "right" else m) * s.density)
    else:
        side = sub.resolve_side(m, n, s.proj_type)
        rank = round((n if side == "right" else m) * s.density)
    if rank == 0:
        return Plan("free", layout)
    return Plan("proj", layout, side, rank)


def _proj_method(s: Settings) -> str:
    if s.method != "frugal":
        return s.projector
    return {"svd": "svd", "random": "random", "randperm": "randperm", "columns": "randperm",
            "rows": "randperm", "blocks": "none"}[s.subspace]


def _needs_key(s: Settings) -> bool:
    if s.method == "frugal":
        return s.subspace != "svd" and not (s.subspace == "blocks" and s.block_order != "random")
    return s.projector != "svd"


def _resets(s: Settings) -> bool:
    return s.moments == "reset"


# ------------------------------------------------------------------------------------------ math

def _pow(b, k):
    return jnp.power(jnp.asarray(b, jnp.float32), k.astype(jnp.float32))


def _moments(mu, nu, g, b1, b2):
    g = g.astype(jnp.float32)
    mu = b1 * mu.astype(jnp.float32) + (1.0 - b1) * g
    nu = b2 * nu.astype(jnp.float32) + (1.0 - b2) * g * g
    return mu, nu


def _adam_galore(mu, nu, b1, b2, eps, k):
    """transformers/GaLore AdamW: ψ = m / (sqrt(v) + eps) and factor sqrt(1-b2^k)/(1-b1^k)."""
    psi = mu / (jnp.sqrt(nu) + eps)
    return psi, jnp.sqrt(1.0 - _pow(b2, k)) / (1.0 - _pow(b1, k))


def _adam_torch(mu, nu, b1, b2, eps, k):
    """torch/FRUGAL AdamW direction (m / bc1) / (sqrt(v) / sqrt(bc2) + eps)."""
    bc1 = 1.0 - _pow(b1, k)
    bc2 = 1.0 - _pow(b2, k)
    return (mu / bc1) / (jnp.sqrt(nu) / jnp.sqrt(bc2) + eps)


def _rotate(mu, nu, old: sub.Projector, new: sub.Projector):
    """First moment into the new basis (``C = P_newᵀ P_old``); second moment with ``C∘C``."""
    if new.left is not None:
        c = jnp.einsum("bmr,bms->brs", new.left, old.left).astype(jnp.float32)
        mu = jnp.einsum("brs,bsn->brn", c, mu)
        nu = jnp.einsum("brs,bsn->brn", c * c, nu)
    if new.right is not None:
        c = jnp.einsum("bnr,bns->brs", old.right, new.right).astype(jnp.float32)
        mu = jnp.einsum("bmr,brs->bms", mu, c)
        nu = jnp.einsum("bmr,brs->bms", nu, c * c)
    return mu, nu


def block_sequence(s: Settings, plans_: list[Plan]) -> list[tuple[int, int]]:
    """FRUGAL's blocks ``(leaf index, matrix index)`` in the order they are walked: every matrix
    of every block leaf (a stack's layer axis expanded), sorted by ``block_order_key``
    (default :func:`model_order_key`)."""
    key = s.block_order_key or model_order_key
    blocks = [(i, b) for i, p in enumerate(plans_) if p.kind == "block"
              for b in range(p.layout.batch)]
    return sorted(blocks, key=lambda ib: key(
        plans_[ib[0]].name, ib[1] if plans_[ib[0]].layout.batch > 1 else None))


def _block_active(s: Settings, plans_: list[Plan], count, key) -> dict[int, jax.Array]:
    """Per block leaf the ``(B,)`` float flags of the blocks active in this window."""
    seq = block_sequence(s, plans_)
    total = len(seq)
    n_active = round(total * s.density)
    k = count // s.update_proj_gap
    if s.block_order == "random":
        idx = jax.random.permutation(jax.random.fold_in(key, k), total)[:n_active]
    elif s.block_order == "ascending":
        idx = (k * n_active + jnp.arange(n_active)) % total
    else:
        idx = (total - 1 - k * n_active - jnp.arange(n_active)) % total
    flags = jnp.zeros((total,), jnp.float32).at[idx].set(1.0)
    where: dict[int, list[int]] = {}
    for pos, (i, b) in enumerate(seq):
        where.setdefault(i, [0] * plans_[i].layout.batch)[b] = pos
    return {i: flags[jnp.asarray(pos_list)] for i, pos_list in where.items()}


def _stagger_offsets(s: Settings, plans_: list[Plan]) -> list:
    """Per projected leaf the ``(B,)`` refresh offsets within the ``update_proj_gap`` window:
    matrix ``j`` of ``J`` (stack layers counted one by one) refreshes when
    ``count % T == (j·T) // J`` (and at ``count == 0``)."""
    total = sum(p.layout.batch for p in plans_ if p.kind == "proj")
    out, j = [], 0
    for p in plans_:
        if p.kind != "proj":
            out.append(None)
            continue
        b = p.layout.batch
        out.append(jnp.asarray([((j + t) * s.update_proj_gap) // max(total, 1)
                                for t in range(b)], jnp.int32))
        j += b
    return out


# ----------------------------------------------------------------------------------- transform

def make(s: Settings) -> optax.GradientTransformation:
    """The GradientTransformation for settings ``s``."""
    validate(s)
    mdtype = s.moment_dtype
    method = _proj_method(s)

    def _zeros(shape):
        return jnp.zeros(shape, mdtype or jnp.float32)

    def init_fn(params):
        pl, treedef, leaves = plans(s, params)
        projs, mus, nus, extras, r_shapes = [], [], [], [], []
        for p, x in zip(pl, leaves, strict=True):
            proj = mu = nu = extra = None
            rshape = x.shape
            if p.kind == "proj":
                lay = p.layout
                left = (jnp.zeros((lay.batch, lay.m, p.rank), s.projector_dtype)
                        if p.side in ("left", "full") else None)
                right = (jnp.zeros((lay.batch, lay.n, p.rank), s.projector_dtype)
                         if p.side in ("right", "full") else None)
                proj = sub.Projector(left, right)
                rshape = sub.projected_shape(lay.batch, lay.m, lay.n, p.side, p.rank)
                mu, nu = _zeros(rshape), _zeros(rshape)
                if s.method == "fira":
                    extra = jnp.zeros((lay.batch,), jnp.float32)
            elif p.kind == "block":
                lay = p.layout
                mu = nu = _zeros((lay.batch, lay.m, lay.n))
                extra = jnp.zeros((lay.batch,), jnp.float32)
            elif p.kind == "dense":
                mu, nu = _zeros(x.shape), _zeros(x.shape)
            projs.append(proj)
            mus.append(mu)
            nus.append(nu)
            extras.append(extra)
            r_shapes.append(jax.ShapeDtypeStruct(rshape, jnp.float32))
        base_state = None
        if s.base_optimizer is not None:
            base_state = s.base_optimizer.init(
                treedef.unflatten([jnp.zeros(r.shape, r.dtype) for r in r_shapes]))
            mus = [None] * len(mus)
            nus = [None] * len(nus)
        return LowRankState(
            count=jnp.zeros([], jnp.int32),
            moment_count=treedef.unflatten([
                jnp.zeros((p.layout.batch,), jnp.int32)
                if p.kind == "block" or (p.kind == "proj" and _resets(s)
                                         and s.base_optimizer is None) else None for p in pl]),
            key=jax.random.PRNGKey(s.seed) if _needs_key(s) else None,
            projector=treedef.unflatten(projs), mu=treedef.unflatten(mus),
            nu=treedef.unflatten(nus), extra=treedef.unflatten(extras), base_state=base_state)

    def update_fn(updates, state, params=None):
        pl, treedef, _ = plans(s, updates if params is None else params)
        raw = treedef.flatten_up_to(updates)
        grads = [leaf_value(g) for g in raw]
        projs = treedef.flatten_up_to(state.projector)
        mus = treedef.flatten_up_to(state.mu)
        nus = treedef.flatten_up_to(state.nu)
        extras = treedef.flatten_up_to(state.extra)
        g3 = [p.layout.to3(g) if p.kind in ("proj", "block", "free") else None
              for p, g in zip(pl, grads, strict=True)]
        count = state.count
        mcounts = treedef.flatten_up_to(state.moment_count)
        is_refresh = count % s.update_proj_gap == 0
        step_key = (jax.random.fold_in(state.key, count) if state.key is not None else
                    jax.random.PRNGKey(0))
        moments_touched = s.moments != "keep" and s.base_optimizer is None

        def refresh_matrix(i, g, old, mu, nu, mc, key):
            """One matrix ``g (m, n)`` of leaf ``i``: new projector and the moment policy."""
            p = pl[i]
            expand = lambda x: None if x is None else x[None]  # noqa: E731
            new = sub.compute_projector(
                g[None], p.side, p.rank, method, key,
                sub.Projector(expand(old.left), expand(old.right)),
                oversample=s.oversample, power_iters=s.power_iters, warm_start=s.warm_start,
                warm_valid=count > 0, dtype=s.projector_dtype)
            new = sub.Projector(*(None if x is None else x[0] for x in new))
            if mu is not None and s.moments == "reset":
                mu, nu = jnp.zeros_like(mu), jnp.zeros_like(nu)
            elif mu is not None and s.moments == "project":
                mu_r, nu_r = _rotate(expand(mu).astype(jnp.float32),
                                     expand(nu).astype(jnp.float32),
                                     sub.Projector(expand(old.left), expand(old.right)),
                                     sub.Projector(expand(new.left), expand(new.right)))
                mu, nu = mu_r[0].astype(mu.dtype), nu_r[0].astype(nu.dtype)
            if mc is not None:
                mc = jnp.zeros_like(mc)
            return new, mu, nu, mc

        def refresh_leaf(i, g, old, mu, nu, mc, preds):
            """Refresh the ``B`` matrices of leaf ``i`` one at a time (``lax.map``: one matrix's
            decomposition workspace at a time, and unbatched LAPACK calls, which cannot
            deadlock inside sharded or scanned programs). ``preds (B,)``: per-matrix refresh
            predicates (stagger) or None (refresh all)."""
            keys = jax.random.split(jax.random.fold_in(step_key, i), pl[i].layout.batch)

            def one(args):
                g_b, old_b, mu_b, nu_b, mc_b, key_b, pred_b = args
                if pred_b is None:
                    return refresh_matrix(i, g_b, old_b, mu_b, nu_b, mc_b, key_b)
                return jax.lax.cond(
                    pred_b, lambda o: refresh_matrix(i, g_b, *o, key_b), lambda o: o,
                    (old_b, mu_b, nu_b, mc_b))

            # The old projector is read only for warm starts, moment rotation and staggered
            # conds; otherwise it stays out of the loop so its buffer can be reused.
            if not (s.warm_start or s.moments == "project" or preds is not None):
                old = sub.Projector(None, None)
            args = (g, old, mu, nu, mc, keys, preds)
            if pl[i].layout.batch == 1:
                out = one(jax.tree_util.tree_map(lambda x: x[0], args))
                return jax.tree_util.tree_map(lambda x: x[None], out)
            return jax.lax.map(one, args)

        def refresh_projected(projs_, mus_, nus_, mcs_, preds_):
            """Every projected leaf in turn, chained by data dependencies: leaf ``i+1``'s gradient
            passes an optimization barrier together with leaf ``i``'s result, so XLA cannot
            overlap two leaves' decompositions (peak memory: one matrix's workspace)."""
            projs_, mus_, nus_, mcs_ = list(projs_), list(mus_), list(nus_), list(mcs_)
            prev = None
            for i, p in enumerate(pl):
                if p.kind != "proj":
                    continue
                g = g3[i]
                if prev is not None:
                    g, prev = jax.lax.optimization_barrier((g, prev))
                new, mu, nu, mc = refresh_leaf(i, g, projs_[i], mus_[i], nus_[i], mcs_[i],
                                               preds_[i])
                projs_[i], mus_[i], nus_[i], mcs_[i] = new, mu, nu, mc
                prev = new
            return projs_, mus_, nus_, mcs_

        def refresh_blocks(extras_, mus_, nus_, mcs_):
            """FRUGAL blocks: the next active set in block order; a block's moments and bias
            correction restart whenever it is (re-)activated (every refresh under reset)."""
            extras_, mus_, nus_, mcs_ = list(extras_), list(mus_), list(nus_), list(mcs_)
            active = _block_active(s, pl, count, state.key if state.key is not None
                                   else jax.random.PRNGKey(0))
            for i, flags in active.items():
                was = extras_[i]
                restart = flags if s.moments == "reset" else flags * (1.0 - was)
                keep = (1.0 - restart)[:, None, None]
                extras_[i] = flags
                mus_[i] = (mus_[i] * keep).astype(mus_[i].dtype)
                nus_[i] = (nus_[i] * keep).astype(nus_[i].dtype)
                mcs_[i] = jnp.where(restart > 0, 0, mcs_[i]).astype(jnp.int32)
            return extras_, mus_, nus_, mcs_

        proj_sel = [p.kind == "proj" for p in pl]
        block_sel = [p.kind == "block" for p in pl]
        pick = lambda xs, sel: [x if t else None for x, t in zip(xs, sel, strict=True)]  # noqa: E731
        merge = lambda new, old, sel: [n if t else o for n, o, t in zip(new, old, sel, strict=True)]  # noqa: E731
        mom_sel = proj_sel if moments_touched else [False] * len(pl)
        base_state = state.base_state

        if s.stagger:
            # Each matrix refreshes inside its own cond at its own offset: no outer cond.
            offsets = _stagger_offsets(s, pl)
            preds = [None if o is None else (count == 0) | (count % s.update_proj_gap == o)
                     for o in offsets]
            n_projs, n_mus, n_nus, n_mcs = refresh_projected(
                projs, pick(mus, mom_sel), pick(nus, mom_sel), pick(mcounts, proj_sel), preds)
            projs = merge(n_projs, projs, proj_sel)
            mus, nus = merge(n_mus, mus, mom_sel), merge(n_nus, nus, mom_sel)
            mcounts = merge(n_mcs, mcounts, proj_sel)
        else:
            # ---- one cond on the scalar predicate around every projector computation; only
            # what a refresh changes goes through it (pass-through outputs of a cond are copies).
            reset_base = base_state if (s.moments == "reset" and base_state is not None) else None

            def refresh(operand):
                projs_, mus_, nus_, mcs_, extras_, bmus, bnus, bmcs, base_ = operand
                projs_, mus_, nus_, mcs_ = refresh_projected(projs_, mus_, nus_, mcs_,
                                                             [None] * len(pl))
                if any(block_sel):
                    extras_, bmus, bnus, bmcs = refresh_blocks(extras_, bmus, bnus, bmcs)
                if base_ is not None:
                    # zeros == the state right after init for optax's adam/sgd/... (counts too)
                    base_ = jax.tree_util.tree_map(jnp.zeros_like, base_)
                return projs_, mus_, nus_, mcs_, extras_, bmus, bnus, bmcs, base_

            operand = (projs, pick(mus, mom_sel), pick(nus, mom_sel), pick(mcounts, proj_sel),
                       pick(extras, block_sel), pick(mus, block_sel), pick(nus, block_sel),
                       pick(mcounts, block_sel), reset_base)
            (projs, c_mus, c_nus, c_mcs, c_ext, c_bmus, c_bnus, c_bmcs,
             c_base) = jax.lax.cond(is_refresh, refresh, lambda o: o, operand)
            mus = merge(c_bmus, merge(c_mus, mus, mom_sel), block_sel)
            nus = merge(c_bnus, merge(c_nus, nus, mom_sel), block_sel)
            mcounts = merge(c_bmcs, merge(c_mcs, mcounts, proj_sel), block_sel)
            extras = merge(c_ext, extras, block_sel)
            if reset_base is not None:
                base_state = c_base

        k_all = count + 1
        b1, b2, eps = s.b1, s.b2, s.eps

        if s.base_optimizer is not None:
            u, new_state = _with_base(s, pl, treedef, grads, g3, projs, state, k_all,
                                      base_state, mcounts, params)
            return treedef.unflatten([rewrap(r, x) for r, x in
                                      zip(raw, treedef.flatten_up_to(u), strict=True)]), new_state

        new_upd, new_mu, new_nu, new_extra = [], [], [], []
        for i, p in enumerate(pl):
            g, mu, nu, ex = grads[i], mus[i], nus[i], extras[i]
            # bias-correction step: per matrix (B, 1, 1) where moments restart, else global
            k_proj = k_all if mcounts[i] is None else (mcounts[i] + 1)[:, None, None]
            d = None
            if p.kind == "dense":
                mu, nu = _moments(mu, nu, g, b1, b2)
                if s.method == "frugal":
                    d = _adam_torch(mu, nu, b1, b2, eps, k_all)
                else:
                    psi, f = _adam_galore(mu, nu, b1, b2, eps, k_all)
                    d = f * psi
            elif p.kind == "free":
                d3 = _state_free(s, g3[i])
                d = p.layout.from3(d3)
            elif p.kind == "block":
                a = ex[:, None, None]
                mu_n, nu_n = _moments(mu, nu, g3[i], b1, b2)
                mu, nu = mu_n * a, nu_n * a
                full = s.proj_params_lr_scale * _adam_torch(mu, nu, b1, b2, eps, k_proj)
                d3 = a * full + (1.0 - a) * _state_free(s, g3[i])
                d = p.layout.from3(d3)
            else:
                pr = projs[i]
                r = sub.project(g3[i], pr)
                mu, nu = _moments(mu, nu, r, b1, b2)
                if s.method == "frugal":
                    step = _adam_torch(mu, nu, b1, b2, eps, k_proj)
                    d3 = s.proj_params_lr_scale * sub.project_back(step, pr)
                    free = g3[i].astype(jnp.float32) - sub.project_back(r, pr)
                    d3 = d3 + _state_free(s, free)
                elif s.method == "galore":
                    psi, f = _adam_galore(mu, nu, b1, b2, eps, k_proj)
                    d3 = (s.scale * f) * sub.project_back(psi, pr)
                else:
                    d3, ex = _fira(s, g3[i], r, psi_f=_adam_galore(mu, nu, b1, b2, eps, k_proj),
                                   pr=pr, side=p.side, prev=ex, first=count == 0)
                d = p.layout.from3(d3)
            new_upd.append(d.astype(g.dtype))
            dt = mus[i].dtype if mus[i] is not None else None
            new_mu.append(None if mu is None else mu.astype(dt))
            new_nu.append(None if nu is None else nu.astype(dt))
            new_extra.append(ex)
        new_state = LowRankState(
            count=optax.safe_increment(count), moment_count=treedef.unflatten(
                [None if c is None else optax.safe_increment(c) for c in mcounts]),
            key=state.key, projector=treedef.unflatten(projs), mu=treedef.unflatten(new_mu),
            nu=treedef.unflatten(new_nu), extra=treedef.unflatten(new_extra), base_state=None)
        return treedef.unflatten([rewrap(r, x) for r, x in zip(raw, new_upd, strict=True)]
                                 ), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def _state_free(s: Settings, free: jax.Array) -> jax.Array:
    """FRUGAL's state-free direction (before the learning rate)."""
    scale = s.proj_params_lr_scale * s.state_free_lr_scale
    if s.state_free == "signsgd":
        return scale * jnp.sign(free.astype(jnp.float32))
    if s.state_free == "sgd":
        return scale * free.astype(jnp.float32)
    return jnp.zeros(free.shape, jnp.float32)


def _fira(s: Settings, g3, r, psi_f, pr, side, prev, first):
    """Fira's update for one projected leaf: ``f·(scale·back(ψ) + limit(φ ⊙ S))``."""
    psi, f = psi_f
    r32 = r.astype(jnp.float32)
    # φ per entry of the kept (non-projected) dimension: columns of R (r x n) for a left
    # projection, rows of R (m x r) for a right one (the official norm_dim rule when r < n / m).
    axis = -2 if side == "left" else -1
    phi = jnp.linalg.norm(psi, axis=axis, keepdims=True) / (
        jnp.linalg.norm(r32, axis=axis, keepdims=True) + 1e-8)
    back = sub.project_back(r32, pr)
    if s.residual == "official":
        back = s.scale * back
    resid = (g3.astype(jnp.float32) - back) * phi
    norm = jnp.sqrt(jnp.sum(resid * resid, axis=(-2, -1)))                 # (B,)
    limiter = jnp.maximum(norm / (prev + 1e-8), s.gamma) / s.gamma
    limiter = jnp.where(first, 1.0, limiter)
    resid = resid / limiter[:, None, None]
    new_prev = norm / limiter
    return f * (s.scale * sub.project_back(psi, pr) + resid), new_prev


def _with_base(s, pl, treedef, grads, g3, projs, state, k_all, base_state, mcounts, params):
    """GaLore with a user optax ``base_optimizer`` applied to the projected gradients."""
    del k_all, params
    rs = []
    for i, p in enumerate(pl):
        rs.append(sub.project(g3[i], projs[i]) if p.kind == "proj" else grads[i])
    u_tree, base_state = s.base_optimizer.update(treedef.unflatten(rs), base_state)
    us = treedef.flatten_up_to(u_tree)
    out = []
    for i, p in enumerate(pl):
        if p.kind == "proj":
            d = p.layout.from3(s.scale * sub.project_back(us[i], projs[i]))
        else:
            d = us[i]
        out.append(d.astype(grads[i].dtype))
    n = len(pl)
    new_state = LowRankState(
        count=optax.safe_increment(state.count),
        moment_count=treedef.unflatten(
            [None if c is None else optax.safe_increment(c) for c in mcounts]),
        key=state.key, projector=treedef.unflatten(projs),
        mu=treedef.unflatten([None] * n), nu=treedef.unflatten([None] * n),
        extra=treedef.unflatten([None] * n), base_state=base_state)
    return treedef.unflatten(out), new_state


# Arguments that define shapes, dtypes or leaf selection: never injected as traced arrays.
STATIC_ARGS = ("rank", "density", "update_proj_gap", "oversample", "power_iters", "seed", "mask",
               "weight_decay_mask", "dimension_numbers", "base_optimizer", "projector_dtype",
               "moment_dtype")


def inject_hyperparams(factory: Callable, static_args: tuple[str, ...] = (),
                       hyperparam_dtype: Any = None) -> Callable:
    """``optax.inject_hyperparams`` for lrx factories: :data:`STATIC_ARGS` (rank, masks, dtypes,
    ...) stay static, numeric ones (learning_rate, scale, b1, b2, eps, weight_decay, ...) become
    state hyperparameters. Example: ``inject_hyperparams(galore)(learning_rate=0.01, rank=64)``."""
    import inspect

    names = set(inspect.signature(factory).parameters)
    static = tuple(a for a in (*STATIC_ARGS, *static_args) if a in names)
    return optax.inject_hyperparams(factory, static_args=static,
                                    hyperparam_dtype=hyperparam_dtype)


def learning_rate_then_decay(learning_rate: float | Callable, weight_decay: float = 0.0,
                             mask: Any = None) -> optax.GradientTransformation:
    """``Δ = -lr·u`` then GaLore/Fira's decoupled weight decay on the *updated* weight:
    ``W' = (W - lr·u)(1 - lr·wd)``, i.e. ``Δ = -lr·u - lr·wd·(W - lr·u)`` (official order:
    ``p.add_(update); p.add_(p, alpha=-lr·wd)``). ``learning_rate`` may be an optax schedule."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        step = jax.tree_util.tree_map(lambda u: (-lr * u).astype(u.dtype), updates)
        if _is_number(weight_decay) and weight_decay == 0.0:
            return step, optax.ScaleByScheduleState(optax.safe_increment(state.count))
        if params is None:
            raise ValueError("weight decay needs params: call update(grads, state, params)")
        wd_mask = mask(params) if callable(mask) else mask
        if wd_mask is None:
            wd_mask = jax.tree_util.tree_map(lambda _: True, params)

        def decay(st, w, m):
            if not m:
                return st
            return (st - lr * weight_decay * (w + st)).astype(st.dtype)

        step = jax.tree_util.tree_map(decay, step, params, wd_mask)
        return step, optax.ScaleByScheduleState(optax.safe_increment(state.count))

    return optax.GradientTransformation(init_fn, update_fn)


def matrices_count(plans_: list[Plan]) -> int:
    """Number of independent projected matrices (batch entries included)."""
    return sum(p.layout.batch for p in plans_ if p.layout is not None)


__all__ = ["LowRankState", "Settings", "Plan", "make", "plans", "learning_rate_then_decay",
           "inject_hyperparams", "STATIC_ARGS",
           "matrices_count"]
