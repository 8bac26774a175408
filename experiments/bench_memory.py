"""Benchmark: compiled memory of a full train step at paper scale, from shapes only.

For every model (``llama_1b``, ``llama_7b`` of :mod:`lrx.models.llama`, vocabulary 32000, bf16
parameters and compute) and every optimizer row, the train step (forward, backward, optimizer
update, the program that also holds the projector refresh) is lowered from
``jax.eval_shape`` shapes and compiled; nothing is allocated. XLA's ``memory_analysis`` gives
``peak_bytes = arguments + outputs + temporaries - aliased`` (the state is donated, so its
buffers are reused for the new state). Rows:

* ``ordinary``: :func:`lrx.train.loop.make_step` on a scanned, rematerialised stack (the whole
  gradient exists, then one optimizer update); ``optax_galore`` runs unrolled layers
  (``optax.contrib.galore`` takes 2-D kernels only).
* ``per_layer``: :func:`lrx.train.per_layer.make_per_layer_step` (each layer updated inside the
  backward pass; the gradient of one layer at a time).

``state_dtype`` says how the moments are stored: ``bfloat16`` (AdamW's default for bf16 params,
as optax), ``float32`` (lrx's low-rank default), ``8bit`` (:mod:`lrx.optim.quant`). Outputs:
``summary.json`` (``rows``: model, optimizer, variant, per_layer, state_dtype, param_bytes,
state_bytes, peak_bytes, temp_bytes, compile_s; ``targets``), ``bench.md``.

XLA:CPU computes bf16 matmuls in float32 (it upcasts operands), so CPU peaks are upper bounds of
what a GPU/TPU compile of the same program needs.
"""

from __future__ import annotations

import gc
import logging
import math
import re
import time
from typing import Any

import ml_collections

from experiments import common
from experiments.common import ConfigError

log = logging.getLogger("lrx.bench_memory")

MODELS = ("tiny", "llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b")
# name -> (variant, state_dtype)
ROWS = {
    "adamw": ("ordinary", "bfloat16"),
    "adamw_8bit": ("ordinary", "8bit"),
    "adamw_per_layer_8bit": ("per_layer", "8bit"),
    "optax_galore": ("ordinary_unrolled", "bfloat16"),
    "galore": ("ordinary", "float32"),
    "galore_bf16": ("ordinary", "bfloat16"),
    "galore_per_layer": ("per_layer", "bfloat16"),
    "galore_per_layer_8bit": ("per_layer", "8bit"),
    "frugal": ("ordinary", "bfloat16"),
    "fira": ("ordinary", "bfloat16"),
    "apollo": ("ordinary", "bfloat16"),
    "apollo_mini": ("ordinary", "bfloat16"),
}


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.experiment = "bench_memory"
    c.models = ("llama_1b", "llama_7b")
    c.optimizers = tuple(ROWS)
    # GaLore's ranks: 512 for 1B (Table 2), 1024 for 7B (Table 3 / the 7B script).
    c.ranks = ml_collections.ConfigDict(dict(tiny=8, llama_60m=128, llama_130m=256,
                                             llama_350m=256, llama_1b=512, llama_7b=1024))
    c.apollo_ranks = ml_collections.ConfigDict(dict(tiny=8, llama_60m=128, llama_130m=256,
                                                    llama_350m=256, llama_1b=256, llama_7b=256))
    c.proj_type = "reverse_std"    # the side that minimises optimizer memory in flax's layout
    c.vocab_size = 32000
    c.batch_size = 1
    c.seq_len = 256
    c.micro_batches = 1            # gradient accumulation: micro_batches x batch_size per step
    c.dtype = "bfloat16"           # parameters and compute
    c.update_proj_gap = 200
    c.density = 0.25               # FRUGAL
    c.block_size = 2048            # 8-bit states (arXiv 2110.02861)
    c.num_layers = 0               # 0: the preset's depth (>0 truncates: smoke tests)
    # FSDP rows (measure_fsdp): mesh data=1 x fsdp=fsdp_devices; run() starts a child process
    # with XLA_FLAGS=--xla_force_host_platform_device_count=fsdp_devices when there are fewer.
    c.fsdp_models = ("llama_1b",)
    c.fsdp_optimizers = tuple(FSDP_ROWS)
    c.fsdp_devices = 8
    c.fsdp_batch_size = 8          # sequences per step (one per device)
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    common.check_keys(config, defaults())
    common.check_models(config, MODELS, ("ranks", "apollo_ranks"))
    for o in config.optimizers:
        common.check_choice(o, tuple(ROWS), "optimizers[...]")
    common.check_choice(config.dtype, ("float32", "bfloat16"), "dtype")
    common.check_choice(config.proj_type, ("std", "reverse_std", "left", "right"), "proj_type")
    for key in ("vocab_size", "batch_size", "seq_len", "update_proj_gap", "block_size",
                "micro_batches"):
        common.check_positive(config[key], key)
    common.check_positive(config.num_layers, "num_layers", allow_zero=True)
    for m in config.fsdp_models:
        common.check_choice(m, tuple(config.ranks), "fsdp_models[...]")
    for o in config.fsdp_optimizers:
        common.check_choice(o, tuple(FSDP_ROWS), "fsdp_optimizers[...]")
    for key in ("fsdp_devices", "fsdp_batch_size"):
        common.check_positive(config[key], key)
    if config.fsdp_batch_size % config.fsdp_devices:
        raise ConfigError(f"config.fsdp_batch_size={config.fsdp_batch_size} must be divisible "
                          f"by config.fsdp_devices={config.fsdp_devices} (the batch is split "
                          "over the devices)")
    if not 0.0 < config.density <= 1.0:
        raise ConfigError(f"config.density={config.density} must be in (0, 1]")


