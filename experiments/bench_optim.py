"""Benchmark: lrx.optim (GaLore, FRUGAL, Fira) vs optax.adamw and optax.contrib.galore.

For every parameter set (the shapes of an ``lrx.models.llama`` preset, projected leaves = the
attention and MLP kernels as in GaLore's recipe) and every optimizer, one run measures:

* ``update_ms``: best-of-``repeats`` wall time of the compiled ``update`` on a step without refresh
  (all optimizers compiled first, then timed round-robin so load changes hit them alike);
* ``refresh_ms``: the same on a refresh step (``count % update_proj_gap == 0``; the first call
  after compilation plus ``refresh_repeats - 1`` more); ``refresh_extra_ms`` = refresh - update,
  the cost of the projector computation itself;
* ``state_MB``: optimizer-state bytes for the whole model, and ``proj_state_MB`` for the projected
  matrices alone (the part the methods change);
* ``compiled_MB`` / ``temp_MB``: XLA's memory analysis of the compiled update (arguments + outputs
  + temporaries - aliased, and temporaries alone).

Optionally (``train_step.enabled``) a full train step (forward, backward and update) of real
models is timed on a non-refresh step, with its compiled memory. Outputs in the workdir:
``bench.md`` (tables), ``bench.json`` (rows), ``summary.json`` (rows and the target ratios).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import ml_collections

from experiments import common
from experiments.common import ConfigError

log = logging.getLogger("lrx.bench_optim")

OPTIMIZERS = ("adamw", "optax_galore", "galore_svd_std", "galore_svd_reverse_std",
              "galore_randomized_std", "galore_randomized_reverse_std", "frugal", "fira",
              "apollo", "apollo_mini")
MODELS = ("tiny", "llama_60m", "llama_130m", "llama_350m", "llama_1b")


def defaults() -> ml_collections.ConfigDict:
    """The config schema of ``bench_optim`` with the defaults (LLaMA-60M sets, minutes)."""
    c = ml_collections.ConfigDict()
    c.experiment = "bench_optim"
    c.seed = 0
    # Parameter sets: the shapes of lrx.models.llama presets (GaLore's llama_*.json); the
    # projected leaves are the attention and MLP kernels (GaLore's recipe).
    c.models = ("llama_60m",)
    # GaLore paper ranks per size (Table 2 / scripts).
    c.ranks = ml_collections.ConfigDict(dict(tiny=32, llama_60m=128, llama_130m=256,
                                             llama_350m=256, llama_1b=512))
    c.vocab_size = 32000
    c.num_layers = 0               # 0: the preset's depth; >0 truncates (smoke)
    c.update_proj_gap = 200
    c.optimizers = OPTIMIZERS
    c.repeats = 5                  # timed calls per measurement (fastest reported)
    c.refresh_repeats = 2           # the first call after compiling pays one-off costs
    c.oversample = 8               # randomized projector
    c.power_iters = 1
    c.density = 0.25               # frugal
    c.train_step = ml_collections.ConfigDict(dict(
        enabled=True, models=("tiny", "llama_60m"), batch_size=2, seq_len=64, repeats=3,
        optimizers=("adamw", "optax_galore", "galore_randomized_reverse_std", "frugal",
                    "fira", "apollo", "apollo_mini")))
    # Compiled peak memory of a full f32 train step (unrolled layers, remat) from shapes only.
    c.memory = ml_collections.ConfigDict(dict(
        enabled=True, models=("llama_1b",), batch_size=1, seq_len=256, remat=True,
        optimizers=("adamw", "optax_galore", "galore_svd_reverse_std", "fira_reverse_std",
                    "fira", "frugal", "apollo", "apollo_mini")))
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for unknown keys, models, optimizers or non-positive counts."""
    common.check_keys(config, defaults())
    common.check_models(config, MODELS)
    for o in config.optimizers:
        common.check_choice(o, OPTIMIZERS, "optimizers[...]")
    for o in config.memory.optimizers:
        common.check_choice(o, (*OPTIMIZERS, "fira_reverse_std"), "memory.optimizers[...]")
    for m in config.memory.models:
        common.check_choice(m, MODELS, "memory.models[...]")
    for o in config.train_step.optimizers:
        common.check_choice(o, OPTIMIZERS, "train_step.optimizers[...]")
    for m in config.train_step.models:
        common.check_choice(m, MODELS, "train_step.models[...]")
    for key in ("repeats", "refresh_repeats", "update_proj_gap", "vocab_size",
                "train_step.repeats", "train_step.batch_size", "train_step.seq_len"):
        value = config
        for part in key.split("."):
            value = value[part]
        common.check_positive(value, key)
    if not 0.0 < config.density <= 1.0:
        raise ConfigError(f"config.density={config.density} must be in (0, 1]")


