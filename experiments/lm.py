"""Language-model pretraining: a LLaMA-style decoder on a byte-level corpus with any lrx optimizer
(AdamW, GaLore, FRUGAL, Fira) and any lrx parameterization, through the shared training loop.

The config schema is :func:`defaults`; config files start from it (``configs/adamw.py``,
``configs/galore.py``, ...). ``config.sweep`` (``--config.sweep.lr='(1e-3,3e-3,1e-2)'``,
``--config.sweep.seeds=3``) trains the lr x seed grid as one vmapped program
(:mod:`lrx.train.sweep`): ``metrics.jsonl`` rows carry each replica's ``peak_lr`` and ``seed``
and ``summary.json`` a ``replicas`` list (its top-level eval loss is the best replica's).
Outputs in the workdir: ``checkpoints/``, ``metrics.jsonl``,
``summary.json``, ``summary.md`` and ``loss.png``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable
from typing import Any

import ml_collections

from experiments import common
from experiments.common import ConfigError
from lrx.paths import ATTN_MLP

PRESET_NAMES = ("tiny", "llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b")
OPTIMIZERS = ("adamw", "galore", "frugal", "fira", "apollo")
SOURCES = ("shakespeare", "text_files", "hf")
DTYPES = ("float32", "bfloat16")
ANALYSIS_TARGETS = ("grads", "params")
# GaLore's recipe projects the attention and MLP matrices only; embeddings, LM head and norms get
# the same Adam unprojected.
PROJECT_ATTN_MLP = ATTN_MLP  # one regex for the recipe: lrx.paths.ATTN_MLP
log = logging.getLogger("lrx.lm")


def optimizer_defaults(name: str) -> ml_collections.ConfigDict:
    """The optimizer section for ``name`` (its valid keys and defaults)."""
    c = ml_collections.ConfigDict()
    c.name = name
    c.learning_rate = 3e-3
    c.warmup_steps = 50            # linear warmup from 0, then cosine decay ...
    c.min_lr_ratio = 0.1           # ... to 10% of the peak (the GaLore recipe)
    c.b1 = 0.9
    c.b2 = 0.999
    c.eps = 1e-6                   # GaLore/transformers AdamW default
    c.weight_decay = 0.0
    c.grad_clip = 1.0              # global-norm clipping; 0 disables
    if name == "adamw":
        return c
    c.project = PROJECT_ATTN_MLP   # regex over parameter paths of the projected matrices
    c.update_proj_gap = 200
    if name in ("galore", "fira"):
        c.rank = 128
        c.scale = 0.25
        c.proj_type = "std"
        c.projector = "svd"
    if name == "galore":
        c.moments = "keep"
    if name == "fira":
        c.gamma = 1.01
        c.residual = "official"
    if name == "frugal":
        c.density = 0.25
        c.subspace = "svd"
        c.state_free = "signsgd"
        c.state_free_lr_scale = 1.0
        c.reset_on_refresh = True
        c.block_order = "random"   # subspace='blocks': which matrices are state-full first
    if name == "apollo":           # the official pre-training scripts' APOLLO (arXiv 2412.05270)
        c.rank = 256
        c.scale = 1.0              # APOLLO-Mini: rank 1, scale_type 'tensor', scale 128
        c.scale_type = "channel"
        c.proj_type = "std"
        c.gamma = 1.01
    return c


def defaults() -> ml_collections.ConfigDict:
    """The full config schema of the ``lm`` experiment with CPU-friendly defaults."""
    c = ml_collections.ConfigDict()
    c.experiment = "lm"
    c.seed = 0
    c.model = ml_collections.ConfigDict(dict(
        preset="tiny", dtype="float32", param_dtype="float32", scan_layers=False, remat=False,
        vocab_size=0))  # 0: the corpus' vocabulary (256 bytes); 32000 = the papers' T5 tokenizer
    c.data = ml_collections.ConfigDict(dict(
        source="shakespeare", val_plays=("macbeth", "twelfth-night", "richard-ii"),
        paths="", val_paths="", hf_name="", hf_config="", hf_text_field="text",
        hf_train_bytes=100_000_000, hf_val_bytes=10_000_000, seq_len=128, seed=0))
    c.optimizer = optimizer_defaults("adamw")
    c.train = ml_collections.ConfigDict(dict(
        steps=600, batch_size=16, micro_batches=1, log_every=20, eval_every=100,
        eval_windows=64, checkpoint_every=200, keep_checkpoints=3,
        stop_at=0,  # stop_at > 0: checkpoint and exit after that step (resume later)
        # resume=False: move an existing run in the workdir aside (<workdir>.old-<time>), start over
        resume=True,
        stop_grace_seconds=60.0,  # after SIGTERM/SIGINT: wait this long for a step boundary
        # per_layer=True: each layer is updated inside the backward pass (lrx.train.per_layer;
        # needs model.scan_layers and dense params; grad_clip clips per layer; micro-batches
        # accumulate layer-major)
        per_layer=False))
    c.mesh = ml_collections.ConfigDict(dict(data=0, fsdp=1))
    c.multihost = False
    # Weight parameterization (lrx.param) of the matrices matching `include`: 'none' keeps every
    # weight dense; otherwise a factory of lrx.param ('lowrank', 'lora', 'dora', 'sltrain', 'nola',
    # 'randlora', 'vera'). alpha=0 and init='' mean the method's default. relora_every=K > 0 (LoRA
    # only) merges the adapters into the base every K steps, re-initialises them, zeroes their
    # optimizer moments and re-warms the learning rate over relora_warmup steps (ReLoRA).
    c.param = ml_collections.ConfigDict(dict(
        method="none", include=PROJECT_ATTN_MLP, rank=32, alpha=0.0, rslora=False, init="",
        density=0.03, num_basis_a=1024, num_basis_b=1024, relora_every=0, relora_warmup=50,
        sora_threshold=3e-4))  # SoRA's proximal xi (the official scripts' sparse_lambda_2)
    # Spectral diagnostics every `every` steps (0 = off, no cost): metrics of lrx.analysis for the
    # gradients and/or weights of the matrices matching `paths` (energy_rank = r of top_r_energy),
    # logged to metrics.jsonl.
    c.analysis = ml_collections.ConfigDict(dict(
        every=0, metrics=("effective_rank", "stable_rank", "top_r_energy"),
        targets=("grads", "params"), paths=PROJECT_ATTN_MLP, energy_rank=8))
    # A sweep in one compiled program (lrx.train.sweep): replicas for every (lr, seed) of the grid
    # sweep.lr x (seed, seed + 1, ..., seed + sweep.seeds - 1), trained as one vmapped step.
    # sweep.lr=() (the default) is optimizer.learning_rate alone; a seed changes the model and
    # parameterization init and the step's PRNG key (the data stream is data.seed, shared).
    c.sweep = ml_collections.ConfigDict(dict(lr=(), seeds=1))
    return c


def switch_optimizer(config: ml_collections.ConfigDict, name: str) -> None:
    """``--config.optimizer.name=NAME`` on the command line: the optimizer section becomes
    NAME's own defaults (:func:`optimizer_defaults`), so NAME's keys are accepted and no key of
    the previous optimizer is left behind."""
    common.check_choice(name, OPTIMIZERS, "optimizer.name")
    with config.unlocked():
        config.optimizer = optimizer_defaults(name)


def section_hint(key: str) -> str:
    """For run.py's unknown-key message: ' (KEY is a key of galore, fira: add
    --config.optimizer.name=galore.)' when an optimizer key belongs to other optimizers."""
    section, _, leaf = key.partition(".")
    owners = [n for n in OPTIMIZERS if leaf in optimizer_defaults(n)] if section == "optimizer" \
        else []
    if not owners or "." in leaf:
        return ""
    return (f" ('{leaf}' is a key of {', '.join(owners)}: add --config.optimizer.name={owners[0]}"
            ", which brings its defaults.)")