def build_optimizer(name: str, c: ml_collections.ConfigDict, model_name: str, params: Any):
    """The optax transformation of row ``name`` (learning rate 1e-3: values do not change
    memory). Masks are callables, so the same transform serves whole trees and layer slices."""
    import jax
    import jax.numpy as jnp
    import optax
    from optax.contrib import GaLoreDimensionNumbers
    from optax.contrib import galore as optax_galore

    import lrx.optim as lo

    lr, gap, rank = 1e-3, c.update_proj_gap, c.ranks[model_name]
    mask = lambda p: lo.path_mask(p, lo.ATTN_MLP)  # noqa: E731
    bf16 = jnp.bfloat16
    eight = lambda: lo.scale_by_adam_8bit(eps=1e-6, block_size=c.block_size)  # noqa: E731
    if name == "adamw":
        return optax.adamw(lr, eps=1e-6)
    if name in ("adamw_8bit", "adamw_per_layer_8bit"):
        return lo.adamw_8bit(lr, eps=1e-6, weight_decay=0.0, block_size=c.block_size)
    if name == "optax_galore":
        dims = jax.tree_util.tree_map(lambda m: GaLoreDimensionNumbers() if m else None,
                                      mask(params))
        return optax_galore(lr, rank=rank, update_proj_gap=gap, scale=0.25,
                            weight_dimension_numbers=dims)
    galore_kw = dict(rank=rank, update_proj_gap=gap, proj_type=c.proj_type, mask=mask)
    if name == "galore":                 # float32 states (the default would follow the params)
        return lo.galore(lr, moment_dtype=jnp.float32, **galore_kw)
    if name in ("galore_bf16", "galore_per_layer"):
        return lo.galore(lr, projector_dtype=bf16, moment_dtype=bf16, **galore_kw)
    if name == "galore_per_layer_8bit":
        return lo.galore(lr, projector_dtype=bf16, base_optimizer=eight(), **galore_kw)
    if name == "frugal":
        return lo.frugal(lr, density=c.density, update_proj_gap=gap, proj_type=c.proj_type,
                         mask=mask, projector_dtype=bf16, moment_dtype=bf16)
    if name == "fira":
        return lo.fira(lr, projector_dtype=bf16, moment_dtype=bf16, **galore_kw)
    if name == "apollo":
        return lo.apollo(lr, rank=c.apollo_ranks[model_name], update_proj_gap=gap, mask=mask,
                         moment_dtype=bf16)
    if name == "apollo_mini":
        return lo.apollo_mini(lr, update_proj_gap=gap, mask=mask, moment_dtype=bf16)
    raise ConfigError(f"unknown optimizer row {name!r}; valid: {', '.join(ROWS)}")


