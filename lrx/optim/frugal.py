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

import dataclasses
import re
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrx.optim import engine
from lrx.optim import subspace as sub
from lrx.optim.engine import Plan

SUBSPACES = ("svd", "random", "randperm", "columns", "rows", "blocks")
STATE_FREE = ("signsgd", "sgd", "none")
BLOCK_ORDERS = ("random", "ascending", "descending")
# the projector backend of each subspace choice (columns/rows: random coordinates on a fixed side)
_BACKEND = {"svd": "svd", "random": "random", "randperm": "randperm", "columns": "randperm",
            "rows": "randperm"}

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


class FrugalLeaf(NamedTuple):
    """One leaf of :class:`ScaleByFrugalState`: ``projector`` of a projected leaf (else None);
    ``mu``, ``nu`` torch-Adam moments (``R``'s shape, a block's full ``(B, m, n)``, the leaf shape
    for unselected leaves, None for state-free leaves); ``moment_count`` int32 ``(B,)`` steps since
    each matrix's last restart (reset_on_refresh or blocks, else None); ``active`` ``(B,)``
    float32 block activity (blocks only)."""

    projector: Any
    mu: Any
    nu: Any
    moment_count: Any
    active: Any


class ScaleByFrugalState(NamedTuple):
    """State of :func:`scale_by_frugal`: ``count``, ``key`` (random subspaces, else None) and the
    :class:`FrugalLeaf` fields as pytrees like the params."""

    count: jax.Array
    key: jax.Array | None
    projector: Any
    mu: Any
    nu: Any
    moment_count: Any
    active: Any


def torch_adam(mu: jax.Array, nu: jax.Array, b1: Any, b2: Any, eps: Any, k: jax.Array
               ) -> jax.Array:
    """torch AdamW direction ``(M / (1-β1^k)) / (sqrt(V) / sqrt(1-β2^k) + eps)``."""
    return (mu / (1.0 - engine.pow_(b1, k))) / (
        jnp.sqrt(nu) / jnp.sqrt(1.0 - engine.pow_(b2, k)) + eps)