# run.py: a command-line value of these keys rebuilds their section before the section's other
# overrides are applied (key -> function(config, value)).
SECTION_SWITCHES = {"optimizer.name": switch_optimizer}
RESUME_KEYS = common.RESUME_KEYS


def _schema() -> ml_collections.ConfigDict:
    schema = defaults()
    union: dict[str, Any] = {}
    for name in OPTIMIZERS:
        union.update(optimizer_defaults(name).to_dict())
    schema.optimizer = ml_collections.ConfigDict(union)
    return schema


def inactive_sections(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Sections a bare config-argument key (``rank=64``) does not mean: ``param.`` while no
    parameterization is chosen (for :func:`experiments.common.apply_arg`)."""
    return ("param.",) if config.get("param", {}).get("method", "none") == "none" else ()


def _flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _merged(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``defaults()`` (with the chosen optimizer's section) updated by ``config``."""
    full = defaults()
    full.optimizer = optimizer_defaults(config.optimizer.get("name", "adamw"))
    full.unlock()
    for key, value in _flatten(config).items():
        path = key.split(".")
        node = full
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    return full


_initialized_distributed = False


def _maybe_init_distributed(config) -> None:
    global _initialized_distributed
    if config.get("multihost", False) and not _initialized_distributed:
        import jax

        jax.distributed.initialize()
        _initialized_distributed = True


def validate(config: ml_collections.ConfigDict) -> None:
    """Fails fast, before any compilation, on unknown keys, wrong types and impossible values."""
    common.check_keys(config, _schema())
    name = config.optimizer.get("name", "adamw")
    common.check_choice(name, OPTIMIZERS, "optimizer.name")
    try:
        common.check_keys(config.optimizer, optimizer_defaults(name), prefix="optimizer.")
    except ConfigError as e:
        unknown = [k for k in config.optimizer if k not in optimizer_defaults(name)]
        owners = [n for n in OPTIMIZERS if unknown and unknown[0] in optimizer_defaults(n)]
        if owners:
            raise ConfigError(f"{e} ('{unknown[0]}' is a key of {', '.join(owners)}: switch with "
                              f"--config.optimizer.name={owners[0]}, which brings its defaults.)"
                              ) from None
        raise
    c = _merged(config)
    _check_finite(c)
    common.check_choice(c.model.preset, PRESET_NAMES, "model.preset")
    common.check_choice(c.model.dtype, DTYPES, "model.dtype")
    common.check_choice(c.model.param_dtype, DTYPES, "model.param_dtype")
    common.check_choice(c.data.source, SOURCES, "data.source")
    if c.data.source == "shakespeare":
        from lrx.data.text import shakespeare_plays

        plays = shakespeare_plays()
        for play in c.data.val_plays:
            common.check_choice(play, list(plays), "data.val_plays[...]")
    if c.data.source == "text_files" and not (c.data.paths and c.data.val_paths):
        raise ConfigError("data.source='text_files' needs data.paths and data.val_paths (globs)")
    if c.data.source == "text_files":
        from lrx.data import text

        common.check_positive(c.data.seq_len, "data.seq_len")
        try:
            text.text_files(c.data.paths, c.data.val_paths, min_bytes=c.data.seq_len + 1)
        except ValueError as e:
            raise ConfigError(f"config.{e}") from None
    if c.data.source == "hf" and not c.data.hf_name:
        raise ConfigError("data.source='hf' needs data.hf_name (e.g. 'allenai/c4')")
    for key in ("data.seq_len", "train.steps", "train.batch_size", "train.micro_batches",
                "train.log_every", "train.eval_windows", "train.keep_checkpoints",
                "optimizer.learning_rate"):
        section, leaf = key.split(".")
        common.check_positive(c[section][leaf], key)
    for key in ("train.eval_every", "train.checkpoint_every", "optimizer.warmup_steps",
                "optimizer.weight_decay", "optimizer.grad_clip", "optimizer.eps",
                "train.stop_at"):
        section, leaf = key.split(".")
        common.check_positive(c[section][leaf], key, allow_zero=True)
    common.check_positive(c.train.stop_grace_seconds, "train.stop_grace_seconds")
    if c.model.vocab_size and c.model.vocab_size < 256:
        raise ConfigError(f"model.vocab_size={c.model.vocab_size}: use 0 (the corpus' 256 "
                          "bytes) or a vocabulary >= 256 (32000 as the papers)")
    _check_optimizer_values(c.optimizer)
    from lrx.models.llama import PRESETS

    if c.data.seq_len > PRESETS[c.model.preset].max_len:
        raise ConfigError(f"data.seq_len={c.data.seq_len} exceeds model preset "
                          f"{c.model.preset!r}'s max_len={PRESETS[c.model.preset].max_len}")
    if c.optimizer.name != "adamw":
        try:
            re.compile(c.optimizer.project)
        except re.error as e:
            raise ConfigError(f"optimizer.project={c.optimizer.project!r} is not a regex: {e}"
                              ) from None
        optimizer_transform(c.optimizer, lambda step: 0.0, mask=None)  # checks kwargs
    if c.train.batch_size % c.train.micro_batches:
        raise ConfigError(f"train.batch_size={c.train.batch_size} is not divisible by "
                          f"train.micro_batches={c.train.micro_batches}")
    if not c.multihost:  # multi-host: the devices are known after jax.distributed (run time)
        import jax

        check_mesh(c, jax.device_count())
    if c.train.per_layer:
        _check_per_layer(c)
    _check_sweep(c)
    if c.param.method != "none":
        param_factory(c.param)  # raises ConfigError naming the valid methods / arguments
        if c.model.scan_layers:
            raise ConfigError("param.method needs 2-D kernels: model.scan_layers=True stacks them "
                              "to (layers, m, n); set model.scan_layers=False")
        if c.param.relora_every and c.param.method != "lora":
            raise ConfigError("param.relora_every > 0 (ReLoRA) needs param.method='lora', got "
                              f"{c.param.method!r}")
        common.check_positive(c.param.relora_every, "param.relora_every", allow_zero=True)
    if c.analysis.every:
        from lrx.analysis import METRICS

        for metric in c.analysis.metrics:
            common.check_choice(metric, METRICS, "analysis.metrics[...]")
        for target in c.analysis.targets:
            common.check_choice(target, ANALYSIS_TARGETS, "analysis.targets[...]")
        common.check_positive(c.analysis.energy_rank, "analysis.energy_rank")
    _check_projection(c)


def check_mesh(c: ml_collections.ConfigDict, num_devices: int) -> int:
    """The data-parallel size (mesh ``data x fsdp``) of config ``c`` over ``num_devices``
    devices, without building a mesh; raises ConfigError when the mesh does not fit the devices
    or the micro-batch or eval windows do not split over it."""
    data, fsdp = c.mesh.data, c.mesh.fsdp
    if fsdp <= 0 or data < 0:
        raise ConfigError(f"config.mesh: mesh.fsdp must be >= 1 and mesh.data >= 0 (0 = all "
                          f"remaining devices), got data={data}, fsdp={fsdp}")
    if data == 0 and num_devices % fsdp:
        raise ConfigError(f"config.mesh: mesh.fsdp={fsdp} does not divide the {num_devices} "
                          "available devices")
    data = data or num_devices // fsdp
    if data * fsdp != num_devices:
        raise ConfigError(f"config.mesh: mesh data={data} x fsdp={fsdp} = {data * fsdp} devices, "
                          f"but {num_devices} are available; set mesh.data=0 to use all")
    dp = data * fsdp
    micro = c.train.batch_size // c.train.micro_batches
    if micro % dp:
        raise ConfigError(f"the micro-batch of {micro} sequences (train.batch_size / "
                          f"train.micro_batches) is not divisible by the data-parallel size {dp} "
                          f"(mesh data x fsdp over {num_devices} devices)")
    if c.train.eval_windows % dp:
        raise ConfigError(f"train.eval_windows={c.train.eval_windows} is not divisible by the "
                          f"data-parallel size {dp}")
    return dp


def _check_per_layer(c: ml_collections.ConfigDict) -> None:
    """``train.per_layer=True`` needs a scanned stack, dense parameters and an optimizer whose
    update of one layer does not read another (lrx.train.per_layer; micro-batches accumulate
    layer-major there)."""
    from lrx.train.per_layer import check_separable

    needs = []
    if not c.model.scan_layers:
        needs.append("model.scan_layers=True (per-layer updates walk the stacked layers)")
    if c.param.method != "none":
        needs.append(f"param.method='none' (got {c.param.method!r})")
    if needs:
        raise ConfigError("train.per_layer=True needs " + " and ".join(needs))
    try:
        check_separable(c.optimizer.name, c.optimizer.to_dict())
    except ValueError as e:
        raise ConfigError(f"train.per_layer=True: {e}") from None


def sweep_grid(c: ml_collections.ConfigDict) -> list[dict] | None:
    """The replicas of the config's sweep, ``[{'peak_lr': lr, 'seed': seed}, ...]`` (lr-major),
    or None when the config is a single run (``sweep.lr=()`` and ``sweep.seeds=1``)."""
    sweep = c.get("sweep", {})
    lrs, seeds = tuple(sweep.get("lr", ())), int(sweep.get("seeds", 1))
    if not lrs and seeds == 1:
        return None
    lrs = tuple(float(lr) for lr in lrs) or (float(c.optimizer.learning_rate),)
    return [{"peak_lr": lr, "seed": int(c.seed) + i} for lr in lrs for i in range(seeds)]


def _check_sweep(c: ml_collections.ConfigDict) -> None:
    """``sweep.lr`` holds numbers > 0, ``sweep.seeds`` >= 1, and the run has no part a sweep
    does not vmap (per-layer updates, spectral-analysis hooks)."""
    lrs, seeds = c.sweep.lr, c.sweep.seeds
    if not isinstance(lrs, (tuple, list)):
        raise ConfigError(f"config.sweep.lr={lrs!r} must be a tuple of learning rates, e.g. "
                          "--config.sweep.lr='(1e-3,3e-3,1e-2)' or sweep.lr=1e-3+3e-3")
    for lr in lrs:
        try:
            value = float(lr)
        except (TypeError, ValueError):
            raise ConfigError(f"config.sweep.lr: {lr!r} is not a number (sweep.lr={tuple(lrs)!r})"
                              ) from None
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"config.sweep.lr: every learning rate must be a finite number "
                              f"> 0, got {lr!r} in {tuple(lrs)!r}")
    if len(set(float(x) for x in lrs)) != len(lrs):
        raise ConfigError(f"config.sweep.lr={tuple(lrs)!r} repeats a learning rate")
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ConfigError(f"config.sweep.seeds={seeds!r} must be an integer >= 1 (the number of "
                          "seeds per learning rate; 1 = config.seed alone)")
    if sweep_grid(c) is None:
        return
    if c.train.per_layer:
        raise ConfigError("config.sweep (lr or seeds) does not combine with train.per_layer=True "
                          "(the per-layer step is not vmapped); drop one of them")
    if c.analysis.every:
        raise ConfigError("config.sweep (lr or seeds) does not combine with analysis.every > 0 "
                          "(spectral hooks read one replica); set analysis.every=0")


