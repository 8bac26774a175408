"""lrx.param: weight parameterizations as pytrees plus pure functions.

Factored weights (:class:`LowRank`, :class:`LoRA`, :class:`DoRA`, :class:`SparsePlusLowRank`,
:class:`NOLA`, :class:`RandLoRA`, :class:`VeRA`) stand in for dense ``(in, out)`` kernels.
Each method has one frozen, typed factory dataclass holding its hyperparameters
(:class:`LowRankFactory`, :class:`LoRAFactory`, ...; lower-case aliases :func:`lowrank`,
:func:`lora`, :func:`dora`, :func:`sltrain`, :func:`nola`, :func:`randlora`, :func:`vera`; or
:func:`factory` by name) whose call ``factory(key, w)`` builds the node from a dense weight;
:func:`apply` replaces the leaves whose path matches a regex; :func:`partition` / :func:`combine`
separate trainable from frozen fields; :func:`materialize` turns nodes into dense arrays;
:func:`dot` computes ``x @ W`` for dense or factored ``W`` (the one entry point lrx's models use)
and :func:`read_kernel` reads a dense or factored kernel inside a flax module;
:func:`count` reports parameter counts; :func:`merge_and_reinit` is ReLoRA's restart.
Data-driven inits (LoRA-GA, EVA, LoRA-SB: ``apply(..., stats=...)``), SoRA's gates and proximal
step, DyLoRA's nested ranks, Trained Rank Pruning and WeLore's LRC fine-tuning are in
:mod:`lrx.param.methods`. See :mod:`lrx.param.nodes` and :mod:`lrx.param.methods` for the papers
and equations.
"""

from lrx.param.core import Factored, dot, is_node, read_kernel
from lrx.param.methods import (
    DyLoRA,
    DyLoRAFactory,
    EVAFactory,
    LoRAGAFactory,
    LoRASB,
    LoRASBFactory,
    SoRA,
    SoRAFactory,
    dylora_sample_rank,
    eva_ranks,
    set_rank,
    sora_proximal,
    trp_nuclear_regularizer,
    trp_truncate,
    welore_lrc,
)
from lrx.param.nodes import (
    NOLA,
    DoRA,
    DoRAFactory,
    Factory,
    LoRA,
    LoRAFactory,
    LowRank,
    LowRankFactory,
    NOLAFactory,
    RandLoRA,
    RandLoRAFactory,
    SLTrainFactory,
    SparsePlusLowRank,
    VeRA,
    VeRAFactory,
    dora,
    lora,
    lowrank,
    nola,
    randlora,
    sltrain,
    vera,
)
from lrx.param.tree import (
    FACTORIES,
    apply,
    combine,
    count,
    count_params,
    factory,
    materialize,
    merge_and_reinit,
    partition,
    path_str,
)

METHODS = tuple(FACTORIES)

__all__ = [
    "DyLoRA", "DyLoRAFactory", "EVAFactory", "LoRAGAFactory", "LoRASB", "LoRASBFactory", "SoRA",
    "SoRAFactory", "dylora_sample_rank", "eva_ranks", "set_rank", "sora_proximal",
    "trp_nuclear_regularizer", "trp_truncate", "welore_lrc",
    "FACTORIES", "METHODS", "NOLA", "DoRA", "DoRAFactory", "Factored", "Factory", "LoRA",
    "LoRAFactory", "LowRank", "LowRankFactory", "NOLAFactory", "RandLoRA", "RandLoRAFactory",
    "SLTrainFactory", "SparsePlusLowRank", "VeRA", "VeRAFactory", "apply", "combine", "count",
    "count_params",
    "dora", "dot", "factory", "is_node", "lora", "lowrank", "materialize", "merge_and_reinit",
    "nola", "partition", "path_str", "randlora", "read_kernel", "sltrain", "vera",
]
