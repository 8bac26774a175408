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
    c.dtype = "bfloat16"           # parameters and compute
    c.update_proj_gap = 200
    c.density = 0.25               # FRUGAL
    c.block_size = 2048            # 8-bit states (arXiv 2110.02861)
    c.num_layers = 0               # 0: the preset's depth (>0 truncates: smoke tests)
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    common.check_keys(config, defaults())
    common.check_models(config, MODELS, ("ranks", "apollo_ranks"))
    for o in config.optimizers:
        common.check_choice(o, tuple(ROWS), "optimizers[...]")
    common.check_choice(config.dtype, ("float32", "bfloat16"), "dtype")
    common.check_choice(config.proj_type, ("std", "reverse_std", "left", "right"), "proj_type")
    for key in ("vocab_size", "batch_size", "seq_len", "update_proj_gap", "block_size"):
        common.check_positive(config[key], key)
    common.check_positive(config.num_layers, "num_layers", allow_zero=True)
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
    if name == "galore":
        return lo.galore(lr, **galore_kw)
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


def measure(c: ml_collections.ConfigDict, model_name: str, name: str, *,
            compile: bool = True) -> dict:
    """One row: compile the train step of ``name`` for ``model_name`` from shapes
    (``compile=False``: parameter and state bytes only)."""
    import jax
    import jax.numpy as jnp
    import optax

    from lrx.models.llama import Llama, preset
    from lrx.train import loop, per_layer

    variant, state_dtype = ROWS[name]
    overrides = dict(vocab_size=c.vocab_size, dtype=c.dtype, param_dtype=c.dtype,
                     max_len=max(c.seq_len, preset(model_name).max_len),
                     scan_layers=variant != "ordinary_unrolled", remat=True)
    if c.num_layers:
        overrides["num_layers"] = c.num_layers
    cfg = preset(model_name, **overrides)
    model = Llama(cfg)
    params = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"],
                            jax.random.key(0))
    opt = build_optimizer(name, c, model_name, params)
    batch = jax.ShapeDtypeStruct((1, c.batch_size, c.seq_len + 1), jnp.int32)
    if variant == "per_layer":
        pl = per_layer.make_per_layer_step(*per_layer.llama_pieces(cfg), opt)
        init, step = pl.init, pl.step
    else:
        def loss_fn(p, fz, b, rng):  # noqa: ARG001
            logits = model.apply({"params": p}, b[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, b[:, 1:]).mean(), {}

        init, step = opt.init, loop.make_step(loss_fn, opt)
    state = jax.eval_shape(lambda p: loop.TrainState(
        step=jnp.zeros((), jnp.int32), params=p, frozen={}, opt_state=init(p),
        rng=jax.random.key_data(jax.random.key(0))), params)
    row = dict(model=model_name, optimizer=name, variant=variant,
               per_layer=variant == "per_layer", state_dtype=state_dtype,
               batch=f"{c.batch_size}x{c.seq_len}", param_bytes=loop.tree_bytes(params),
               state_bytes=loop.tree_bytes(state.opt_state))
    if compile:
        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=0).lower(state, batch).compile()
        row.update(_memory(compiled), compile_s=time.perf_counter() - t0)
        del compiled
        gc.collect()
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
    """The issue's targets from the measured rows (rows missing from the run are skipped)."""
    by = {(r["model"], r["optimizer"]): r for r in rows}
    out = []
    for label, model, num, den, bound in TARGETS:
        if (model, num) not in by or (den and (model, den) not in by):
            continue
        value = by[(model, num)]["peak_bytes"] / (by[(model, den)]["peak_bytes"] if den else GiB)
        out.append(dict(target=label, measured=value, bound=bound, met=bool(value <= bound)))
    return out


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
    import jax

    summary = {"experiment": "bench_memory", "device": jax.devices()[0].device_kind,
               "rows": rows, "targets": checks}
    common.write_summary(workdir, summary)
    table = [dict(model=r["model"], optimizer=r["optimizer"], variant=r["variant"],
                  state_dtype=r["state_dtype"], params_GiB=r["param_bytes"] / GiB,
                  state_GiB=r["state_bytes"] / GiB, peak_GiB=r["peak_bytes"] / GiB,
                  temp_GiB=r["temp_bytes"] / GiB, vs_adamw=r.get("vs_adamw", float("nan")),
                  compile_s=r["compile_s"]) for r in rows]
    common.write_table(workdir, "bench", table, title="Compiled train-step memory from shapes "
                       f"(batch {config.batch_size}x{config.seq_len}, {config.dtype})")
    if checks:
        common.write_table(workdir, "targets", checks, title="Targets")
    return {"rows": len(rows), "targets": checks}
