"""The small engine behind every low-rank method of :mod:`lrx.optim` (GaLore, Fira, FRUGAL).

A method is a :class:`Strategy` in its own file (``galore.py``, ``fira.py``, ``frugal.py``): how one
leaf is planned, initialised, refreshed and updated, with its own NamedTuple state. The engine does
everything the methods share, once:

* **layouts**: which leaves are selected (``mask``) and how each is viewed as a stack of independent
  matrices ``(B, m, n)`` (``dimension_numbers``; :mod:`lrx.optim.subspace`); nnx Variables are
  leaves holding their array;
* **side choice and projectors**: :func:`lrx.optim.subspace.resolve_side` and
  :func:`lrx.optim.subspace.compute_projector`, called by the strategies;
* **when to refresh**: every matrix refreshes when ``count % update_proj_gap == 0``, each leaf
  inside its own ``lax.cond`` on that scalar (so under ``jit`` no decomposition runs on other
  steps), or with ``stagger=True`` matrix ``j`` of ``J`` (the layers of a stack counted one by
  one) at its own offset ``(j·T) // J`` (and at ``count == 0``), each in its own cond;
* **per-matrix sequencing**: a refresh walks the matrices of a stack one at a time
  (:func:`map_matrices`), and no leaf's refresh or update depends on another leaf, so XLA runs
  each as soon as the backward pass has produced that leaf's gradient and frees its temporaries (the
  decomposition, Fira's residual) right after: the compiled peak of a train step holds one
  matrix's workspace at a time, not every gradient (a cond or an ``optimization_barrier`` chain
  across leaves would keep all gradients alive: 17.7 and 22.2 GiB instead of 10.65 GiB for the
  llama_1b f32 step, README "Issue #11 targets"); the update of a stacked leaf likewise walks
  its matrices one at a time (:func:`update_per_matrix`, for strategies whose
  ``update_leaf`` is separable per matrix: GaLore, Fira, FRUGAL; not APOLLO, whose random
  projection is drawn for the whole stack), so its float32 temporaries (projection, moments,
  back-projection) are one matrix's, not the stack's. A strategy whose :meth:`Strategy.update_all`
  takes every leaf at once (GaLore with a user ``base_optimizer``) can instead refresh the leaves
  itself, one after the other (:meth:`Strategy.refreshes_in_update_all`; the engine hands it
  each leaf's refresh cond): GaLore then projects a leaf's gradient before the next leaf's SVD.

The state of a method is ``State(count, key, *leaf fields, *global fields)``: ``count`` int32
``[]``, ``key`` the PRNG key (or None), then one pytree like the params per field of the method's
per-leaf NamedTuple ``Leaf`` (None where a leaf has no such part), then the method's global fields
(e.g. GaLore's ``base_state``). Every per-leaf array has the leaf's batch axis ``B`` first, so a
refresh can slice out one matrix. The per-leaf field named ``projector`` holds the leaf's
:class:`lrx.optim.subspace.Projector` (read by :func:`lrx.optim.projectors`).

Adding a method: subclass :class:`Strategy` in a new file, define ``Leaf`` and ``State``, implement
:meth:`Strategy.plan`, :meth:`Strategy.init_leaf`, :meth:`Strategy.refresh_matrix` and
:meth:`Strategy.update_leaf`, and return ``engine.transform(strategy)`` from its
``scale_by_<method>``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lrx.optim import subspace as sub
from lrx.optim.masks import path_name


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static per-leaf plan. ``kind``: 'dense' (unselected leaf, full-rank) | 'proj' (refreshed
    per matrix by the engine) | a method's own kind (FRUGAL's 'block', 'free'); ``layout`` the
    ``(B, m, n)`` view of a selected leaf; ``side`` / ``rank`` of a projected one; ``name`` the
    '/'-joined path; ``index`` the leaf's position in
    the flattened tree (set by :func:`plans`)."""

    kind: str
    layout: sub.Layout | None = None
    side: str | None = None
    rank: int = 0
    name: str = ""
    index: int = -1


