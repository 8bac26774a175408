"""Language-model pretraining: a LLaMA-style decoder on a byte-level corpus with any lrx optimizer
(AdamW, GaLore, FRUGAL, Fira) and any lrx parameterization, through the shared training loop.

The config schema is :func:`defaults`; config files start from it (``configs/adamw.py``,
``configs/galore.py``, ...). Outputs in the workdir: ``checkpoints/``, ``metrics.jsonl``,
``summary.json``, ``summary.md`` and ``loss.png``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from typing import Any

import ml_collections

from experiments import common
from experiments.common import ConfigError

PRESET_NAMES = ("tiny", "llama_60m", "llama_130m", "llama_350m", "llama_1b", "llama_7b")
OPTIMIZERS = ("adamw", "galore", "frugal", "fira", "apollo")
SOURCES = ("shakespeare", "text_files", "hf")
DTYPES = ("float32", "bfloat16")
ANALYSIS_TARGETS = ("grads", "params")
# GaLore's recipe projects the attention and MLP matrices only; embeddings, LM head and norms get
# the same Adam unprojected.
PROJECT_ATTN_MLP = r".*(attn|mlp)/[^/]+/kernel"  # = lrx.optim.ATTN_MLP
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
        stop_grace_seconds=60.0))  # after SIGTERM/SIGINT: wait this long for a step boundary
    c.mesh = ml_collections.ConfigDict(dict(data=0, fsdp=1))
    c.multihost = False
    # Weight parameterization (lrx.param) of the matrices matching `include`: 'none' keeps every
    # weight dense; otherwise a factory of lrx.param ('lowrank', 'lora', 'dora', 'sltrain', 'nola',
    # 'randlora', 'vera'). alpha=0 and init='' mean the method's default. relora_every=K > 0 (LoRA
    # only) merges the adapters into the base every K steps, re-initialises them, zeroes their
    # optimizer moments and re-warms the learning rate over relora_warmup steps (ReLoRA).
    c.param = ml_collections.ConfigDict(dict(
        method="none", include=PROJECT_ATTN_MLP, rank=32, alpha=0.0, rslora=False, init="",
        density=0.03, num_basis_a=1024, num_basis_b=1024, relora_every=0, relora_warmup=50))
    # Spectral diagnostics every `every` steps (0 = off, no cost): metrics of lrx.analysis for the
    # gradients and/or weights of the matrices matching `paths` (energy_rank = r of top_r_energy),
    # logged to metrics.jsonl.
    c.analysis = ml_collections.ConfigDict(dict(
        every=0, metrics=("effective_rank", "stable_rank", "top_r_energy"),
        targets=("grads", "params"), paths=PROJECT_ATTN_MLP, energy_rank=8))
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


def apply_arg(config: ml_collections.ConfigDict, arg: str | None,
              variants: dict[str, Any]) -> ml_collections.ConfigDict:
    """Applies a config-file argument: comma-separated variant names (keys of ``variants``, each a
    function ``config -> None``) and ``key=value`` settings (dotted path, or a bare key that names
    exactly one leaf, e.g. ``rank=64``)."""
    for token in (t.strip() for t in (arg or "").split(",") if t.strip()):
        if "=" in token:
            key, value = token.split("=", 1)
            _set_leaf(config, key.strip(), value.strip())
        elif token in variants:
            variants[token](config)
        else:
            raise ConfigError(f"unknown config argument {token!r}.{common.suggest(token, variants)}"
                              f" Valid: {', '.join(variants)} or KEY=VALUE.")
    return config


def _set_leaf(config: ml_collections.ConfigDict, key: str, value: str) -> None:
    flat = _flatten(config)
    matches = [k for k in flat if k == key or k.endswith("." + key)]
    if len(matches) > 1 and config.get("param", {}).get("method", "none") == "none":
        matches = [k for k in matches if not k.startswith("param.")]  # the inactive section
    if len(matches) != 1:
        raise ConfigError(f"config argument {key}={value}: "
                          + ("ambiguous, matches " + ", ".join(matches) if matches else
                             "no such key." + common.suggest(key, flat) +
                             " Keys: " + ", ".join(sorted(flat))))
    path = matches[0].split(".")
    node = config
    for part in path[:-1]:
        node = node[part]
    old = node[path[-1]]
    try:
        if isinstance(old, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            new: Any = value.lower() in ("true", "1")
        elif isinstance(old, int):
            new = int(value)
        elif isinstance(old, float):
            new = float(value)
        elif isinstance(old, tuple):
            new = tuple(v for v in value.split("+") if v)
        else:
            new = value
    except ValueError:
        raise ConfigError(f"config argument {key}={value}: expected a {type(old).__name__}"
                          ) from None
    node[path[-1]] = new


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
        _build_optimizer_transform(c.optimizer, lambda step: 0.0, mask=None)  # checks kwargs
    _maybe_init_distributed(c)
    import jax

    from lrx.train import sharding

    try:
        mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp)
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None
    dp = sharding.data_parallel_size(mesh)
    if c.train.batch_size % c.train.micro_batches:
        raise ConfigError(f"train.batch_size={c.train.batch_size} is not divisible by "
                          f"train.micro_batches={c.train.micro_batches}")
    micro = c.train.batch_size // c.train.micro_batches
    if micro % dp:
        raise ConfigError(f"the micro-batch of {micro} sequences (train.batch_size / "
                          f"train.micro_batches) is not divisible by the data-parallel size {dp} "
                          f"(mesh data x fsdp over {jax.device_count()} devices)")
    if c.param.method != "none":
        _param_factory(c.param)  # raises ConfigError naming the valid methods / arguments
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
    if c.train.eval_windows % dp:
        raise ConfigError(f"train.eval_windows={c.train.eval_windows} is not divisible by the "
                          f"data-parallel size {dp}")
    _check_projection(c)


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


PARAM_METHODS = ("none", "lowrank", "lora", "dora", "sltrain", "nola", "randlora", "vera")


def _param_factory(p: ml_collections.ConfigDict):
    """The lrx.param factory for the param section (only the arguments the method takes)."""
    import inspect

    import lrx.param

    common.check_choice(p.method, PARAM_METHODS, "param.method")
    candidates = {"rank": p.rank, "alpha": p.alpha or None, "rslora": p.rslora,
                  "init": p.init or None, "density": p.density, "num_basis_a": p.num_basis_a,
                  "num_basis_b": p.num_basis_b}
    accepted = inspect.signature(getattr(lrx.param, p.method)).parameters
    kwargs = {k: v for k, v in candidates.items() if k in accepted and v is not None}
    try:
        return lrx.param.factory(p.method, **kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"config.param: {e}") from None


def _relora_hook(p: ml_collections.ConfigDict, seed: int):
    """Every p.relora_every steps: merge LoRA adapters into the base, re-initialise them and zero
    the optimizer's float moments (counters are kept, so schedules continue)."""
    import jax
    import jax.numpy as jnp

    import lrx.param

    @jax.jit
    def restart(state, step):
        full = lrx.param.combine(state.params, state.frozen)
        key = jax.random.fold_in(jax.random.key(seed + 1), step)
        trainable, frozen = lrx.param.partition(lrx.param.merge_and_reinit(full, key))
        zero = lambda x: jnp.zeros_like(x) if jnp.issubdtype(x.dtype, jnp.floating) else x
        return state.replace(params=trainable, frozen=frozen,
                             opt_state=jax.tree_util.tree_map(zero, state.opt_state))

    def hook(step, state, batch):  # noqa: ARG001
        if step % p.relora_every:
            return state, None
        return restart(state, step), {"relora_restart": 1}

    return hook