def _check_finite(c: ml_collections.ConfigDict) -> None:
    """NaN or infinity anywhere in the config is a mistake (e.g. ``optimizer.scale=nan``)."""
    defaults_ = common.flatten(_schema())
    if c.optimizer.get("name") in OPTIMIZERS:  # this optimizer's own defaults, not the union's
        defaults_.update({f"optimizer.{k}": v for k, v in
                          optimizer_defaults(c.optimizer.name).to_dict().items()})
    for key, value in common.flatten(c).items():
        if isinstance(value, float) and not math.isfinite(value):
            default = defaults_.get(key)
            raise ConfigError(f"config.{key}={value} must be a finite number"
                              + (f" (default {default!r})." if default is not None else "."))


def _check_optimizer_values(o: ml_collections.ConfigDict) -> None:
    """Ranges of the optimizer hyperparameters (only the keys the optimizer has)."""
    positive = ("learning_rate", "scale", "gamma", "rank", "update_proj_gap")
    for key in positive:
        if key in o:
            common.check_positive(o[key], f"optimizer.{key}")
    if "rank" in o and not isinstance(o.rank, int):
        raise ConfigError(f"config.optimizer.rank={o.rank!r} must be an integer > 0.")
    if "state_free_lr_scale" in o:
        common.check_positive(o.state_free_lr_scale, "optimizer.state_free_lr_scale",
                              allow_zero=True)
    ranges = {"b1": (0.0, 1.0, "0 <= b1 < 1"), "b2": (0.0, 1.0, "0 <= b2 < 1")}
    for key, (lo, hi, text) in ranges.items():
        if key in o and not lo <= o[key] < hi:
            raise ConfigError(f"config.optimizer.{key}={o[key]!r} must satisfy {text}.")
    if "density" in o and not 0.0 < o.density <= 1.0:
        raise ConfigError(f"config.optimizer.density={o.density!r} must satisfy "
                          "0 < density <= 1 (the fraction of each matrix updated by Adam).")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"config.optimizer.min_lr_ratio={o.min_lr_ratio!r} must satisfy "
                          "0 <= min_lr_ratio <= 1.")