def _memory(compiled) -> dict:
    m = compiled.memory_analysis()
    return dict(peak_bytes=int(m.argument_size_in_bytes + m.output_size_in_bytes
                               + m.temp_size_in_bytes - m.alias_size_in_bytes),
                temp_bytes=int(m.temp_size_in_bytes),
                argument_bytes=int(m.argument_size_in_bytes))


def model_shapes(c: ml_collections.ConfigDict, model_name: str, *, scan_layers: bool):
    """The bench's LLaMA (bf16, remat, the config's vocabulary / sequence / layer overrides), its
    parameter shapes (``jax.eval_shape``, nothing allocated) and its next-token loss
    ``loss_fn(params, frozen, batch (B, T+1), rng) -> (loss, {})``."""
    import jax
    import jax.numpy as jnp
    import optax

    from lrx.models.llama import Llama, preset

    overrides = dict(vocab_size=c.vocab_size, dtype=c.dtype, param_dtype=c.dtype,
                     max_len=max(c.seq_len, preset(model_name).max_len),
                     scan_layers=scan_layers, remat=True)
    if c.num_layers:
        overrides["num_layers"] = c.num_layers
    cfg = preset(model_name, **overrides)
    model = Llama(cfg)
    params = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"],
                            jax.random.key(0))

    def loss_fn(p, fz, b, rng):  # noqa: ARG001
        logits = model.apply({"params": p}, b[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[:, 1:]).mean(), {}

    return cfg, model, params, loss_fn


def measure(c: ml_collections.ConfigDict, model_name: str, name: str, *,
            compile: bool = True) -> dict:
    """One row: compile the train step of ``name`` for ``model_name`` from shapes
    (``compile=False``: parameter and state bytes only)."""
    import jax
    import jax.numpy as jnp

    from lrx.train import loop, per_layer

    variant, state_dtype = ROWS[name]
    cfg, model, params, loss_fn = model_shapes(c, model_name,
                                               scan_layers=variant != "ordinary_unrolled")
    opt = build_optimizer(name, c, model_name, params)
    batch = jax.ShapeDtypeStruct((c.micro_batches, c.batch_size, c.seq_len + 1), jnp.int32)
    if variant == "per_layer":
        pl = per_layer.make_per_layer_step(*per_layer.llama_pieces(cfg), opt)
        init, step = pl.init, pl.step
    else:
        init, step = opt.init, loop.make_step(loss_fn, opt, micro_batches=c.micro_batches)
    state = jax.eval_shape(lambda p: loop.TrainState(
        step=jnp.zeros((), jnp.int32), params=p, frozen={}, opt_state=init(p),
        rng=jax.random.key_data(jax.random.key(0))), params)
    row = dict(model=model_name, optimizer=name, variant=variant,
               per_layer=variant == "per_layer", state_dtype=state_dtype,
               batch=f"{c.batch_size}x{c.seq_len}", micro_batches=c.micro_batches,
               param_bytes=loop.tree_bytes(params),
               state_bytes=loop.tree_bytes(state.opt_state))
    if compile:
        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
        row.update(_memory(compiled), compile_s=time.perf_counter() - t0)
        del compiled
        gc.collect()
    return row


# ------------------------------------------------------------------------------------- FSDP rows
# Rows of the FSDP step (mesh data=1 x fsdp=devices): the train step compiled with the state
# sharded by lrx.train.sharding and the batch split over the devices; per-device peak and the
# per-device bytes of every collective, parsed from the compiled (SPMD-partitioned) HLO.
FSDP_ROWS = {
    "adamw": "AdamW (bf16 states)",
    "galore": "GaLore, exact SVD refresh (official; gathers the gradient)",
    "galore_randomized": "GaLore, projector='randomized' (the FSDP recipe: gather-free refresh)",
}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"\b(pred|s8|u8|s16|u16|s32|u32|s64|u64|f16|bf16|f32|f64|c64|c128)"
                    r"\[([0-9,]*)\]")