def build_optimizer(name: str, c: ml_collections.ConfigDict, rank: int, mask: Any, params: Any):
    """The optax transformation called ``name`` (learning rate 1e-3; values do not matter for
    timing and memory)."""
    import jax
    import optax
    from optax.contrib import GaLoreDimensionNumbers
    from optax.contrib import galore as optax_galore

    import lrx.optim as lo

    lr, gap = 1e-3, c.update_proj_gap
    if name == "adamw":
        return optax.adamw(lr, eps=1e-6)
    if name == "optax_galore":
        dims = jax.tree_util.tree_map(lambda m: GaLoreDimensionNumbers() if m else None, mask)
        return optax_galore(lr, rank=rank, update_proj_gap=gap, scale=0.25,
                            weight_dimension_numbers=dims)
    if name.startswith("galore_"):
        _, projector, proj_type = name.split("_", 2)
        return lo.galore(lr, rank=rank, update_proj_gap=gap, proj_type=proj_type,
                         projector=projector, oversample=c.oversample,
                         power_iters=c.power_iters, mask=mask)
    if name == "frugal":
        return lo.frugal(lr, density=c.density, update_proj_gap=gap, mask=mask)
    if name == "fira":
        return lo.fira(lr, rank=rank, update_proj_gap=gap, mask=mask)
    if name == "fira_reverse_std":
        return lo.fira(lr, rank=rank, update_proj_gap=gap, mask=mask, proj_type="reverse_std")
    if name == "apollo":
        return lo.apollo(lr, rank=rank, update_proj_gap=gap, mask=mask)
    if name == "apollo_mini":
        return lo.apollo_mini(lr, update_proj_gap=gap, mask=mask)
    raise ConfigError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def _model(name: str, vocab_size: int, seq_len: int = 64, num_layers: int = 0):
    from lrx.models.llama import Llama, preset

    overrides = dict(vocab_size=256 if name == "tiny" else vocab_size,
                     max_len=max(seq_len, preset(name).max_len))
    if num_layers:
        overrides["num_layers"] = num_layers
    cfg = preset(name, **overrides)
    return Llama(cfg), cfg


def _best_ms(fn, args, repeats: int) -> tuple[float, Any]:
    """Fastest of ``repeats`` calls in ms (robust to other processes on a shared machine) and the
    last output."""
    import jax

    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return 1e3 * min(times), out


def _memory(compiled) -> tuple[float, float]:
    try:
        m = compiled.memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
                 - m.alias_size_in_bytes)
        return total / 2**20, m.temp_size_in_bytes / 2**20
    except Exception:  # noqa: BLE001 - backends without memory analysis
        return float("nan"), float("nan")


def _random_like(tree, seed: int, scale: float):
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    key = jax.random.PRNGKey(seed)
    out = [scale * jax.random.normal(jax.random.fold_in(key, i), x.shape, jnp.float32)
           for i, x in enumerate(leaves)]
    return treedef.unflatten(out)