@dataclasses.dataclass(frozen=True, eq=False)
class Frugal(engine.Strategy):
    """FRUGAL's per-leaf rules (see the module docstring); :func:`scale_by_frugal` builds it."""

    Leaf = FrugalLeaf
    State = ScaleByFrugalState

    density: float = 0.25
    update_proj_gap: int = 200
    stagger: bool = False
    subspace: str = "svd"
    state_free: str = "signsgd"
    state_free_lr_scale: Any = 1.0
    reset_on_refresh: bool = True
    proj_type: str = "std"
    proj_params_lr_scale: Any = 1.0
    block_order: str = "random"
    block_order_key: Callable | None = None
    b1: Any = 0.9
    b2: Any = 0.999
    eps: Any = 1e-6
    mask: Any = None
    dimension_numbers: Any = None
    projector_dtype: Any = jnp.float32
    moment_dtype: Any = None
    seed: int = 0
    per_matrix_update = True      # update_leaf is per matrix (every kind)

    @property
    def needs_key(self) -> bool:
        return self.subspace != "svd" and not (self.subspace == "blocks"
                                               and self.block_order != "random")

    def plan(self, layout: sub.Layout | None, name: str) -> Plan:
        if layout is None:
            return Plan("dense", name=name)
        m, n = layout.m, layout.n
        if self.subspace == "blocks":
            return Plan("block" if self.density > 0 else "free", layout, name=name)
        if self.subspace in ("columns", "rows"):
            side = "right" if self.subspace == "columns" else "left"
            rank = int((n if side == "right" else m) * self.density)
        else:
            side = sub.resolve_side(m, n, self.proj_type)
            rank = round((n if side == "right" else m) * self.density)
        if rank == 0:
            return Plan("free", layout, name=name)
        return Plan("proj", layout, side, rank, name)

    def init_leaf(self, plan: Plan, x: jax.Array) -> FrugalLeaf:
        zeros = lambda shape: jnp.zeros(  # noqa: E731
            shape, engine.state_dtype(self.moment_dtype, x))
        lay = plan.layout
        if plan.kind == "dense":
            return FrugalLeaf(None, zeros(x.shape), zeros(x.shape), None, None)
        if plan.kind == "free":
            return FrugalLeaf(None, None, None, None, None)
        count = jnp.zeros((lay.batch,), jnp.int32)
        if plan.kind == "block":
            full = (lay.batch, lay.m, lay.n)
            return FrugalLeaf(None, zeros(full), zeros(full), count,
                              jnp.zeros((lay.batch,), jnp.float32))
        projector = sub.zero_projector(lay.batch, lay.m, lay.n, plan.side, plan.rank,
                                       self.projector_dtype)
        rshape = sub.projected_shape(lay.batch, lay.m, lay.n, plan.side, plan.rank)
        return FrugalLeaf(projector, zeros(rshape), zeros(rshape),
                          count if self.reset_on_refresh else None, None)

    def refresh_fields(self, plan: Plan) -> tuple[str, ...]:
        if self.reset_on_refresh:
            return ("projector", "mu", "nu", "moment_count")
        return ("projector",)

    def refresh_matrix(self, plan, g, part, key, count):
        """A new state-full subspace for one matrix ``g (m, n)``; the Adam state restarts."""
        new = sub.compute_projector(g[None], plan.side, plan.rank, _BACKEND[self.subspace], key,
                                    dtype=self.projector_dtype)
        new = sub.first_matrix(new)
        if not self.reset_on_refresh:
            return part._replace(projector=new)
        return part._replace(projector=new, mu=jnp.zeros_like(part.mu),
                             nu=jnp.zeros_like(part.nu),
                             moment_count=jnp.zeros_like(part.moment_count))

    def block_sequence(self, plans: list[Plan]) -> list[tuple[int, int]]:
        """The blocks ``(leaf index, matrix index)`` in the order they are walked: every matrix
        of every block leaf (a stack's layer axis expanded), sorted by ``block_order_key``
        (default :func:`model_order_key`)."""
        key = self.block_order_key or model_order_key
        blocks = [(i, b) for i, p in enumerate(plans) if p.kind == "block"
                  for b in range(p.layout.batch)]
        return sorted(blocks, key=lambda ib: key(
            plans[ib[0]].name, ib[1] if plans[ib[0]].layout.batch > 1 else None))

    def block_active(self, plans: list[Plan], count: jax.Array, key: jax.Array
                     ) -> dict[int, jax.Array]:
        """Per block leaf the ``(B,)`` float flags of the blocks active in this window:
        ``round(ρ·#blocks)`` consecutive blocks of the sequence (or a random choice)."""
        seq = self.block_sequence(plans)
        total = len(seq)
        n_active = round(total * self.density)
        k = count // self.update_proj_gap
        if self.block_order == "random":
            idx = jax.random.permutation(jax.random.fold_in(key, k), total)[:n_active]
        elif self.block_order == "ascending":
            idx = (k * n_active + jnp.arange(n_active)) % total
        else:
            idx = (total - 1 - k * n_active - jnp.arange(n_active)) % total
        flags = jnp.zeros((total,), jnp.float32).at[idx].set(1.0)
        where: dict[int, list[int]] = {}
        for pos, (i, b) in enumerate(seq):
            where.setdefault(i, [0] * plans[i].layout.batch)[b] = pos
        return {i: flags[jnp.asarray(pos_list)] for i, pos_list in where.items()}

    def refresh_global(self, plans, leaves, count, key):
        """Blocks: on refresh steps the next active set; a block's moments and bias correction
        restart whenever it is (re-)activated (every refresh under ``reset_on_refresh``), as the
        official code re-creates a block's state."""
        sel = [i for i, p in enumerate(plans) if p.kind == "block"]
        if not sel:
            return leaves
        key = key if key is not None else jax.random.PRNGKey(0)

        def refresh(parts):
            active = self.block_active(plans, count, key)
            out = []
            for i, s in zip(sel, parts, strict=True):
                flags = active[i]
                restart = flags if self.reset_on_refresh else flags * (1.0 - s.active)
                keep = (1.0 - restart)[:, None, None]
                out.append(s._replace(
                    active=flags, mu=(s.mu * keep).astype(s.mu.dtype),
                    nu=(s.nu * keep).astype(s.nu.dtype),
                    moment_count=jnp.where(restart > 0, 0, s.moment_count).astype(jnp.int32)))
            return out

        parts = jax.lax.cond(count % self.update_proj_gap == 0, refresh, lambda ps: ps,
                             [leaves[i] for i in sel])
        leaves = list(leaves)
        for i, s in zip(sel, parts, strict=True):
            leaves[i] = s
        return leaves

    def free_step(self, free: jax.Array) -> jax.Array:
        """The state-free direction (before the learning rate): signSGD, SGD or nothing."""
        scale = self.proj_params_lr_scale * self.state_free_lr_scale
        if self.state_free == "signsgd":
            return scale * jnp.sign(free.astype(jnp.float32))
        if self.state_free == "sgd":
            return scale * free.astype(jnp.float32)
        return jnp.zeros(free.shape, jnp.float32)

    def update_leaf(self, plan: Plan, g: jax.Array, g3: jax.Array | None, leaf: FrugalLeaf,
                    count: jax.Array, key: jax.Array | None) -> tuple[jax.Array, FrugalLeaf]:
        """``u = s·back(AdamStep(down(G))) + s·s_free·sign(G - back(down(G)))`` (module
        docstring; ``s`` = ``proj_params_lr_scale``), per leaf kind."""
        b1, b2, eps = self.b1, self.b2, self.eps
        if plan.kind == "dense":                                    # plain torch AdamW
            mu, nu = engine.adam_moments(leaf.mu, leaf.nu, g, b1, b2)
            u = torch_adam(mu, nu, b1, b2, eps, count + 1)
            return u, leaf._replace(mu=mu.astype(leaf.mu.dtype), nu=nu.astype(leaf.nu.dtype))
        if plan.kind == "free":                                     # state-free only
            return plan.layout.from3(self.free_step(g3)), leaf
        mc = leaf.moment_count
        k = count + 1 if mc is None else (mc + 1)[:, None, None]
        new_mc = None if mc is None else optax.safe_increment(mc)
        dtype = leaf.mu.dtype
        if plan.kind == "block":                  # active blocks: Adam; inactive: state-free
            a = leaf.active[:, None, None]
            mu, nu = engine.adam_moments(leaf.mu, leaf.nu, g3, b1, b2)
            mu, nu = mu * a, nu * a
            full = self.proj_params_lr_scale * torch_adam(mu, nu, b1, b2, eps, k)
            u3 = a * full + (1.0 - a) * self.free_step(g3)
            return plan.layout.from3(u3), leaf._replace(
                mu=mu.astype(dtype), nu=nu.astype(dtype), moment_count=new_mc)
        p = leaf.projector
        r = sub.project(g3, p)                                      # down(G)
        mu, nu = engine.adam_moments(leaf.mu, leaf.nu, r, b1, b2)
        full = self.proj_params_lr_scale * sub.project_back(
            torch_adam(mu, nu, b1, b2, eps, k), p)                  # state-full part
        free = g3.astype(jnp.float32) - sub.project_back(r, p)      # G - back(down(G))
        u3 = full + self.free_step(free)
        return plan.layout.from3(u3), leaf._replace(
            mu=mu.astype(dtype), nu=nu.astype(dtype), moment_count=new_mc)