_CALLS = re.compile(r"\b(?:to_apply|body|calls|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_BYTES = dict(pred=1, s8=1, u8=1, s16=2, u16=2, f16=2, bf16=2, s32=4, u32=4, f32=4, s64=8,
              u64=8, f64=8, c64=8, c128=16)


def _shape_bytes(text: str) -> int:
    """Bytes of every array shape written in ``text`` (a result type, possibly a tuple)."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def hlo_collectives(hlo: str) -> dict[str, dict[str, int]]:
    """Per-device bytes of every collective of a compiled HLO module, split into ``'step'``
    (executed on every step) and ``'cond'`` (inside a ``conditional``: the refresh branches).

    An op inside a ``while`` body counts ``known_trip_count`` times (nested loops multiply), one
    called from a conditional branch goes to ``'cond'``. Bytes per op: the result for all-gather /
    all-reduce / all-to-all / collective-permute (what a device receives), the operand for
    reduce-scatter (what it contributes); ``-start`` / ``-done`` pairs count once.
    Returns ``{'step': {op: bytes}, 'cond': {op: bytes}}``.
    """
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = _HEADER.match(line)
        if m:
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None and line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    out = {"step": dict.fromkeys(COLLECTIVES, 0), "cond": dict.fromkeys(COLLECTIVES, 0)}

    def walk(name: str, times: int, where: str, depth: int = 0) -> None:
        if depth > 64:
            raise ValueError(f"HLO call graph deeper than 64 at {name}")
        for line in comps.get(name, ()):
            m = _INSTR.match(line)
            if not m:
                continue
            rtype, op, rest = m.groups()
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base in COLLECTIVES:
                nbytes = (_shape_bytes(rest.split(")", 1)[0]) if base == "reduce-scatter"
                          else _shape_bytes(rtype))
                if op.endswith("-start") and base != "reduce-scatter":
                    # async start returns (operands..., results...): count the results half
                    nbytes = _shape_bytes(rtype) - _shape_bytes(rest.split(")", 1)[0])
                out[where][base] += times * nbytes
            if op == "while":
                trip = _TRIP.search(line)
                body = re.search(r"\bbody=%?([\w.\-]+)", line)
                cond = re.search(r"\bcondition=%?([\w.\-]+)", line)
                n = int(trip.group(1)) if trip else 1
                if body:
                    walk(body.group(1), times * n, where, depth + 1)
                if cond:
                    walk(cond.group(1), times * n, where, depth + 1)
                continue
            branches = _BRANCHES.search(line)
            if op == "conditional":
                names = ([b.strip().lstrip("%") for b in branches.group(1).split(",")]
                         if branches else _CALLS.findall(line))
                for b in names:
                    walk(b, times, "cond", depth + 1)
                continue
            if op in ("fusion", "all-reduce", "reduce-scatter", "reduce", "reduce-window",
                      "scatter", "select-and-scatter", "sort", "map"):
                continue          # called computations are scalar reducers / fused kernels
            for c in _CALLS.findall(line):
                walk(c, times, where, depth + 1)

    walk(entry, 1, "step")
    return out


def build_fsdp_optimizer(name: str, c: ml_collections.ConfigDict, model_name: str):
    """The optax transformation of FSDP row ``name`` (bf16 projectors and moments for GaLore)."""
    import jax.numpy as jnp
    import optax

    import lrx.optim as lo

    lr, bf16 = 1e-3, jnp.bfloat16
    if name == "adamw":
        return optax.adamw(lr, eps=1e-6)
    kw = dict(rank=c.ranks[model_name], update_proj_gap=c.update_proj_gap,
              proj_type=c.proj_type, mask=lambda p: lo.path_mask(p, lo.ATTN_MLP),
              projector_dtype=bf16, moment_dtype=bf16)
    if name == "galore":
        return lo.galore(lr, **kw)
    if name == "galore_randomized":
        return lo.galore(lr, projector="randomized", **kw)
    raise ConfigError(f"unknown FSDP row {name!r}; valid: {', '.join(FSDP_ROWS)}")


def measure_fsdp(c: ml_collections.ConfigDict, model_name: str, name: str) -> dict:
    """One FSDP row: the train step of ``name`` for ``model_name`` on a ``data=1 x
    fsdp=c.fsdp_devices`` mesh, compiled from shapes with the state shardings of
    :func:`lrx.train.sharding.tree_shardings` (the lm harness' rule) and a batch of
    ``c.fsdp_batch_size`` sequences split over the devices. Needs ``c.fsdp_devices`` devices
    (:func:`run` starts a child process with ``XLA_FLAGS`` when there are fewer)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    import lrx.optim as lo
    from lrx.train import loop
    from lrx.train import sharding as shd

    mesh = shd.make_mesh(data=1, fsdp=c.fsdp_devices, devices=jax.devices()[:c.fsdp_devices])
    cfg, model, params, loss_fn = model_shapes(c, model_name, scan_layers=True)
    opt = build_fsdp_optimizer(name, c, model_name)

    state = jax.eval_shape(lambda p: loop.TrainState(
        step=jnp.zeros((), jnp.int32), params=p, frozen={}, opt_state=opt.init(p),
        rng=jax.random.key_data(jax.random.key(0))), params)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = shd.tree_shardings(state, mesh).replace(step=replicated, rng=replicated)
    batch = jax.ShapeDtypeStruct((1, c.fsdp_batch_size, c.seq_len + 1), jnp.int32,
                                 sharding=shd.batch_sharding(mesh, 3, batch_axis=1))
    step = jax.jit(loop.make_step(loss_fn, opt), in_shardings=(shardings, None),
                   out_shardings=(shardings, replicated), donate_argnums=0)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    coll = hlo_collectives(compiled.as_text())
    mem = _memory(compiled)
    del compiled
    gc.collect()
    plan_mask = lo.path_mask(params, lo.ATTN_MLP)
    projected = sum(4 * x.size for x, m in zip(jax.tree_util.tree_leaves(params),
                                               jax.tree_util.tree_leaves(plan_mask), strict=True)
                    if m)
    row = dict(model=model_name, optimizer=name, variant="fsdp", per_layer=False,
               state_dtype="bfloat16", devices=c.fsdp_devices,
               batch=f"{c.fsdp_batch_size}x{c.seq_len}", param_bytes=loop.tree_bytes(params),
               state_bytes=loop.tree_bytes(state.opt_state), **mem,
               compile_s=time.perf_counter() - t0, projected_grad_bytes=int(projected))
    # '<op>_bytes_step': executed on every step (outside the refresh conds); '<op>_bytes_refresh':
    # what a refresh step adds (inside the conds), so a refresh step moves step + refresh bytes.
    for op in COLLECTIVES:
        key = op.replace("-", "")
        row[f"{key}_bytes_step"] = coll["step"][op]
        row[f"{key}_bytes_refresh"] = coll["cond"][op]
    return row


GiB = 2.0 ** 30
# The targets (in bench_memory, from shapes): (label, model, numerator row, denominator
# row or None for an absolute bound in GiB, bound).
TARGETS = (
    ("llama_7b step peak, GaLore per-layer + 8-bit states (GiB)", "llama_7b",
     "galore_per_layer_8bit", None, 22.0),
    ("llama_7b GaLore per-layer + 8-bit vs AdamW ordinary", "llama_7b", "galore_per_layer_8bit",
     "adamw", 0.30),
    ("llama_1b GaLore ordinary (bf16 states) vs AdamW", "llama_1b", "galore_bf16", "adamw", 0.80),
    ("llama_1b GaLore ordinary (float32 states) vs AdamW", "llama_1b", "galore", "adamw", 0.80),
)


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets from the measured rows (rows missing from the run are skipped; the
    targets are for one micro-batch per step, so rows with ``micro_batches > 1`` give none)."""
    by = {(r["model"], r["optimizer"]): r for r in rows if r.get("micro_batches", 1) == 1}
    out = []
    for label, model, num, den, bound in TARGETS:
        if (model, num) not in by or (den and (model, den) not in by):
            continue
        value = by[(model, num)]["peak_bytes"] / (by[(model, den)]["peak_bytes"] if den else GiB)
        out.append(dict(target=label, measured=value, bound=bound, met=bool(value <= bound)))
    return out


# FSDP targets (issue 12): (label, model, row, kind, bound); kind 'gather': refresh all-gathered
# bytes / projected gradient bytes; 'peak': per-device peak vs the FSDP AdamW row.
FSDP_TARGETS = (
    ("FSDP: refresh all-gathered bytes / projected gradient bytes, GaLore randomized",
     "llama_1b", "galore_randomized", "gather", 0.10),
    ("FSDP: refresh all-gathered bytes / projected gradient bytes, GaLore exact SVD",
     "llama_1b", "galore", "gather", 0.10),
    ("FSDP: per-device step peak vs AdamW, GaLore randomized", "llama_1b", "galore_randomized",
     "peak", 1.0),
    ("FSDP: per-device step peak vs AdamW, GaLore exact SVD", "llama_1b", "galore", "peak", 1.0),
)


def fsdp_targets(rows: list[dict]) -> list[dict]:
    """The FSDP targets from the FSDP rows (rows missing from the run are skipped)."""
    by = {(r["model"], r["optimizer"]): r for r in rows if r.get("variant") == "fsdp"}
    out = []
    for label, model, name, kind, bound in FSDP_TARGETS:
        row = by.get((model, name))
        if row is None or (kind == "peak" and (model, "adamw") not in by):
            continue
        value = (row["allgather_bytes_refresh"] / row["projected_grad_bytes"] if kind == "gather"
                 else row["peak_bytes"] / by[(model, "adamw")]["peak_bytes"])
        out.append(dict(target=f"{label} ({model}, {row['devices']} devices)", measured=value,
                        bound=bound, met=bool(value <= bound)))
    return out


def run_fsdp(config: ml_collections.ConfigDict) -> list[dict]:
    """Every FSDP row of ``config``: measured here when this process has ``fsdp_devices``
    devices, else in a child process started with
    ``XLA_FLAGS=--xla_force_host_platform_device_count=<fsdp_devices>`` (CPU)."""
    import jax

    if not config.fsdp_optimizers or not config.fsdp_models:
        return []
    if len(jax.devices()) >= config.fsdp_devices:
        rows = []
        for model_name in config.fsdp_models:
            for name in config.fsdp_optimizers:
                row = measure_fsdp(config, model_name, name)
                log.info("FSDP x%d %s %s: peak %.2f GiB per device, refresh all-gather %.3f GiB"
                         " (projected gradients %.2f GiB), compile %.0f s", row["devices"],
                         model_name, name, row["peak_bytes"] / GiB,
                         row["allgather_bytes_refresh"] / GiB,
                         row["projected_grad_bytes"] / GiB, row["compile_s"])
                rows.append(row)
        return rows
    import json
    import os
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cfg, out = os.path.join(tmp, "config.json"), os.path.join(tmp, "rows.json")
        with open(cfg, "w") as f:
            f.write(config.to_json())
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={config.fsdp_devices}")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, "-m", "experiments.bench_memory", cfg, out],
                              cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"FSDP child process failed ({proc.returncode}):\n"
                               f"{proc.stderr[-3000:]}")
        with open(out) as f:
            return json.load(f)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    rows = []
    for model_name in config.models:
        for name in config.optimizers:
            row = measure(config, model_name, name)
            log.info("%s %s: peak %.2f GiB (params %.2f, state %.2f GiB), compile %.0f s",
                     model_name, name, row["peak_bytes"] / GiB, row["param_bytes"] / GiB,
                     row["state_bytes"] / GiB, row["compile_s"])
            rows.append(row)
    adamw = {r["model"]: r["peak_bytes"] for r in rows if r["optimizer"] == "adamw"}
    for r in rows:
        if r["model"] in adamw:
            r["vs_adamw"] = r["peak_bytes"] / adamw[r["model"]]
    checks = targets(rows)
    fsdp = run_fsdp(config)
    fsdp_adamw = {r["model"]: r["peak_bytes"] for r in fsdp if r["optimizer"] == "adamw"}
    for r in fsdp:
        if r["model"] in fsdp_adamw:
            r["vs_adamw"] = r["peak_bytes"] / fsdp_adamw[r["model"]]
    checks += fsdp_targets(fsdp)
    rows += fsdp
    import jax

    summary = {"experiment": "bench_memory", "device": jax.devices()[0].device_kind,
               "rows": rows, "targets": checks}
    common.write_summary(workdir, summary)
    table = [dict(model=r["model"], optimizer=r["optimizer"], variant=r["variant"],
                  state_dtype=r["state_dtype"], params_GiB=r["param_bytes"] / GiB,
                  state_GiB=r["state_bytes"] / GiB, peak_GiB=r["peak_bytes"] / GiB,
                  temp_GiB=r["temp_bytes"] / GiB, vs_adamw=r.get("vs_adamw", float("nan")),
                  compile_s=r["compile_s"]) for r in rows if r["variant"] != "fsdp"]
    common.write_table(workdir, "bench", table, title="Compiled train-step memory from shapes "
                       f"(batch {config.batch_size}x{config.seq_len}, {config.dtype})")
    if fsdp:
        common.write_table(workdir, "fsdp", [dict(
            model=r["model"], optimizer=r["optimizer"], devices=r["devices"],
            peak_GiB=r["peak_bytes"] / GiB, vs_adamw=r.get("vs_adamw", float("nan")),
            state_GiB=r["state_bytes"] / GiB, projected_grad_GiB=r["projected_grad_bytes"] / GiB,
            allgather_refresh_GiB=r["allgather_bytes_refresh"] / GiB,
            allgather_step_GiB=r["allgather_bytes_step"] / GiB,
            allreduce_refresh_GiB=r["allreduce_bytes_refresh"] / GiB,
            allreduce_step_GiB=r["allreduce_bytes_step"] / GiB,
            compile_s=r["compile_s"]) for r in fsdp], title="FSDP step per device (from shapes; "
            "refresh = what the refresh branches add to a step)")
    if checks:
        common.write_table(workdir, "targets", checks, title="Targets")
    return {"rows": len(rows), "targets": checks}


def _fsdp_child(config_json: str, out_json: str) -> None:
    """``python -m experiments.bench_memory CONFIG_JSON OUT_JSON``: the FSDP rows of a config
    (run by :func:`run_fsdp` with the fake-device XLA flag set)."""
    import json

    with open(config_json) as f:
        config = ml_collections.ConfigDict(json.load(f))
    rows = run_fsdp(config)
    with open(out_json, "w") as f:
        json.dump(rows, f)


if __name__ == "__main__":
    import sys

    logging.basicConfig(level=logging.INFO)
    _fsdp_child(*sys.argv[1:])