def _build_optimizer_transform(o, schedule, mask):
    """The optax transformation for optimizer section ``o`` (AdamW or an lrx.optim method)."""
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
                                       reset_on_refresh=o.reset_on_refresh, **common_kwargs)
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


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains, evaluates and writes the workdir; returns the summary dict."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from lrx.data import text
    from lrx.train import loop, sharding

    wall0 = time.perf_counter()
    c = _merged(config)
    _maybe_init_distributed(c)
    try:
        corpus = load_corpus(c.data)
    except ValueError as e:
        raise ConfigError(f"config.data: {e}") from None
    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp)
    model, model_cfg = build_model(c, text.VOCAB_SIZE)
    seq_len, batch_size = c.data.seq_len, c.train.batch_size
    init_key = jax.random.key(c.seed)
    params = jax.jit(lambda k: model.init(k, jnp.zeros((1, seq_len), jnp.int32))["params"])(
        init_key)
    frozen: Any = {}
    if c.param.method != "none":
        import lrx.param

        rules = [(c.param.include, _param_factory(c.param))]
        params = lrx.param.apply(params, rules, jax.random.fold_in(init_key, 1))
        params, frozen = lrx.param.partition(params)

    o = c.optimizer
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.learning_rate, warmup_steps=min(o.warmup_steps,
                                                                     c.train.steps - 1),
        decay_steps=c.train.steps, end_value=o.learning_rate * o.min_lr_ratio)
    if c.param.relora_every:
        base_schedule, every, rewarm = schedule, c.param.relora_every, c.param.relora_warmup

        def schedule(t):  # ReLoRA's jagged schedule: re-warm after every restart
            since = jnp.mod(t, every)
            jag = jnp.where(t >= every, jnp.minimum(1.0, (since + 1) / max(rewarm, 1)), 1.0)
            return base_schedule(t) * jag
    mask = None
    if o.name != "adamw":
        import lrx.optim

        mask = lrx.optim.path_mask(params, o.project)
    if mask is not None and not any(jax.tree_util.tree_leaves(mask)):
        raise ConfigError(f"optimizer.project={o.project!r} matches no matrix; parameter paths "
                          "look like 'layers_0/attn/q/kernel'")
    optimizer = _build_optimizer_transform(o, schedule, mask)
    state = loop.create_state(params, optimizer, seed=c.seed, frozen=frozen)

    if c.param.method != "none":
        import lrx.param

        def full_params(p, fz):
            return lrx.param.combine(p, fz)
    else:
        def full_params(p, fz):  # noqa: ARG001
            return p

    def loss_fn(p, fz, batch, rng):  # noqa: ARG001 - deterministic model
        logits = model.apply({"params": full_params(p, fz)}, batch[:, :-1])
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()
        return loss, {}

    def eval_fn(p, fz, batch):
        return {"loss": loss_fn(p, fz, batch, None)[0]}

    eval_set = text.eval_windows(corpus.val, seq_len, c.train.eval_windows)
    eval_set = eval_set[: (len(eval_set) // sharding.data_parallel_size(mesh))
                        * sharding.data_parallel_size(mesh)]
    eval_batches = [eval_set[i:i + batch_size] for i in range(0, len(eval_set), batch_size)]
    eval_batches = [b for b in eval_batches if len(b) % sharding.data_parallel_size(mesh) == 0]
    data_seed = c.data.seed

    def batch_fn(step: int) -> np.ndarray:
        return text.sample_batch(corpus.train, data_seed, step, batch_size, seq_len)

    hooks = []
    if c.param.relora_every:
        hooks.append(_relora_hook(c.param, c.seed))
    if c.analysis.every:
        hooks.append(_analysis_hook(c.analysis, loss_fn))

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
            keep_checkpoints=c.train.keep_checkpoints, learning_rate=schedule,
            tokens_per_step=batch_size * seq_len, stop_at=c.train.stop_at, hooks=hooks,
            stop_grace_seconds=c.train.stop_grace_seconds)
    except loop.CheckpointMismatch as e:
        raise ConfigError(str(e)) from None
    except loop.NonFiniteLoss as e:
        summary = {"status": "diverged", "error": str(e), "step": e.step}
        common.write_summary(workdir, summary)
        raise ConfigError(f"training diverged: {e}. Lower optimizer.learning_rate or set "
                          "optimizer.grad_clip.") from None

    history = result["history"]
    final_eval = result["final_eval"]
    eval_loss = final_eval.get("eval_loss", math.nan)
    memory = result["memory"]
    summary = {
        "status": "done" if result["stopped_by"] == "end" else f"stopped by {result['stopped_by']}",
        "experiment": "lm",
        "optimizer": o.name,
        "param": c.param.method,
        "model": c.model.preset,
        "steps": int(result["state"].step),
        "resumed_from": result["resumed_from"],
        "final_train_loss": history[-1]["loss"] if history else math.nan,
        "eval_loss": eval_loss,
        "eval_bits_per_byte": eval_loss / math.log(2),
        "unigram_entropy_bits": info["unigram_entropy_bits"],
        "trainable_params": memory["param_count"],
        "frozen_params": memory["frozen_count"],
        "param_bytes": memory["param_bytes"],
        "opt_state_bytes": memory["opt_state_bytes"],
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
    if jax.process_index() == 0:
        common.write_summary(workdir, summary)
        _write_table(workdir, summary)
        _plot(workdir, loop.read_metrics(workdir), summary)
    return {k: summary[k] for k in ("status", "optimizer", "steps", "final_train_loss",
                                    "eval_loss", "eval_bits_per_byte", "unigram_entropy_bits",
                                    "opt_state_bytes", "tokens_per_s", "wall_seconds")}


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
    common.write_table(workdir, "summary", [row], title=f"lm: {s['optimizer']} on "
                       f"{s['data']['corpus']}")


def _plot(workdir: str, records: list[dict], s: dict) -> None:
    plt = common.pyplot()
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval (held-out plays)")
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


# The GaLore paper's pretraining setups (Table 2; App. C): sequence length 256, batch 512
# sequences, 10% warmup, cosine to 10%; GaLore lr 0.01 (AdamW 1e-3), rank 128/256/256/512,
# update_proj_gap 200, scale 0.25. Steps: 10K / 20K / 60K / 100K.
PAPER_SETUPS = {"llama_60m": (10_000, 128), "llama_130m": (20_000, 256),
          "llama_350m": (60_000, 256), "llama_1b": (100_000, 512)}


def _paper(preset_name: str):
    steps, rank = PAPER_SETUPS[preset_name]

    def apply(c: ml_collections.ConfigDict) -> None:
        c.model.preset = preset_name
        c.data.seq_len = 256
        c.train.batch_size, c.train.steps = 512, steps
        c.train.eval_every = c.train.checkpoint_every = 1000
        c.train.log_every = 50
        c.optimizer.warmup_steps = steps // 10
        c.optimizer.learning_rate = 1e-3 if c.optimizer.name == "adamw" else 1e-2
        if "rank" in c.optimizer:
            c.optimizer.rank = rank
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