def validate(s: Frugal) -> None:
    """ValueError for bad FRUGAL hyperparameters, naming the valid choices."""
    if not engine.is_number(s.density) or not 0.0 <= s.density <= 1.0:
        raise ValueError(f"density must be a number in [0, 1], got {s.density!r}")
    sub.check_choice(s.subspace, SUBSPACES, "subspace")
    sub.check_choice(s.state_free, STATE_FREE, "state_free")
    sub.check_choice(s.block_order, BLOCK_ORDERS, "block_order")
    sub.check_choice(s.proj_type, ("std", "reverse_std", "left", "right"), "proj_type")
    engine.check_common(update_proj_gap=s.update_proj_gap, b1=s.b1, b2=s.b2, eps=s.eps,
                        stagger=s.stagger)
    if not isinstance(s.reset_on_refresh, bool):
        raise ValueError(f"reset_on_refresh must be a bool, got {s.reset_on_refresh!r}")
    if s.stagger and s.subspace == "blocks":
        raise ValueError("stagger=True does not apply to subspace='blocks' "
                         "(blocks switch together)")
    if s.block_order_key is not None and not callable(s.block_order_key):
        raise ValueError("block_order_key must be a callable (name, layer) -> sortable key")


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
        scripts' choice) for ``subspace='blocks'``; ``block_order_key``: the sort key of the
        blocks ``(name, layer) -> sortable`` (default :func:`model_order_key`).
      mask, dimension_numbers, projector_dtype, moment_dtype, seed, stagger: as in
        :func:`lrx.optim.scale_by_galore`.

    Returns:
      A GradientTransformation with :class:`ScaleByFrugalState`.
    """
    strategy = Frugal(
        density=density, update_proj_gap=update_proj_gap, stagger=stagger, subspace=subspace,
        state_free=state_free, state_free_lr_scale=state_free_lr_scale,
        reset_on_refresh=reset_on_refresh, proj_type=proj_type,
        proj_params_lr_scale=proj_params_lr_scale, block_order=block_order,
        block_order_key=block_order_key, b1=b1, b2=b2, eps=eps, mask=mask,
        dimension_numbers=dimension_numbers, projector_dtype=projector_dtype,
        moment_dtype=moment_dtype, seed=seed)
    validate(strategy)
    return engine.transform(strategy)


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