_warned: set[str] = set()


def _check_projection(c: ml_collections.ConfigDict) -> None:
    """The projected matrices of the model (``optimizer.project``) exist, and ``optimizer.rank``
    reduces them: a rank >= a matrix's smaller dimension keeps full-rank moments for it (more
    state than AdamW). Warns once naming such matrices; an error when none is reduced."""
    if c.optimizer.name == "adamw" or c.param.method != "none":
        return
    import jax
    import jax.numpy as jnp

    from lrx.data import text

    model, _ = build_model(c, text.VOCAB_SIZE)
    shapes = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((1, c.data.seq_len), jnp.int32))["params"])
    pattern = re.compile(c.optimizer.project)
    projected = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]:
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if len(leaf.shape) >= 2 and pattern.fullmatch(name):
            projected[name] = tuple(leaf.shape)
    if not projected:
        raise ConfigError(f"optimizer.project={c.optimizer.project!r} matches no matrix; "
                          "parameter paths look like 'layers_0/attn/q/kernel'")
    if "rank" not in c.optimizer:
        return
    error, warning = rank_report(c.optimizer.rank, projected, c.optimizer.name)
    if error:
        raise ConfigError(error)
    if warning and warning not in _warned:
        _warned.add(warning)
        log.warning("%s", warning)


def rank_report(rank: int, projected: dict[str, tuple[int, ...]],
                optimizer: str = "galore") -> tuple[str | None, str | None]:
    """``(error, warning)`` for a projection rank over the projected matrices ``{path: shape}``
    (the matrix is the last two axes): a warning naming the matrices whose smaller dimension is
    <= ``rank`` (they keep full-rank state), an error when that is every matrix."""
    full = {n: s for n, s in projected.items() if rank >= min(s[-2:])}
    if not full:
        return None, None
    smallest = min(min(s[-2:]) for s in projected.values())
    names = ", ".join(f"{n} {'x'.join(map(str, s[-2:]))}" for n, s in list(full.items())[:4])
    names += f" (and {len(full) - 4} more)" if len(full) > 4 else ""
    if len(full) == len(projected):
        error = (f"config.optimizer.rank={rank} is >= the smaller dimension of every projected "
                 f"matrix ({names}): {optimizer} would keep full-rank state (more than AdamW). "
                 f"Choose --config.optimizer.rank below {smallest}, or optimizer.name='adamw'.")
        return error, None
    return None, (f"optimizer.rank={rank} does not reduce {len(full)} of the {len(projected)} "
                  f"projected matrices ({names}): they keep full-rank optimizer state; choose "
                  f"optimizer.rank below {smallest} to reduce all")


# lrx.param methods the builder supports for training from a config (LoRA's PiSSA / OLoRA inits
# through param.init, rsLoRA through param.rslora). LoRA-GA, EVA and LoRA-SB initialise from data
# statistics of a trained base: they are in the fine-tuning study (configs/finetune_table.py).
PARAM_METHODS = ("none", "lowrank", "lora", "dora", "sltrain", "nola", "randlora", "vera", "sora",
                 "dylora")
DATA_INIT_METHODS = ("lora_ga", "eva", "lora_sb")