class Strategy:
    """One low-rank method: the per-leaf rules the engine calls (override in a subclass).

    Class attributes: ``Leaf`` (NamedTuple of per-leaf fields, one of them ``projector``) and
    ``State`` (NamedTuple ``count, key, *Leaf._fields, *globals``). Instance attributes read by
    the engine: ``update_proj_gap``, ``stagger``, ``needs_key``, ``seed``, ``mask``,
    ``dimension_numbers``.
    """

    Leaf: type = NamedTuple
    State: type = NamedTuple
    update_proj_gap: int = 200
    stagger: bool = False
    needs_key: bool = False
    seed: int = 0
    mask: Any = None
    dimension_numbers: Any = None
    # update_leaf of a stacked leaf is separable per matrix (no draw or statistic across the
    # batch axis): the engine then updates the stack one matrix at a time (update_per_matrix)
    per_matrix_update: bool = False

    def plan(self, layout: sub.Layout | None, name: str) -> Plan:
        """The static plan of one leaf (``layout`` None: the leaf is not selected)."""
        raise NotImplementedError

    def init_leaf(self, plan: Plan, x: jax.Array) -> Any:
        """The initial ``Leaf`` of leaf ``x``."""
        raise NotImplementedError

    def refresh_fields(self, plan: Plan) -> tuple[str, ...]:
        """The ``Leaf`` fields a refresh of this (``kind == 'proj'``) leaf writes."""
        return ("projector",)

    def reads_old_projector(self) -> bool:
        """Whether :meth:`refresh_matrix` reads the previous projector (warm starts, moment
        rotation); if not, it receives ``projector=None`` and the old buffer can be reused."""
        return False

    def refresh_matrix(self, plan: Plan, g: jax.Array, part: Any, key: jax.Array,
                       count: jax.Array) -> Any:
        """Refresh one matrix ``g (m, n)``: ``part`` is the ``Leaf`` of that matrix (the batch axis
        sliced away) holding only :meth:`refresh_fields` (other fields None); returns it with
        those fields refreshed."""
        raise NotImplementedError

    def refresh_global(self, plans: list[Plan], leaves: list, count: jax.Array,
                       key: jax.Array | None) -> list:
        """A refresh that needs every leaf at once (FRUGAL's blocks); default: none."""
        return leaves

    def init_globals(self, plans: list[Plan], treedef: Any, params: list,
                     leaves: list) -> tuple:
        """Initial values of the State's global fields (after the per-leaf ones)."""
        return ()

    def update_leaf(self, plan: Plan, g: jax.Array, g3: jax.Array | None, leaf: Any,
                    count: jax.Array, key: jax.Array | None) -> tuple[jax.Array, Any]:
        """``(u, new_leaf)`` for gradient ``g`` (leaf shape; ``g3`` its ``(B, m, n)`` view for
        selected leaves); ``count`` is the step count before this update, ``key`` the state's
        PRNG key (the seed; None for deterministic methods)."""
        raise NotImplementedError

    def update_all(self, plans: list[Plan], treedef: Any, grads: list, g3: list, leaves: list,
                   globals_: tuple, count: jax.Array, refresh: Callable | None = None
                   ) -> tuple[list, list, tuple] | None:
        """Override to update every leaf at once (GaLore's user ``base_optimizer``); None: the
        engine calls :meth:`update_leaf` leaf by leaf. When :meth:`refreshes_in_update_all`
        is True, ``refresh(i, g3_i) -> leaf_i`` is the refresh of leaf ``i`` (``kind ==
        'proj'``; its ``lax.cond`` on the step count included) from the ``(B, m, n)`` gradient
        ``g3_i`` given, and ``update_all`` must call it once for each such leaf (``leaves``
        hold the old projectors)."""
        return None

    def refreshes_in_update_all(self) -> bool:
        """True when :meth:`update_all` refreshes the leaves itself (through its ``refresh``
        argument), so that it can order each leaf's refresh after the previous leaf's use of
        its gradient; False (default): the engine refreshes every leaf first."""
        return False