def bench_updates(c: ml_collections.ConfigDict, model_name: str) -> list[dict]:
    """Rows of update timings and memory for one parameter set."""
    import jax
    import jax.numpy as jnp

    import lrx.optim as lo

    model, _ = _model(model_name, c.vocab_size, num_layers=c.num_layers)
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"],
                            jax.random.PRNGKey(0))
    params = _random_like(shapes, c.seed, 0.02)
    grads = _random_like(shapes, c.seed + 1, 1.0)
    mask = lo.path_mask(params, lo.ATTN_MLP)
    flat_mask = jax.tree_util.tree_leaves(mask)
    proj_params = [x for x, m in zip(jax.tree_util.tree_leaves(params), flat_mask, strict=True)
                   if m]
    proj_mask = [True] * len(proj_params)
    rank = c.ranks[model_name]
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    # Compile everything first, then time round-robin over the optimizers (best of the rounds),
    # so that load changes on a shared machine hit every optimizer alike.
    runs = {}
    for name in c.optimizers:
        opt = build_optimizer(name, c, rank, mask, params)
        state0 = opt.init(params)
        compiled = jax.jit(opt.update).lower(grads, state0, params).compile()
        runs[name] = dict(compiled=compiled, state0=state0, state1=None, refresh=[], update=[])
    for _ in range(c.refresh_repeats):          # count 0: a refresh step
        for r in runs.values():
            ms, (_, state1) = _best_ms(r["compiled"], (grads, r["state0"], params), 1)
            r["refresh"].append(ms)
            r["state1"] = state1                # count 1: not a refresh step
    for _ in range(c.repeats):
        for r in runs.values():
            r["update"].append(_best_ms(r["compiled"], (grads, r["state1"], params), 1)[0])
    rows = []
    for name, r in runs.items():
        update_ms, refresh_ms = min(r["update"]), min(r["refresh"])
        if name == "adamw":
            refresh_ms = update_ms
        compiled_mb, temp_mb = _memory(r["compiled"])
        proj_state = build_optimizer(name, c, rank, proj_mask, proj_params).init(proj_params)
        rows.append(dict(model=model_name, optimizer=name, params_M=n_params / 1e6,
                         update_ms=update_ms, refresh_ms=refresh_ms,
                         refresh_extra_ms=max(refresh_ms - update_ms, 0.0),
                         state_MB=lo.tree_bytes(r["state0"]) / 2**20,
                         proj_state_MB=lo.tree_bytes(proj_state) / 2**20,
                         compiled_MB=compiled_mb, temp_MB=temp_mb))
        log.info("%s %s: update %.1f ms, refresh %.1f ms, state %.1f MB", model_name, name,
                 update_ms, refresh_ms, rows[-1]["state_MB"])
    runs.clear()
    return rows