def param_factory(p: ml_collections.ConfigDict):
    """The lrx.param factory for the param section (only the arguments the method takes)."""
    import inspect

    import lrx.param

    if p.method in DATA_INIT_METHODS:
        raise ConfigError(f"config.param.method={p.method!r} initialises from data statistics of "
                          "a trained base; use configs/finetune_table.py. Valid choices here: "
                          + ", ".join(map(repr, PARAM_METHODS)) + ".")
    common.check_choice(p.method, PARAM_METHODS, "param.method")
    candidates = {"rank": p.rank, "alpha": p.alpha or None, "rslora": p.rslora,
                  "init": p.init or None, "density": p.density, "num_basis_a": p.num_basis_a,
                  "num_basis_b": p.num_basis_b}
    accepted = inspect.signature(lrx.param.FACTORIES[p.method]).parameters
    kwargs = {k: v for k, v in candidates.items() if k in accepted and v is not None}
    try:
        return lrx.param.factory(p.method, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.param: {e}") from None


def adapter_mask(trainable: Any) -> Any:
    """A tree like ``trainable`` (the trainable part of :func:`lrx.param.partition`): True at the
    leaves inside factored nodes (the adapters), False at dense leaves (embeddings, norms, head)."""
    import jax

    import lrx.param

    return jax.tree.map(lambda x: jax.tree.map(lambda _: True, x) if lrx.param.is_node(x)
                        else False, trainable, is_leaf=lrx.param.is_node)


def reset_adapter_moments(opt_state: Any, trainable: Any) -> Any:
    """ReLoRA's optimizer reset: zeroes the adapters' entries of every optimizer-state subtree
    shaped like the trainable parameters (Adam's ``mu`` and ``nu``); the moments of the dense
    leaves (embeddings, norms, LM head), counters and any other state are returned unchanged.
    As the official code (Guitaricet/relora: the reset visits only the LoRA parameters'
    state), without its optional magnitude pruning."""
    import jax
    import jax.numpy as jnp

    structure = jax.tree.structure(trainable)
    mask = adapter_mask(trainable)
    shapes = [jnp.shape(x) for x in jax.tree.leaves(trainable)]

    def params_shaped(node: Any) -> bool:
        return (jax.tree.structure(node) == structure
                and [jnp.shape(x) for x in jax.tree.leaves(node)] == shapes)

    def reset(node: Any) -> Any:
        if params_shaped(node):
            return jax.tree.map(lambda x, m: jnp.zeros_like(x) if m else x, node, mask)
        return node

    return jax.tree.map(reset, opt_state, is_leaf=params_shaped)


def _relora_hook(p: ml_collections.ConfigDict, seed: int, replicas: list | None = None):
    """Every p.relora_every steps: merge LoRA adapters into the base, re-initialise them and zero
    the adapters' optimizer moments (:func:`reset_adapter_moments`; the dense leaves' moments and
    the counters are kept, so schedules continue). With ``replicas`` (a sweep) the restart is
    vmapped over the replica-stacked state, each replica re-initialising from its own seed."""
    import jax
    import jax.numpy as jnp

    import lrx.param

    def restart_one(state, step, replica_seed):
        full = lrx.param.combine(state.params, state.frozen)
        key = jax.random.fold_in(jax.random.key(replica_seed + 1), step)
        trainable, frozen = lrx.param.partition(lrx.param.merge_and_reinit(full, key))
        return state.replace(params=trainable, frozen=frozen,
                             opt_state=reset_adapter_moments(state.opt_state, trainable))

    if replicas is None:
        restart = jax.jit(lambda state, step: restart_one(state, step, seed))
    else:
        from lrx.train.sweep import replica_axes

        seeds = jnp.asarray([r["seed"] for r in replicas], jnp.uint32)

        @jax.jit
        def restart(state, step):
            axes = replica_axes(state)
            return jax.vmap(restart_one, in_axes=(axes, None, 0), out_axes=axes)(state, step,
                                                                                  seeds)

    def hook(step, state, batch):  # noqa: ARG001
        if step % p.relora_every:
            return state, None
        return restart(state, step), {"relora_restart": 1}

    return hook


def optimizer_transform(o: ml_collections.ConfigDict, schedule: Any, mask: Any):
    """The optax transformation for optimizer section ``o`` (AdamW or an lrx.optim method, with
    global-norm clipping when ``o.grad_clip > 0``); ``mask``: the projected leaves (lrx.optim)."""
    import optax

    if o.name == "adamw":
        opt = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
    else:
        import lrx.optim

        common_kwargs = dict(b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                             update_proj_gap=o.update_proj_gap, mask=mask)
        try:
            if o.name == "galore":
                opt = lrx.optim.galore(schedule, rank=o.rank, scale=o.scale,
                                       proj_type=o.proj_type, projector=o.projector,
                                       moments=o.moments, **common_kwargs)
            elif o.name == "fira":
                opt = lrx.optim.fira(schedule, rank=o.rank, scale=o.scale,
                                     proj_type=o.proj_type, projector=o.projector,
                                     gamma=o.gamma, residual=o.residual, **common_kwargs)
            elif o.name == "apollo":
                opt = lrx.optim.apollo(schedule, rank=o.rank, scale=o.scale,
                                       scale_type=o.scale_type, proj_type=o.proj_type,
                                       gamma=o.gamma, **common_kwargs)
            else:
                opt = lrx.optim.frugal(schedule, density=o.density, subspace=o.subspace,
                                       state_free=o.state_free,
                                       state_free_lr_scale=o.state_free_lr_scale,
                                       reset_on_refresh=o.reset_on_refresh,
                                       block_order=o.block_order, **common_kwargs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.optimizer ({o.name}): {e}") from None
    if o.grad_clip:
        opt = optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)
    return opt


def build_model(c: ml_collections.ConfigDict, vocab_size: int):
    """The Llama module for the config (vocabulary from the data)."""
    from lrx.models.llama import Llama, preset

    vocab_size = c.model.get("vocab_size", 0) or vocab_size  # model.vocab_size > 0 overrides
    cfg = preset(c.model.preset, vocab_size=vocab_size, dtype=c.model.dtype,
                 param_dtype=c.model.param_dtype, scan_layers=c.model.scan_layers,
                 remat=c.model.remat, max_len=max(c.data.seq_len,
                                                  preset(c.model.preset).max_len))
    return Llama(cfg), cfg


def load_corpus(d: ml_collections.ConfigDict):
    """The corpus named by the data section."""
    from lrx.data import text

    if d.source == "shakespeare":
        return text.load_shakespeare(tuple(d.val_plays))
    if d.source == "text_files":
        return text.load_text_files(d.paths, d.val_paths, min_bytes=d.seq_len + 1)
    return text.load_hf(d.hf_name, config_name=d.hf_config or None, text_field=d.hf_text_field,
                        train_bytes=d.hf_train_bytes, val_bytes=d.hf_val_bytes)


@dataclasses.dataclass
class Setup:
    """Everything :func:`build` makes from an ``lm`` config: the pieces of a training run."""

    config: ml_collections.ConfigDict  # defaults() merged with the config
    corpus: Any                        # lrx.data.text corpus (train / val byte arrays)
    mesh: Any                          # the (data, fsdp) device mesh
    model: Any                         # the flax Llama module
    model_config: Any                  # its LlamaConfig
    params: Any                        # trainable parameters (dense, or lrx.param nodes' parts)
    frozen: Any                        # frozen parts of lrx.param nodes ({} when dense)
    schedule: Callable                 # step -> learning rate
    optimizer: Any                     # the optax transformation
    loss_fn: Callable                  # (params, frozen, batch (B, L+1), rng) -> (loss, aux)
    eval_fn: Callable                  # (params, frozen, batch) -> {"loss": loss}
    eval_batches: list                 # held-out windows, (B, L+1) each
    batch_fn: Callable                 # step -> training batch (B, L+1), pure in (seed, step)
    hooks: list                        # training-loop hooks (ReLoRA restarts, spectra logging)
    per_layer: Any = None              # lrx.train.per_layer.PerLayer (init, step) or None
    # A sweep (config.sweep): one dict per replica ({'peak_lr', 'seed'}), its (params, frozen),
    # its schedule; `optimizer` is then lrx.train.sweep.sweep_optimizer(optimizer_factory, ...)
    # and params/frozen are those of config.seed. None for a single run.
    replicas: list | None = None
    replica_params: list | None = None
    schedules: list | None = None
    optimizer_factory: Callable | None = None

    def initial_state(self) -> Any:
        """The TrainState at step 0: replica-stacked (:func:`lrx.train.sweep.stack_states`) for
        a sweep, each replica with its own init, seed and learning rate."""
        from lrx.train import loop

        if self.replicas is None:
            return loop.create_state(
                self.params, self.optimizer, seed=self.config.seed, frozen=self.frozen,
                opt_state=self.per_layer.init(self.params) if self.per_layer else None)
        from lrx.train import sweep

        states = [loop.create_state(p, sweep.sweep_optimizer(self.optimizer_factory,
                                                             r["peak_lr"]),
                                    seed=r["seed"], frozen=f)
                  for r, (p, f) in zip(self.replicas, self.replica_params)]
        return sweep.stack_states(states)


def _with_lr(o: ml_collections.ConfigDict, learning_rate: float) -> ml_collections.ConfigDict:
    """A copy of optimizer section ``o`` with its peak learning rate replaced."""
    out = ml_collections.ConfigDict(o.to_dict())
    out.learning_rate = learning_rate
    return out


def make_schedule(o: ml_collections.ConfigDict, steps: int,
                  p: ml_collections.ConfigDict | None = None) -> Callable:
    """Linear warm-up over ``o.warmup_steps`` to ``o.learning_rate``, cosine decay to
    ``o.min_lr_ratio`` of it at ``steps``; with ``p.relora_every`` ReLoRA's jagged re-warm-up over
    ``p.relora_warmup`` steps after every restart."""
    import jax.numpy as jnp
    import optax

    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.learning_rate, warmup_steps=min(o.warmup_steps, steps - 1),
        decay_steps=steps, end_value=o.learning_rate * o.min_lr_ratio)
    if p is None or not p.get("relora_every", 0):
        return schedule
    every, rewarm = p.relora_every, p.relora_warmup

    def jagged(t):
        since = jnp.mod(t, every)
        jag = jnp.where(t >= every, jnp.minimum(1.0, (since + 1) / max(rewarm, 1)), 1.0)
        return schedule(t) * jag

    return jagged