# --------------------------------------------------------------------------------------- leaves

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
    """The leaf selection of every method: ``(layouts, names, treedef, leaves)`` with a
    :class:`lrx.optim.subspace.Layout` ``(B, m, n)`` per selected leaf (None for the others).

    ``mask``: None (every leaf with ``ndim >= 2``), a bool pytree like ``tree`` or a callable
    ``tree -> bools``; ``dimension_numbers``: None, one :class:`DimensionNumbers` or a pytree of
    them (None entries: the default "last two axes" layout).
    """
    with_path, treedef = flatten_with_path(tree)
    with_path = [(path, leaf_value(x)) for path, x in with_path]
    leaves = [x for _, x in with_path]
    if mask is None:
        masks = [getattr(x, "ndim", 0) >= 2 for x in leaves]
    else:
        m = mask(tree) if callable(mask) else mask
        try:
            masks = [bool(b) for b in treedef.flatten_up_to(m)]
        except (ValueError, TypeError) as e:
            raise ValueError("mask must be a pytree of bools with the structure of the params: "
                             f"{e}") from None
    if dimension_numbers is None or isinstance(dimension_numbers, sub.DimensionNumbers):
        dims = [dimension_numbers] * len(leaves)
    else:
        dims = treedef.flatten_up_to(dimension_numbers)
    layouts, names = [], []
    for (path, x), m, d in zip(with_path, masks, dims, strict=True):
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


def plans(strategy: Strategy, tree: Any) -> tuple[list[Plan], Any, list]:
    """``(plans, treedef, leaves)`` of ``tree`` (params or updates) under ``strategy``."""
    layouts, names, treedef, leaves = select_layouts(tree, strategy.mask,
                                                     strategy.dimension_numbers)
    return ([dataclasses.replace(strategy.plan(lay, name), index=i)
             for i, (lay, name) in enumerate(zip(layouts, names, strict=True))], treedef, leaves)


def matrices_count(plans_: list[Plan]) -> int:
    """Number of independent selected matrices (batch entries included)."""
    return sum(p.layout.batch for p in plans_ if p.layout is not None)


# ------------------------------------------------------------------------- per-matrix update

def int_view(x: Any) -> Any:
    """A 16-bit float array viewed as uint16 (other values as they are). Slicing a stack and
    writing slices into one are integer ops on the view, which XLA:CPU never upcasts: on a bf16
    stack it computes ``dynamic-slice`` / ``dynamic-update-slice`` in float32 through a float32
    copy of the *whole* stack, which it hoists out of the loop."""
    if getattr(x, "dtype", None) in (jnp.bfloat16, jnp.float16):
        return jax.lax.bitcast_convert_type(x, jnp.uint16)
    return x


def from_int_view(x: Any, dtype: Any) -> Any:
    """Inverse of :func:`int_view` for a value of ``dtype``."""
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype != dtype else x


def late_zero(dep: jax.Array) -> jax.Array:
    """An unsigned-integer 0 that XLA can only compute once ``dep`` exists: the bits of
    ``dep``'s first entry min'ed with 0 (XLA does not fold that). It ties a value to a point of
    the step where an ``optimization_barrier`` does not (XLA:CPU's scheduler computes buffers
    whose operands are ready, such as a constant accumulator or a float32 copy of a weight or
    a gradient, as early as it can, and keeps them alive until their last use)."""
    # one entry by index, not jnp.ravel(dep)[0]: a ravel of a sharded array gathers it whole
    first = dep[(0,) * jnp.ndim(dep)]
    bits = jax.lax.bitcast_convert_type(first, jnp.dtype(f"uint{8 * first.dtype.itemsize}"))
    return jnp.minimum(bits, 0)