def bench_train_step(c: ml_collections.ConfigDict, model_name: str) -> list[dict]:
    """Rows of full train-step (forward + backward + update) timings on a non-refresh step."""
    import jax
    import jax.numpy as jnp
    import optax

    import lrx.optim as lo

    t = c.train_step
    model, cfg = _model(model_name, c.vocab_size, t.seq_len + 1, num_layers=c.num_layers)
    tokens = jax.random.randint(jax.random.PRNGKey(c.seed), (t.batch_size, t.seq_len + 1), 0,
                                cfg.vocab_size, jnp.int32)
    params = jax.jit(lambda k: model.init(k, tokens[:, :-1])["params"])(jax.random.PRNGKey(0))
    mask = lo.path_mask(params, lo.ATTN_MLP)
    rank = c.ranks[model_name]

    def loss_fn(p, batch):
        logits = model.apply({"params": p}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    runs = {}
    for name in t.optimizers:
        opt = build_optimizer(name, c, rank, mask, params)

        def step(p, s, batch, opt=opt):
            loss, g = jax.value_and_grad(loss_fn)(p, batch)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        state0 = opt.init(params)
        compiled = jax.jit(step).lower(params, state0, tokens).compile()
        p1, s1, _ = jax.block_until_ready(compiled(params, state0, tokens))   # refresh step
        runs[name] = dict(compiled=compiled, args=(p1, s1, tokens), times=[],
                          state_MB=lo.tree_bytes(state0) / 2**20)
        del state0
    for _ in range(t.repeats):                  # round-robin, best of the rounds
        for r in runs.values():
            r["times"].append(_best_ms(r["compiled"], r["args"], 1)[0])
    rows = []
    for name, r in runs.items():
        compiled_mb, temp_mb = _memory(r["compiled"])
        rows.append(dict(model=model_name, optimizer=name, batch=f"{t.batch_size}x{t.seq_len}",
                         step_ms=min(r["times"]), state_MB=r["state_MB"],
                         compiled_MB=compiled_mb, temp_MB=temp_mb))
        log.info("train step %s %s: %.1f ms", model_name, name, rows[-1]["step_ms"])
    runs.clear()
    base = {r["model"]: r["step_ms"] for r in rows if r["optimizer"] == "adamw"}
    for r in rows:
        if r["model"] in base:
            r["vs_adamw"] = r["step_ms"] / base[r["model"]]
    return rows


def bench_compiled_memory(c: ml_collections.ConfigDict, model_name: str) -> list[dict]:
    """Compiled peak memory of a full train step (forward + backward + update, the program that
    contains the refresh) from shapes only: ``jax.jit(step).lower(*jax.eval_shape(...))
    .compile().memory_analysis()``, nothing allocated. Peak = arguments + outputs + temporaries
    - aliased."""
    import jax
    import jax.numpy as jnp
    import optax

    import lrx.optim as lo
    from lrx.models.llama import Llama, preset

    m = c.memory
    cfg = preset(model_name, vocab_size=c.vocab_size, remat=m.remat, scan_layers=False,
                 max_len=max(m.seq_len, preset(model_name).max_len))
    model = Llama(cfg)
    tokens = jax.ShapeDtypeStruct((m.batch_size, m.seq_len + 1), jnp.int32)
    params = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 8), jnp.int32))["params"],
                            jax.random.PRNGKey(0))
    mask = lo.path_mask(params, lo.ATTN_MLP)
    rank = c.ranks[model_name]

    def loss_fn(p, batch):
        logits = model.apply({"params": p}, batch[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    rows = []
    for name in m.optimizers:
        opt = build_optimizer(name, c, rank, mask, params)

        def step(p, s, batch, opt=opt):
            loss, g = jax.value_and_grad(loss_fn)(p, batch)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        state = jax.eval_shape(opt.init, params)
        t0 = time.perf_counter()
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, tokens).compile()
        peak_mb, temp_mb = _memory(compiled)
        rows.append(dict(model=model_name, optimizer=name, batch=f"{m.batch_size}x{m.seq_len}",
                         state_MB=lo.tree_bytes(state) / 2**20, peak_GiB=peak_mb / 1024,
                         temp_GiB=temp_mb / 1024, compile_s=time.perf_counter() - t0))
        log.info("compiled memory %s %s: peak %.2f GiB", model_name, name, peak_mb / 1024)
        del compiled
    by = {r["optimizer"]: r for r in rows}
    for r in rows:
        if "adamw" in by:
            r["vs_adamw"] = r["peak_GiB"] / by["adamw"]["peak_GiB"]
        if "optax_galore" in by:
            r["vs_optax_galore"] = r["peak_GiB"] / by["optax_galore"]["peak_GiB"]
        if "galore_svd_reverse_std" in by:
            r["vs_lrx_galore"] = r["peak_GiB"] / by["galore_svd_reverse_std"]["peak_GiB"]
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """The issue's targets per parameter set, from the update rows."""
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        by = {r["optimizer"]: r for r in rows if r["model"] == model}
        if "optax_galore" not in by:
            continue
        ref = by["optax_galore"]

        def add(what, num, den, key, target, by=by, model=model):
            if num in by and den in by:
                value = by[num][key] / by[den][key]
                out.append(dict(model=model, ratio=what, value=value, target=f"<= {target}",
                                met=bool(value <= target)))

        add("galore svd std update / optax update", "galore_svd_std", "optax_galore",
            "update_ms", 1.0)
        add("galore svd reverse_std update / optax update", "galore_svd_reverse_std",
            "optax_galore", "update_ms", 1.0)
        add("galore randomized std refresh / optax refresh", "galore_randomized_std",
            "optax_galore", "refresh_ms", 0.2)
        add("galore randomized reverse_std refresh / optax refresh",
            "galore_randomized_reverse_std", "optax_galore", "refresh_ms", 0.2)
        add("galore svd reverse_std refresh / optax refresh", "galore_svd_reverse_std",
            "optax_galore", "refresh_ms", 1.0)
        add("randomized reverse_std refresh overhead / optax refresh overhead",
            "galore_randomized_reverse_std", "optax_galore", "refresh_extra_ms", 0.2)
        add("randomized std refresh overhead / optax refresh overhead",
            "galore_randomized_std", "optax_galore", "refresh_extra_ms", 0.2)
        add("state reverse_std / optax (whole model)", "galore_svd_reverse_std", "optax_galore",
            "state_MB", 1.0)
        add("state reverse_std / adamw (whole model)", "galore_svd_reverse_std", "adamw",
            "state_MB", 0.30)
        add("state reverse_std / adamw (projected matrices)", "galore_svd_reverse_std", "adamw",
            "proj_state_MB", 0.30)
        add("state std / adamw (projected matrices)", "galore_svd_std", "adamw",
            "proj_state_MB", 0.30)
        add("state apollo_mini / adamw (projected matrices)", "apollo_mini", "adamw",
            "proj_state_MB", 0.01)
        del ref
    return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Runs the benchmark; writes bench.md, bench.json, summary.json; returns the summary."""
    import jax

    t0 = time.perf_counter()
    from lrx.train.loop import limit_blas_threads

    # XLA:CPU runs SVD/QR/eigh through scipy's OpenBLAS LAPACK whose worker threads busy-wait: on
    # a shared CPU a 128x352 SVD took 0.3-7 s instead of ~8 ms unless BLAS is limited to 1 thread.
    pools = limit_blas_threads(1)
    blas = ",".join(sorted({str(p["num_threads"]) for p in pools})) or "unknown"
    rows, train_rows, memory_rows = [], [], []
    for model in config.models:
        rows += bench_updates(config, model)
    if config.train_step.enabled:
        for model in config.train_step.models:
            train_rows += bench_train_step(config, model)
    if config.memory.enabled:
        for model in config.memory.models:
            memory_rows += bench_compiled_memory(config, model)
    ratio_rows = ratios(rows)
    by_mem = {(r["model"], r["optimizer"]): r for r in memory_rows}
    for model in config.memory.models if config.memory.enabled else ():
        for what, num, den, target in [
                ("compiled peak step: lrx galore reverse_std / optax galore",
                 "galore_svd_reverse_std", "optax_galore", 1.0),
                ("compiled peak step: fira / lrx galore reverse_std", "fira_reverse_std",
                 "galore_svd_reverse_std", 1.05),
                ("compiled peak step: fira (std) / lrx galore reverse_std", "fira",
                 "galore_svd_reverse_std", 1.05)]:
            if (model, num) in by_mem and (model, den) in by_mem:
                value = by_mem[model, num]["peak_GiB"] / by_mem[model, den]["peak_GiB"]
                ratio_rows.append(dict(model=model, ratio=what, value=value,
                                       target=f"<= {target}", met=bool(value <= target)))
    device = (f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), "
              f"{os.cpu_count()} CPU cores visible, BLAS threads {blas} (threadpoolctl)")
    text = common.write_table(workdir, "bench", rows, title=f"Optimizer update ({device})")
    if train_rows:
        text += "\n## Train step (forward + backward + update, non-refresh step)\n\n"
        text += common.markdown_table(train_rows)
    if memory_rows:
        text += "\n## Compiled peak memory of a full train step (shapes only)\n\n"
        text += common.markdown_table(memory_rows)
    if ratio_rows:
        text += "\n## Targets\n\n" + common.markdown_table(ratio_rows)
    with open(f"{workdir}/bench.md", "w") as f:
        f.write(text)
    common.write_json(f"{workdir}/bench.json", dict(updates=rows, train_step=train_rows,
                                                    memory=memory_rows, ratios=ratio_rows,
                                                    device=device))
    for r in ratio_rows:
        print(f"{r['model']}: {r['ratio']} = {r['value']:.3f} (target {r['target']}, "
              f"{'met' if r['met'] else 'NOT met'})")
    summary = dict(device=device, updates=rows, train_step=train_rows, memory=memory_rows,
                   ratios=ratio_rows,
                   wall_s=time.perf_counter() - t0)
    common.write_summary(workdir, summary)
    return summary