def parameterize(params: Any, p: ml_collections.ConfigDict, key: Any) -> tuple[Any, Any]:
    """``(trainable, frozen)``: the matrices matching ``p.include`` replaced by ``p.method``'s
    lrx.param nodes (initialised from the dense ones with ``key``), split by
    :func:`lrx.param.partition`; ``(params, {})`` for ``p.method='none'``."""
    import lrx.param

    if p.method == "none":
        return params, {}
    tree = lrx.param.apply(params, [(p.include, param_factory(p))], key)
    return lrx.param.partition(tree)


def loss_functions(model: Any, p: ml_collections.ConfigDict) -> tuple[Callable, Callable]:
    """``(loss_fn, eval_fn)``: mean next-byte cross-entropy of ``model`` on the combined
    parameters (DyLoRA: one rank ``b ~ U{1..r}`` per training step from the loop's key)."""
    import optax

    import lrx.param

    factored, dylora, rank = p.method != "none", p.method == "dylora", p.rank

    def loss_fn(params, frozen, batch, rng):
        if dylora and rng is not None:
            frozen = lrx.param.set_rank(frozen, lrx.param.dylora_sample_rank(rng, rank))
        full = lrx.param.combine(params, frozen) if factored else params
        logits = model.apply({"params": full}, batch[:, :-1])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        return loss, {}

    def eval_fn(params, frozen, batch):
        return {"loss": loss_fn(params, frozen, batch, None)[0]}

    return loss_fn, eval_fn