def after(tree: Any, dep: jax.Array, scalars_only: bool = False) -> Any:
    """``tree`` bit for bit, computed only once ``dep`` exists: each numeric leaf (with
    ``scalars_only``: each 0-d leaf) is OR'ed with :func:`late_zero` on its bits. Used to keep
    XLA from materialising a buffer long before it is needed."""
    zero = late_zero(dep)

    def one(x):
        dtype = getattr(x, "dtype", None)
        if dtype is None or (scalars_only and jnp.ndim(x)) or not (
                jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
            return x
        u = jnp.dtype(f"uint{8 * dtype.itemsize}")
        return jax.lax.bitcast_convert_type(
            jax.lax.bitcast_convert_type(x, u) | zero.astype(u), dtype)

    return jax.tree_util.tree_map(one, tree)


def _one_matrix(plan: Plan) -> Plan:
    lay = plan.layout
    return dataclasses.replace(plan, layout=sub.Layout((0, 1, 2), (1, lay.m, lay.n), 1, lay.m,
                                                       lay.n))


def map_matrices(fn: Callable[[Any, Any], Any], xs: Any, out: Any, batch: int,
                 keepdims: bool = True, views: Any = True) -> Any:
    """``out[i] = fn(xs[i], out[i])`` for ``i < batch``, one matrix at a time: the one loop over
    the matrices of a stack that the update (:func:`update_per_matrix`) and the refresh
    (:func:`_refresh_leaf`) share. Every array of the pytrees ``xs`` / ``out`` has the batch
    axis first (None entries are skipped); ``fn`` maps one slice of each (the batch axis kept
    as size 1 with ``keepdims``, dropped otherwise) to a pytree like ``out``'s slice, cast to
    ``out``'s dtypes; a ``jax.ShapeDtypeStruct`` in ``out`` is a fresh output (starts as
    zeros). Returns the written ``out`` (arrays).

    A ``fori_loop`` whose carries ``(xs, out)`` go through ``optimization_barrier``, so XLA:CPU
    hoists no float32 upcast of a whole 16-bit stack out of the loop (it would otherwise keep a
    float32 copy of every bf16 stack read or written inside, plus LAPACK's column-major
    transpose of it), and whose 16-bit outputs are written into uint16 views
    (:func:`int_view`) where ``views`` (a bool, or a pytree of bools that is a prefix of
    ``out``) says so; the float32 temporaries of ``fn`` are one matrix's. Views are not always a
    gain: for the bf16 moments of GaLore's update they cost 0.7 GiB at llama_1b (measured:
    10.89 vs 10.19 GiB), for the direction and the refreshed projector they are the pattern
    that avoids the upcast copies."""
    dtypes = jax.tree_util.tree_map(lambda x: x.dtype, out)
    if isinstance(views, bool):
        views = jax.tree_util.tree_map(lambda _: views, out)
    else:
        views = jax.tree_util.tree_map(
            lambda v, sub: jax.tree_util.tree_map(lambda _: v, sub), views, out)
    view = lambda x, v: int_view(x) if v else x  # noqa: E731
    take = lambda tree, i: jax.tree_util.tree_map(  # noqa: E731
        lambda x: jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=keepdims), tree)

    def body(i, carry):
        xs, out = jax.lax.optimization_barrier(carry)
        old = jax.tree_util.tree_map(from_int_view, take(out, i), dtypes)
        new = fn(take(xs, i), old)
        out = jax.tree_util.tree_map(
            lambda x, v, d, w: jax.lax.dynamic_update_index_in_dim(x, view(v.astype(d), w), i,
                                                                   0),
            out, new, dtypes, views)
        return xs, out

    def start(x, v):
        if isinstance(x, jax.ShapeDtypeStruct):       # a fresh output: zeros, born viewed
            return jnp.zeros(x.shape, int_view(jnp.zeros((), x.dtype)).dtype if v else x.dtype)
        return view(x, v)

    _, out = jax.lax.fori_loop(0, batch, body, (xs, jax.tree_util.tree_map(start, out, views)))
    return jax.tree_util.tree_map(from_int_view, out, dtypes)


def update_per_matrix(strategy: Strategy, plan: Plan, g3: jax.Array, leaf: Any,
                      count: jax.Array, key: jax.Array | None, dtype: Any
                      ) -> tuple[jax.Array, Any]:
    """:meth:`Strategy.update_leaf` of a stacked leaf (``g3 (B, m, n)``, every ``leaf`` array
    ``(B, ...)``) one matrix at a time (:func:`map_matrices`), the direction cast to ``dtype``:
    the float32 temporaries (projection, moments, back-projection) are one matrix's, not the
    stack's. Matrix ``i`` of the direction is written over matrix ``i`` of (the uint16 view of)
    the gradient, in the same loop buffer: a fresh direction stack was a second stack per leaf,
    materialised by XLA:CPU at the start of the step (llama_1b GaLore bf16: 10.19 -> 9.34 GiB).
    Same numbers as one call on the stack for a strategy with ``per_matrix_update``."""
    one = _one_matrix(plan)

    def fn(_, out_i):
        g_i = out_i[0]           # matrix i of the gradient, overwritten by its direction
        u_i, new = strategy.update_leaf(one, g_i, g_i, out_i[1], count, key)
        return u_i, new

    # The direction is written over the gradient stack it is computed from (slice i is read
    # before it is written), so the update holds one stack, not a gradient and a direction.
    u, leaf = map_matrices(fn, (), (g3.astype(dtype), leaf), plan.layout.batch,
                           views=(True, False))
    return plan.layout.from3(u), leaf


