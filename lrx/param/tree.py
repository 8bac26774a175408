"""Parameter-tree operations for factored weights: apply rules, partition/combine, materialize,
count, the factory registry and ReLoRA's merge-and-reinitialise.

ReLoRA: "ReLoRA: High-Rank Training Through Low-Rank Updates" (Lialin et al., arXiv 2307.05695):
every K steps the LoRA adapters are merged into the (frozen) base, re-initialised as at the start
and the optimizer state is reset (the paper prunes 99% of it by magnitude; a full reset is the
simplest variant), with a jagged learning-rate schedule.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lrx.param.core import FROZEN, TRAINABLE, Factored, is_node
from lrx.param.methods import FACTORIES_V2
from lrx.param.nodes import FACTORIES as FACTORIES_V1
from lrx.param.nodes import LoRA, lora_init
from lrx.paths import path_str

PyTree = Any

FACTORIES = {**FACTORIES_V1, **FACTORIES_V2}


def _path_key(key: jax.Array, path: str) -> jax.Array:
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


def apply(params: PyTree, rules: Sequence[tuple[str, Callable]], key: jax.Array,
          stats: PyTree | None = None) -> PyTree:
    """Replaces dense matrices by factored weights according to ``rules``.

    Args:
      params: a parameter pytree (e.g. flax ``variables['params']``) of dense arrays.
      rules: ``(path_regex, factory)`` pairs. A leaf's path is its keys joined by ``'/'`` (e.g.
        ``'layers_0/attn/q/kernel'``); the first rule whose regex *fully* matches the path
        (``re.fullmatch``) is applied. Leaves matched by no rule stay dense; factored nodes
        already in ``params`` are left unchanged. Methods with bases shared across layers (VeRA,
        RandLoRA) size them for the largest matrix matched by the same rule.
      key: PRNG key; each matched leaf gets ``fold_in(key, crc32(path))``.
      stats: data for data-driven inits (factories with a ``needs_stat`` attribute: LoRA-GA and
        LoRA-SB take the loss gradient ``dL/dW: (m, n)``, EVA the layer's input activations
        ``(tokens, m)``), as ``{path: array}`` or a tree whose leaf paths match ``params``
        (e.g. the gradient tree); passed to the factory as its third argument.
    Returns:
      the same tree with factored nodes in place of the matched ``(m, n)`` leaves.
    Raises:
      ValueError: a malformed rule, or a rule that matches a leaf that is not a 2-D matrix.
    Warns:
      UserWarning for each rule that matches no leaf, listing the available paths.
    """
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple | list) and len(rule) == 2 and isinstance(rule[0], str)
                and callable(rule[1])):
            raise ValueError(f"rules[{i}] must be a (path_regex, factory) pair, got {rule!r}")
        try:
            compiled.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise ValueError(f"rules[{i}]: {rule[0]!r} is not a valid regex: {e}") from None
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)
    paths = [path_str(p) for p, _ in leaves]
    assigned: dict[int, list[int]] = {i: [] for i in range(len(compiled))}
    for j, ((_, x), path) in enumerate(zip(leaves, paths, strict=True)):
        if is_node(x):
            continue
        for i, (regex, _) in enumerate(compiled):
            if regex.fullmatch(path):
                shape = tuple(np.shape(x))
                if len(shape) != 2:
                    raise ValueError(
                        f"rule {rules[i][0]!r} matches {path!r} of shape {shape}, but "
                        f"parameterizations apply to 2-D (in, out) matrices only; narrow the regex")
                assigned[i].append(j)
                break
    for i, matched in assigned.items():
        if not matched:
            shown = [f"{p} {tuple(np.shape(x))}" for p, (_, x) in zip(paths, leaves, strict=True)
                     if not is_node(x)]
            more = f" ... ({len(shown) - 40} more)" if len(shown) > 40 else ""
            warnings.warn(f"lrx.param.apply: rule {rules[i][0]!r} matches no parameter "
                          f"(regexes must match the whole path). Available paths: "
                          f"{', '.join(shown[:40])}{more}", UserWarning, stacklevel=2)
    by_path: dict[str, Any] = {}
    if stats is not None:
        flat_stats = jax.tree_util.tree_flatten_with_path(stats, is_leaf=is_node)[0]
        by_path = {path_str(p): x for p, x in flat_stats}
    new = [x for _, x in leaves]
    for i, matched in assigned.items():
        if not matched:
            continue
        factory = compiled[i][1]
        if hasattr(factory, "bind_shapes"):
            factory = factory.bind_shapes([tuple(np.shape(leaves[j][1])) for j in matched])
        for j in matched:
            if getattr(factory, "needs_stat", None):
                new[j] = factory(_path_key(key, paths[j]), leaves[j][1], by_path.get(paths[j]))
            else:
                new[j] = factory(_path_key(key, paths[j]), leaves[j][1])
    return jax.tree_util.tree_unflatten(treedef, new)


def _keep(node: Factored, kind: str) -> Factored:
    drop = [name for name, k in node.kinds.items() if k in (TRAINABLE, FROZEN) and k != kind]
    return node.replace(**{name: None for name in drop})


def partition(params: PyTree) -> tuple[PyTree, PyTree]:
    """Splits ``params`` into ``(trainable, frozen)`` trees of the same structure.

    Dense leaves are trainable. Inside a factored node the trainable part keeps the trainable
    fields (frozen ones set to ``None``) and the frozen part keeps the frozen fields. Take
    gradients and build optimizer state from ``trainable`` only; ``combine`` restores the full
    tree. (``jax.grad`` with respect to the full tree also works; it just computes gradients of
    the frozen fields too.)
    """
    train = jax.tree.map(lambda x: _keep(x, TRAINABLE) if is_node(x) else x, params,
                         is_leaf=is_node)
    froz = jax.tree.map(lambda x: _keep(x, FROZEN) if is_node(x) else None, params,
                        is_leaf=is_node)
    return train, froz


def combine(trainable: PyTree, frozen: PyTree) -> PyTree:
    """Inverse of :func:`partition` (works under ``jit`` and ``grad``)."""

    def merge(t: Any, f: Any) -> Any:
        if not is_node(t):
            return t
        changes = {}
        for name, kind in t.kinds.items():
            if kind == FROZEN and f is not None:
                changes[name] = getattr(f, name)
        return t.replace(**changes)

    return jax.tree.map(merge, trainable, frozen, is_leaf=is_node)


def materialize(params: PyTree) -> PyTree:
    """Every factored node replaced by its dense ``(m, n)`` weight (works with any model)."""
    return jax.tree.map(lambda x: x.materialize() if is_node(x) else x, params, is_leaf=is_node)


def _size_bytes(x: Any) -> tuple[int, int]:
    if x is None:
        return 0, 0
    size = int(np.prod(np.shape(x)))
    return size, size * jnp.dtype(x.dtype).itemsize


def count_params(tree: PyTree) -> int:
    """Number of scalars in the array leaves of ``tree`` (arrays or ``jax.ShapeDtypeStruct``;
    factored nodes count their stored arrays). The one scalar counter of lrx: models, the training
    loop and the experiments use it."""
    return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree.leaves(tree)
                   if hasattr(x, "shape")))


def count(params: PyTree) -> dict[str, int]:
    """Parameter counts: ``{'trainable', 'frozen', 'trainable_bytes', 'frozen_bytes',
    'generated'}``; ``generated`` counts random-basis entries regenerated from seeds (stored
    nowhere; bases shared by several layers, as in VeRA and RandLoRA, count once per layer that
    regenerates them). Dense leaves count as trainable."""
    out = dict(trainable=0, frozen=0, trainable_bytes=0, frozen_bytes=0, generated=0)
    for x in jax.tree.leaves(params, is_leaf=is_node):
        if is_node(x):
            for name, kind in x.kinds.items():
                if kind in (TRAINABLE, FROZEN):
                    n, b = _size_bytes(getattr(x, name))
                    out[kind] += n
                    out[f"{kind}_bytes"] += b
            out["generated"] += x.generated_size()
        else:
            n, b = _size_bytes(x)
            out["trainable"] += n
            out["trainable_bytes"] += b
    return out


def factory(method: str, **kwargs: Any) -> Callable:
    """The typed factory of ``method`` built from ``kwargs`` (for configs), e.g.
    ``factory('lora', rank=8, alpha=16)`` is ``LoRAFactory(rank=8, alpha=16)``.

    Raises:
      ValueError: unknown method (lists the valid ones), unknown or missing kwargs (lists the
        method's hyperparameters with their defaults) or an invalid value.
    """
    if method not in FACTORIES:
        raise ValueError(f"unknown parameterization method {method!r}; valid methods: "
                         f"{', '.join(FACTORIES)}")
    cls = FACTORIES[method]
    fields = cls.hyperparameters()
    names = [f.name for f in fields]
    valid = ", ".join(f.name + ("" if f.default is dataclasses.MISSING else f"={f.default!r}")
                      for f in fields)
    unknown = sorted(set(kwargs) - set(names))
    if unknown:
        raise ValueError(f"{method}: unknown argument(s) {', '.join(unknown)}; valid: {valid}")
    missing = [f.name for f in fields if f.default is dataclasses.MISSING
               and f.name not in kwargs]
    if missing:
        raise ValueError(f"{method}: missing argument(s) {', '.join(missing)}; valid: {valid}")
    return cls(**kwargs)


def merge_and_reinit(params: PyTree, key: jax.Array) -> PyTree:
    """ReLoRA restart: merge every :class:`LoRA` adapter into its base
    (``base <- base + s a @ b``) and re-initialise ``a, b`` as at init (``'default'``: ``a``
    Kaiming-uniform from ``fold_in(key, crc32(path))``, ``b = 0``; ``'pissa'`` / ``'olora'``: the
    top-r SVD / QR split of the merged weight; data-driven inits (``'lora_ga'``, ``'eva'``) restart
    as ``'default'``). The effective weights are unchanged for ``'default'`` and ``'pissa'``.
    Other leaves are returned as they are. Needs the full tree (``combine`` the partition
    first); works under ``jit``. Reset the optimizer state of the adapters afterwards."""

    def one(path: Any, x: Any) -> Any:
        if not isinstance(x, LoRA):
            return x
        merged = (x.base.astype(jnp.float32)
                  + x.scale * (x.a.astype(jnp.float32) @ x.b.astype(jnp.float32)))
        merged = merged.astype(x.base.dtype)
        init = x.init if x.init in ("default", "pissa", "olora") else "default"
        base, a, b = lora_init(_path_key(key, path_str(path)), merged, x.a.shape[1], x.scale,
                               init)
        return x.replace(base=base, a=a.astype(x.a.dtype), b=b.astype(x.b.dtype))

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=is_node)