def build(config: ml_collections.ConfigDict, *, corpus: Any = None) -> Setup:
    """Data, model, parameterization and optimizer of an ``lm`` config (the one LM builder, used by
    :func:`run`, the pretraining table and the studies). Starts ``jax.distributed`` when
    ``config.multihost`` and builds the mesh; ``corpus`` reuses an already loaded corpus."""
    import jax
    import jax.numpy as jnp
    import optax

    import lrx.optim
    import lrx.param
    from lrx.data import text
    from lrx.train import sharding

    c = _merged(config)
    _maybe_init_distributed(c)
    check_mesh(c, jax.device_count())
    if corpus is None:
        try:
            corpus = load_corpus(c.data)
        except ValueError as e:
            raise ConfigError(f"config.data: {e}") from None
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp)
    model, model_cfg = build_model(c, text.VOCAB_SIZE)
    seq_len, batch_size = c.data.seq_len, c.train.batch_size
    init = jax.jit(lambda k: model.init(k, jnp.zeros((1, seq_len), jnp.int32))["params"])

    def init_params(seed: int):
        init_key = jax.random.key(seed)
        return parameterize(init(init_key), c.param, jax.random.fold_in(init_key, 1))

    params, frozen = init_params(c.seed)
    replicas = sweep_grid(c)

    o = c.optimizer
    schedule = make_schedule(o, c.train.steps, c.param)
    mask = None
    if o.name != "adamw":
        mask = lrx.optim.path_mask(params, o.project)
        if not any(jax.tree_util.tree_leaves(mask)):
            raise ConfigError(f"optimizer.project={o.project!r} matches no matrix; parameter "
                              "paths look like 'layers_0/attn/q/kernel'")
    per_layer = None
    if c.train.per_layer:  # the optimizer sees one layer's slice: the mask is a rule over paths
        from lrx.train import per_layer as per_layer_lib

        mask = None if o.name == "adamw" else (lambda p: lrx.optim.path_mask(p, o.project))
        optimizer = optimizer_transform(o, schedule, mask)
        per_layer = per_layer_lib.make_per_layer_step(*per_layer_lib.llama_pieces(model_cfg),
                                                      optimizer)
    else:
        optimizer = optimizer_transform(o, schedule, mask)
    if c.param.method == "sora":  # SoRA's proximal step on the gates, after the optimizer
        optimizer = optax.chain(optimizer, lrx.param.sora_proximal(c.param.sora_threshold))
    loss_fn, eval_fn = loss_functions(model, c.param)
    replica_params, schedules, factory = None, None, None
    if replicas is not None:  # one optimizer whose peak lr lives in each replica's state
        unit = make_schedule(_with_lr(o, 1.0), c.train.steps, c.param)

        def factory(learning_rate):
            opt = optimizer_transform(o, lambda t: learning_rate * unit(t), mask)
            if c.param.method == "sora":
                opt = optax.chain(opt, lrx.param.sora_proximal(c.param.sora_threshold))
            return opt

        from lrx.train import sweep as sweep_lib

        optimizer = sweep_lib.sweep_optimizer(factory, replicas[0]["peak_lr"])
        seeds = sorted({r["seed"] for r in replicas})
        by_seed = {c.seed: (params, frozen)}
        by_seed.update({seed: init_params(seed) for seed in seeds if seed != c.seed})
        replica_params = [by_seed[r["seed"]] for r in replicas]
        schedules = [lambda t, lr=r["peak_lr"]: lr * unit(t) for r in replicas]

    dp = sharding.data_parallel_size(mesh)
    eval_set = text.eval_windows(corpus.val, seq_len, c.train.eval_windows)
    eval_set = eval_set[: (len(eval_set) // dp) * dp]
    eval_batches = [eval_set[i:i + batch_size] for i in range(0, len(eval_set), batch_size)]
    eval_batches = [b for b in eval_batches if len(b) % dp == 0]
    data_seed = c.data.seed

    def batch_fn(step: int):
        return text.sample_batch(corpus.train, data_seed, step, batch_size, seq_len)

    hooks = []
    if c.param.relora_every:
        hooks.append(_relora_hook(c.param, c.seed, replicas))
    if c.analysis.every:
        hooks.append(_analysis_hook(c.analysis, loss_fn))
    return Setup(config=c, corpus=corpus, mesh=mesh, model=model, model_config=model_cfg,
                 params=params, frozen=frozen, schedule=schedule, optimizer=optimizer,
                 loss_fn=loss_fn, eval_fn=eval_fn, eval_batches=eval_batches, batch_fn=batch_fn,
                 hooks=hooks, per_layer=per_layer, replicas=replicas,
                 replica_params=replica_params, schedules=schedules, optimizer_factory=factory)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains, evaluates and writes the workdir; returns the summary dict."""
    import jax

    from lrx.train import loop

    wall0 = time.perf_counter()
    s = build(config)
    c, corpus, mesh, o = s.config, s.corpus, s.mesh, s.config.optimizer
    seq_len, batch_size = c.data.seq_len, c.train.batch_size
    state = s.initial_state()
    model_cfg, schedule, optimizer = s.model_config, s.schedule, s.optimizer
    loss_fn, eval_fn, eval_batches, batch_fn, hooks = (s.loss_fn, s.eval_fn, s.eval_batches,
                                                       s.batch_fn, s.hooks)

    info = corpus.info()
    log.info("corpus %s: %d train bytes, %d val bytes, fingerprint %s", info["corpus"],
             info["train_bytes"], info["val_bytes"], info["fingerprint"])
    try:
        result = loop.train(
            workdir=workdir, state=state, loss_fn=loss_fn, optimizer=optimizer,
            batch_fn=batch_fn, total_steps=c.train.steps, mesh=mesh,
            micro_batches=c.train.micro_batches, eval_fn=eval_fn, eval_batches=eval_batches,
            eval_every=c.train.eval_every, log_every=c.train.log_every,
            checkpoint_every=c.train.checkpoint_every,
            keep_checkpoints=c.train.keep_checkpoints,
            learning_rate=schedule if s.replicas is None else s.schedules,
            tokens_per_step=batch_size * seq_len, stop_at=c.train.stop_at, hooks=hooks,
            stop_grace_seconds=c.train.stop_grace_seconds,
            step_fn=s.per_layer.step if s.per_layer else None, replicas=s.replicas)
    except loop.CheckpointMismatch as e:
        raise ConfigError(str(e)) from None
    except loop.NonFiniteLoss as e:
        summary = {"status": "diverged", "error": str(e), "step": e.step}
        common.write_summary(workdir, summary)
        raise ConfigError(f"training diverged: {e}. Lower optimizer.learning_rate or set "
                          "optimizer.grad_clip.") from None

    history = result["history"]
    final_eval = result["final_eval"]
    memory = result["memory"]
    k = len(s.replicas or [None])
    replica_rows = None
    if s.replicas is not None:
        replica_rows = _replica_summaries(result, history)
        live = [r for r in replica_rows if r["status"] == "done"]
        best = min(live, key=lambda r: r["eval_loss"]) if live else replica_rows[0]
        eval_loss, final_train = best["eval_loss"], best["final_train_loss"]
    else:
        eval_loss = final_eval.get("eval_loss", math.nan)
        final_train = history[-1]["loss"] if history else math.nan
    summary = {
        "status": "done" if result["stopped_by"] == "end" else f"stopped by {result['stopped_by']}",
        "experiment": "lm",
        "optimizer": o.name,
        "param": c.param.method,
        "model": c.model.preset,
        "steps": int(result["state"].step),
        "resumed_from": result["resumed_from"],
        "final_train_loss": final_train,
        "eval_loss": eval_loss,
        "eval_bits_per_byte": eval_loss / math.log(2),
        "unigram_entropy_bits": info["unigram_entropy_bits"],
        "trainable_params": memory["param_count"] // k,   # per replica
        "frozen_params": memory["frozen_count"] // k,
        "param_bytes": memory["param_bytes"] // k,
        "opt_state_bytes": memory["opt_state_bytes"] // k,
        "train_step_memory": memory["train_step"],
        "compiled_peak_bytes": memory["train_step"].get("peak_estimate"),
        "device_peak_bytes": memory["device_peak_bytes"],
        "host_peak_rss_bytes": memory["host_peak_rss_bytes"],
        "tokens_per_s": result["tokens_per_s"],
        "train_seconds": result["train_seconds"],
        "compile_seconds": memory["compile_seconds"],
        "wall_seconds": time.perf_counter() - wall0,
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "mesh": dict(mesh.shape),
        "model_config": dataclasses.asdict(model_cfg),
        "data": info,
    }
    if replica_rows is not None:  # eval_loss above: the best replica that trained to the end
        summary["replicas"] = replica_rows
        summary["best_replica"] = best["replica"]
        summary["tokens_per_s_note"] = "tokens of one replica per second (all replicas: x K)"
    if jax.process_index() == 0:
        common.write_summary(workdir, summary)
        _write_table(workdir, summary)
        _plot(workdir, loop.read_metrics(workdir), summary)
    return {k: summary[k] for k in ("status", "optimizer", "steps", "final_train_loss",
                                    "eval_loss", "eval_bits_per_byte", "unigram_entropy_bits",
                                    "opt_state_bytes", "tokens_per_s", "wall_seconds")}


def _replica_summaries(result: dict, history: list[dict]) -> list[dict]:
    """One summary row per replica of a sweep: its peak lr and seed, status ('done' or
    'diverged'), final train loss (the last logged window), eval loss and bits/byte (at the
    end; for a diverged replica, of its last good state)."""
    rows = []
    for i, (info, final) in enumerate(zip(result["replicas"], result["final_eval"] or
                                          [{}] * len(result["replicas"]))):
        train = [h for h in history if h.get("replica") == i]
        eval_loss = final.get("eval_loss", math.nan)
        diverged = info.get("diverged_at_step")
        rows.append({"replica": i, "peak_lr": info["peak_lr"], "seed": info["seed"],
                     "status": "done" if diverged is None else "diverged",
                     "diverged_at_step": diverged,
                     "final_train_loss": train[-1]["loss"] if train else math.nan,
                     "eval_loss": eval_loss if diverged is None else math.nan,
                     "eval_bits_per_byte": (eval_loss / math.log(2)) if diverged is None
                     else math.nan})
    return rows


def _analysis_hook(a: ml_collections.ConfigDict, loss_fn):
    """A training-loop hook logging lrx.analysis spectra of gradients / weights every a.every
    steps (gradients of the step's first micro-batch at the updated parameters)."""
    import jax

    from lrx.analysis import layer_metrics

    grad_fn = jax.jit(jax.grad(lambda p, fz, b: loss_fn(p, fz, b, None)[0]))

    def hook(step, state, batch):
        if step % a.every:
            return state, None
        out = {}
        if "grads" in a.targets:
            grads = grad_fn(state.params, state.frozen, batch[0])
            out.update({f"grad/{k}": v for k, v in layer_metrics(
                grads, a.metrics, a.paths, rank=a.energy_rank).items()})
        if "params" in a.targets:
            out.update({f"weight/{k}": v for k, v in layer_metrics(
                state.params, a.metrics, a.paths, rank=a.energy_rank).items()})
        return state, out

    return hook


def _write_table(workdir: str, s: dict) -> None:
    row = {"optimizer": s["optimizer"], "model": s["model"], "steps": s["steps"],
           "train loss": s["final_train_loss"], "eval loss": s["eval_loss"],
           "eval bits/byte": s["eval_bits_per_byte"],
           "unigram bits/byte": s["unigram_entropy_bits"],
           "params (M)": s["trainable_params"] / 1e6,
           "opt state (MB)": s["opt_state_bytes"] / 2**20,
           "compiled peak (MB)": (s["compiled_peak_bytes"] or 0) / 2**20,
           "tokens/s": s["tokens_per_s"], "wall (s)": s["wall_seconds"]}
    rows = [row]
    if s.get("replicas"):  # a sweep: one row per replica (the first row is the best replica)
        rows = [row | {"replica": "best"}] + [
            {"replica": r["replica"], "peak lr": r["peak_lr"], "seed": r["seed"],
             "status": r["status"], "train loss": r["final_train_loss"],
             "eval loss": r["eval_loss"], "eval bits/byte": r["eval_bits_per_byte"]}
            for r in s["replicas"]]
    common.write_table(workdir, "summary", rows, title=f"lm: {s['optimizer']} on "
                       f"{s['data']['corpus']}")


def _plot(workdir: str, records: list[dict], s: dict) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    groups = sorted({r.get("replica") for r in records if "loss" in r or "eval_loss" in r},
                    key=lambda g: -1 if g is None else g)
    for g in groups:
        tag = "" if g is None else next(
            (f" lr {r['peak_lr']:g} seed {r['seed']}" for r in records
             if r.get("replica") == g and "peak_lr" in r), f" replica {g}")
        train = [(r["step"], r["loss"]) for r in records if "loss" in r
                 and r.get("replica") == g]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r
                 and r.get("replica") == g]
        if train:
            line, = ax.plot(*zip(*train), label="train" + tag)
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval (held-out plays)" + tag,
                    color=line.get_color() if train else None)
    ax.axhline(s["unigram_entropy_bits"] * math.log(2), color="gray", ls="--",
               label="unigram entropy")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/byte)")
    ax.set_title(f"{s['optimizer']} · {s['model']}")
    ax.legend()
    common.savefig(fig, workdir, "loss")