# ----------------------------------------------------------------------------------- adam math

def state_dtype(moment_dtype: Any, x: Any) -> Any:
    """Storage dtype of the moments of leaf ``x``: ``moment_dtype`` when given, else (None) the
    leaf's own floating dtype, as optax's Adam stores ``mu`` / ``nu`` like the parameters
    (float32 parameters keep float32 moments; bf16 ones get bf16 moments); float32 for a leaf
    without a floating dtype."""
    if moment_dtype is not None:
        return moment_dtype
    dtype = getattr(x, "dtype", None)
    return dtype if dtype is not None and jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def pow_(b: Any, k: jax.Array) -> jax.Array:
    """``b**k`` in float32 (``k`` an integer count, possibly ``(B, 1, 1)``)."""
    return jnp.power(jnp.asarray(b, jnp.float32), jnp.asarray(k).astype(jnp.float32))


def adam_moments(mu: jax.Array, nu: jax.Array, g: jax.Array, b1: Any, b2: Any
                 ) -> tuple[jax.Array, jax.Array]:
    """``M ← β1 M + (1-β1) g``, ``V ← β2 V + (1-β2) g²`` in float32."""
    g = g.astype(jnp.float32)
    return (b1 * mu.astype(jnp.float32) + (1.0 - b1) * g,
            b2 * nu.astype(jnp.float32) + (1.0 - b2) * g * g)


def bias_factor(b1: Any, b2: Any, k: jax.Array) -> jax.Array:
    """transformers-AdamW step factor ``sqrt(1-β2^k) / (1-β1^k)`` (GaLore, Fira, APOLLO)."""
    return jnp.sqrt(1.0 - pow_(b2, k)) / (1.0 - pow_(b1, k))


# -------------------------------------------------------------------------------------- refresh

