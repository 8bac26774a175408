"""lrx.param: weight parameterizations as pytrees plus pure functions.

Factored weights (:class:`LowRank`, :class:`LoRA`, :class:`DoRA`, :class:`SparsePlusLowRank`,
:class:`NOLA`, :class:`RandLoRA`, :class:`VeRA`) stand in for dense ``(in, out)`` kernels;
factories (:func:`lowrank`, :func:`lora`, :func:`dora`, :func:`sltrain`, :func:`nola`,
:func:`randlora`, :func:`vera`; or :func:`factory` by name) build them from a dense weight;
:func:`apply` replaces the leaves whose path matches a regex; :func:`partition` / :func:`combine`
separate trainable from frozen fields; :func:`materialize` turns nodes into dense arrays;
:func:`dot` computes ``x @ W`` for dense or factored ``W`` (the one entry point lrx's models use);
:func:`count` reports parameter counts; :func:`merge_and_reinit` is ReLoRA's restart.
See :mod:`lrx.param.nodes` for the papers and equations.
"""

from lrx.param.core import Factored, dot, is_node
from lrx.param.nodes import (
    NOLA,
    DoRA,
    Factory,
    LoRA,
    LowRank,
    RandLoRA,
    SparsePlusLowRank,
    VeRA,
    dora,
    lora,
    lowrank,
    nola,
    randlora,
    sltrain,
    vera,
)
from lrx.param.tree import (
    apply,
    combine,
    count,
    factory,
    materialize,
    merge_and_reinit,
    partition,
    path_str,
)

METHODS = ("lowrank", "lora", "dora", "sltrain", "nola", "randlora", "vera")

__all__ = [
    "METHODS", "NOLA", "DoRA", "Factored", "Factory", "LoRA", "LowRank", "RandLoRA",
    "SparsePlusLowRank", "VeRA", "apply", "combine", "count", "dora", "dot", "factory", "is_node",
    "lora", "lowrank", "materialize", "merge_and_reinit", "nola", "partition", "path_str",
    "randlora", "sltrain", "vera",
]