def _smoke(c: ml_collections.ConfigDict) -> None:
    c.train.steps, c.train.batch_size, c.train.log_every = 2, 4, 1
    c.train.eval_every, c.train.eval_windows, c.train.checkpoint_every = 2, 4, 0
    c.data.seq_len = 32
    c.optimizer.warmup_steps = 1
    if "update_proj_gap" in c.optimizer:
        c.optimizer.update_proj_gap = 1
    if "rank" in c.optimizer:
        c.optimizer.rank = 8


# The GaLore paper's pretraining setups (Table 2; App. C; jiaweizzhao/GaLore
# scripts/benchmark_c4/llama_*.sh): sequence length 256, batch 512 sequences, warm-up 10% of the
# steps, cosine to 10%, weight decay 0. Steps 10K / 20K / 60K / 100K; ranks 128/256/256/512.
PAPER_SETUPS = {"llama_60m": (10_000, 128), "llama_130m": (20_000, 256),
                "llama_350m": (60_000, 256), "llama_1b": (100_000, 512)}
# Each optimizer's settings in its official pre-training scripts (README "Recipes"); none of these
# scripts clips gradients (their torchrun_main's --grad_clipping defaults to 0 and is not passed).
#   adamw:  GaLore's `--optimizer adam` baseline = torch.optim.Adam (eps 1e-8), lr 1e-3.
#   galore: galore_adamw, lr 0.01, galore_scale 0.25, update_proj_gap 200, GaLore's AdamW eps 1e-6.
#   fira:   GaLore's recipe (xichen-fy/Fira): lr 0.01, T 200, alpha 0.25 (< 1B), 0.0625 (>= 1B).
#   frugal: `--optimizer frugal` = block_adamw: density 0.25, block_order descending, gap 200,
#           reset_statistics, sign_sgd with inactive_lr_scale 1, lr 1e-3, eps 1e-8 (FRUGAL scripts).
#   apollo: apollo_adamw, lr 0.01, channel-wise, apollo_scale 1, proj random, gap 200, ranks
#           128/192/256/256 (60M/130M/350M/1B, zhuhanqing/APOLLO@76b3472 scripts; APOLLO-Mini:
#           rank 1, tensor-wise, scale 128 at every size).
PAPER_OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": dict(learning_rate=1e-3, eps=1e-8, b1=0.9, b2=0.999, weight_decay=0.0),
    "galore": dict(learning_rate=1e-2, eps=1e-6, b1=0.9, b2=0.999, weight_decay=0.0, scale=0.25,
                   update_proj_gap=200, proj_type="std"),
    "fira": dict(learning_rate=1e-2, eps=1e-6, b1=0.9, b2=0.999, weight_decay=0.0, scale=0.25,
                 update_proj_gap=200, proj_type="std"),
    "frugal": dict(learning_rate=1e-3, eps=1e-8, b1=0.9, b2=0.999, weight_decay=0.0,
                   density=0.25, subspace="blocks", block_order="descending",
                   update_proj_gap=200, state_free="signsgd", state_free_lr_scale=1.0,
                   reset_on_refresh=True),
    "apollo": dict(learning_rate=1e-2, eps=1e-6, b1=0.9, b2=0.999, weight_decay=0.0,
                   update_proj_gap=200, proj_type="std"),
}
FIRA_SCALE_1B = 0.0625  # Fira's alpha for models >= 1B
APOLLO_RANKS = {"llama_60m": 128, "llama_130m": 192, "llama_350m": 256, "llama_1b": 256}


def _paper(preset_name: str):
    steps, rank = PAPER_SETUPS[preset_name]

    def apply(c: ml_collections.ConfigDict) -> None:
        c.model.preset = preset_name
        c.data.seq_len = 256
        c.train.batch_size, c.train.steps = 512, steps
        c.train.eval_every = c.train.checkpoint_every = 1000
        c.train.log_every = 50
        o = c.optimizer
        o.warmup_steps = steps // 10
        o.min_lr_ratio = 0.1
        o.grad_clip = 0.0
        for key, value in PAPER_OPTIMIZERS.get(o.name, {}).items():
            o[key] = value
        if o.name == "fira" and preset_name == "llama_1b":
            o.scale = FIRA_SCALE_1B
        if o.name == "apollo":  # the APOLLO scripts' own ranks; APOLLO-Mini keeps its rank 1
            o.rank = 1 if o.get("scale_type") == "tensor" else APOLLO_RANKS[preset_name]
        elif "rank" in o:
            o.rank = rank
        if c.param.method != "none":  # GaLore's Table 2 baselines use the same ranks
            c.param.rank = rank
    return apply


def _set(**kv):
    def apply(c: ml_collections.ConfigDict) -> None:
        for key, value in kv.items():
            section, leaf = key.split("__")
            c[section][leaf] = value
    return apply


VARIANTS: dict[str, Any] = {
    "smoke": _smoke,
    **{name: _paper(name) for name in PAPER_SETUPS},
    "scan": _set(model__scan_layers=True),
    "remat": _set(model__remat=True),
    "bf16": _set(model__dtype="bfloat16"),
}