def _stagger_offsets(strategy: Strategy, plans_: list[Plan]) -> list:
    """Per refreshed leaf the ``(B,)`` refresh offsets in the window: matrix ``j`` of ``J``
    refreshes when ``count % T == (j·T) // J``."""
    total = sum(p.layout.batch for p in plans_ if p.kind == "proj")
    gap = strategy.update_proj_gap
    out, j = [], 0
    for p in plans_:
        if p.kind != "proj":
            out.append(None)
            continue
        b = p.layout.batch
        out.append(jnp.asarray([((j + t) * gap) // max(total, 1) for t in range(b)], jnp.int32))
        j += b
    return out


def _part(leaf: Any, fields: tuple[str, ...]) -> Any:
    """``leaf`` with every field outside ``fields`` set to None."""
    return leaf._replace(**{f: None for f in leaf._fields if f not in fields})


def _merge(leaf: Any, part: Any, fields: tuple[str, ...]) -> Any:
    return leaf._replace(**{f: getattr(part, f) for f in fields})


def _refresh_leaf(strategy: Strategy, plan: Plan, g3: jax.Array, part: Any, key: jax.Array,
                  count: jax.Array, preds: jax.Array | None, read_old: bool) -> Any:
    """Refresh the ``B`` matrices of one leaf one at a time (:func:`map_matrices`: one matrix's
    workspace at a time, unbatched LAPACK calls, no float32 copy of the whole gradient stack).
    ``preds (B,)``: per-matrix predicates (stagger) or None. With ``read_old`` the refreshed
    fields are written over the old ones; without, the strategy sees ``projector=None`` and the
    old projector is not read at all (passing it into the loop would keep it alive next to the
    new one: +0.7 GiB at llama_1b, measured)."""
    keys = jax.random.split(key, plan.layout.batch)
    if not read_old:
        part = part._replace(projector=None)

    def one(args):
        g_b, part_b, key_b, pred_b = args
        if pred_b is None:
            return strategy.refresh_matrix(plan, g_b, part_b, key_b, count)
        return jax.lax.cond(pred_b,
                            lambda p: strategy.refresh_matrix(plan, g_b, p, key_b, count),
                            lambda p: p, part_b)

    args = (g3, part, keys, preds)
    first = lambda t: jax.tree_util.tree_map(lambda x: x[0], t)  # noqa: E731
    if plan.layout.batch == 1:
        return jax.tree_util.tree_map(lambda x: x[None], one(first(args)))
    if read_old:
        return map_matrices(lambda a, old: one((a[0], old, a[1], a[2])), (g3, keys, preds),
                            part, plan.layout.batch, keepdims=False)
    out = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct((plan.layout.batch, *s.shape), s.dtype),
        jax.eval_shape(one, first(args)))
    return map_matrices(lambda a, _: one(a), args, out, plan.layout.batch, keepdims=False)


# ------------------------------------------------------------------------------------ transform

def transform(strategy: Strategy) -> optax.GradientTransformation:
    """The optax GradientTransformation that runs ``strategy`` on every leaf."""
    n_leaf = len(strategy.Leaf._fields)

    def init_fn(params):
        pl, treedef, leaves = plans(strategy, params)
        states = [strategy.init_leaf(p, x) for p, x in zip(pl, leaves, strict=True)]
        columns = [treedef.unflatten([getattr(s, f) for s in states])
                   for f in strategy.Leaf._fields]
        key = jax.random.PRNGKey(strategy.seed) if strategy.needs_key else None
        return strategy.State(jnp.zeros([], jnp.int32), key, *columns,
                              *strategy.init_globals(pl, treedef, leaves, states))

    def update_fn(updates, state, params=None):
        pl, treedef, _ = plans(strategy, updates if params is None else params)
        raw = treedef.flatten_up_to(updates)
        grads = [leaf_value(g) for g in raw]
        columns = [treedef.flatten_up_to(state[2 + j]) for j in range(n_leaf)]
        leaves = [strategy.Leaf(*(c[i] for c in columns)) for i in range(len(pl))]
        globals_ = tuple(state[2 + n_leaf:])
        g3 = [None if p.layout is None else p.layout.to3(g)
              for p, g in zip(pl, grads, strict=True)]
        count = state.count
        step_key = (jax.random.fold_in(state.key, count) if state.key is not None
                    else jax.random.PRNGKey(0))

        # ---- refresh: new projectors (and each method's moment policy), one matrix at a time
        refreshed = [p.kind == "proj" for p in pl]
        interleave = (any(refreshed) and not strategy.stagger
                      and strategy.refreshes_in_update_all())
        fields = [strategy.refresh_fields(p) if r else () for p, r in zip(pl, refreshed,
                                                                          strict=True)]
        read_old = strategy.reads_old_projector()

        def refresh_one(i: int, g: jax.Array) -> Any:
            """Leaf ``i`` refreshed from ``g (B, m, n)`` inside its own cond on the count."""
            p, key_i = pl[i], jax.random.fold_in(step_key, i)
            part = jax.lax.cond(
                count % strategy.update_proj_gap == 0,
                lambda q: _refresh_leaf(strategy, p, g, q, key_i, count, None, read_old),
                lambda q: q, _part(leaves[i], fields[i]))
            return _merge(leaves[i], part, fields[i])

        if any(refreshed) and not interleave:
            # One cond per leaf (never one around the whole tree): a leaf's refresh needs only
            # its own gradient, so XLA can run it as soon as the backward pass has produced that
            # gradient and free it right after, as for any per-leaf update.
            offsets = _stagger_offsets(strategy, pl) if strategy.stagger else None
            new = list(leaves)
            for i, p in enumerate(pl):
                if not refreshed[i]:
                    continue
                if strategy.stagger:
                    preds = (count == 0) | (count % strategy.update_proj_gap == offsets[i])
                    part = _refresh_leaf(strategy, p, g3[i], _part(leaves[i], fields[i]),
                                         jax.random.fold_in(step_key, i), count, preds, True)
                    new[i] = _merge(leaves[i], part, fields[i])
                else:
                    new[i] = refresh_one(i, g3[i])
            # The update of a refreshed leaf reads its gradient only after the refresh: XLA:CPU
            # otherwise made the float32 copies of every gradient of a layer for the
            # projections before the refreshes and kept them across all the SVDs.
            g3 = [after(g, jax.tree_util.tree_leaves(_part(q, f))[0]) if r else g
                  for g, q, f, r in zip(g3, new, fields, refreshed, strict=True)]
            leaves = new
        leaves = strategy.refresh_global(pl, leaves, count, state.key)

        # ---- update
        done = strategy.update_all(pl, treedef, grads, g3, leaves, globals_, count,
                                   refresh=refresh_one if interleave else None)
        if interleave and done is None:
            raise RuntimeError(f"{type(strategy).__name__}.refreshes_in_update_all() is True "
                               "but its update_all returned None: the projectors were never "
                               "refreshed")
        if done is None:
            # Leaf by leaf with no cross-leaf dependency: each update (Fira's residual
            # included) is a function of its own gradient only, so its temporaries live while
            # that one leaf is processed.
            # A stacked leaf of a per-matrix strategy goes one matrix at a time.
            out = []
            for i, p in enumerate(pl):
                if (strategy.per_matrix_update and p.kind != "dense" and p.layout is not None
                        and p.layout.batch > 1):
                    u, leaves[i] = update_per_matrix(strategy, p, g3[i], leaves[i], count,
                                                     state.key, grads[i].dtype)
                else:
                    u, leaves[i] = strategy.update_leaf(p, grads[i], g3[i], leaves[i], count,
                                                        state.key)
                out.append(u.astype(grads[i].dtype))
        else:
            out, leaves, globals_ = done
        new_columns = [treedef.unflatten([getattr(s, f) for s in leaves])
                       for f in strategy.Leaf._fields]
        new_state = strategy.State(optax.safe_increment(count), state.key, *new_columns,
                                   *globals_)
        return (treedef.unflatten([rewrap(r, x) for r, x in zip(raw, out, strict=True)]),
                new_state)

    return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------------------ shared wrappers

def is_number(x: Any) -> bool:
    """A Python int/float (not bool): a hyperparameter that can be validated statically."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_common(*, update_proj_gap: Any, b1: Any, b2: Any, eps: Any, stagger: Any) -> None:
    """ValueError for bad hyperparameters every method shares."""
    if not isinstance(update_proj_gap, int) or isinstance(update_proj_gap, bool) or (
            update_proj_gap <= 0):
        raise ValueError(f"update_proj_gap must be a positive int, got {update_proj_gap!r}")
    for name, v in (("b1", b1), ("b2", b2)):
        if is_number(v) and not 0.0 <= v < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {v}")
    if is_number(eps) and eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not isinstance(stagger, bool):
        raise ValueError(f"stagger must be a bool, got {stagger!r}")


def check_rank(rank: Any) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise ValueError(f"rank must be a positive Python int, got {rank!r} (under "
                         "optax.inject_hyperparams use lrx.optim.inject_hyperparams, which "
                         "keeps shape-defining arguments static)")


def check_projector_args(oversample: Any, power_iters: Any) -> None:
    for name, v in (("oversample", oversample), ("power_iters", power_iters)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{name} must be an int >= 0, got {v!r}")


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
    """``Δ = -lr·u`` then GaLore/Fira/APOLLO's decoupled weight decay on the *updated* weight:
    ``W' = (W - lr·u)(1 - lr·wd)``, i.e. ``Δ = -lr·u - lr·wd·(W - lr·u)`` (official order:
    ``p.add_(update); p.add_(p, alpha=-lr·wd)``). ``learning_rate`` may be an optax schedule."""

    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        step = jax.tree_util.tree_map(lambda u: (-lr * u).astype(u.dtype), updates)
        if is_number(weight_decay) and weight_decay == 0.0:
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
