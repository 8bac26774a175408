"""The pretraining comparison table: every method of the ``lm`` experiment at equal steps.

Runs :func:`experiments.lm.run` once per method (full-rank AdamW, the lrx.optim gradient
projections GaLore / FRUGAL / Fira, and the lrx.param weight parameterizations low-rank / LoRA /
ReLoRA / SLTrain), each in ``workdir/<method>/``, with the shared ``steps``, ``batch_size``,
``seq_len``, ``eval_windows`` and ``seed`` of the config, and writes ``pretrain_table.md``
(eval loss, bits per byte, trainable and frozen parameters, optimizer-state bytes, compiled peak
memory of the train step, tokens/s) and ``summary.json``. A method whose sub-directory already
holds a finished summary for the same number of steps is not rerun (resume after interruption).
This is the question of GaLore (arXiv 2403.03507) Table 2 and SLTrain (arXiv 2406.02214) Table 1
at a small scale.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import ml_collections

from experiments import common, lm
from experiments.common import ConfigError

SHARED = ("steps", "batch_size", "seq_len", "eval_windows", "seed")
METHODS = ("adamw", "galore", "frugal", "fira", "lowrank", "lora", "relora", "sltrain")


def defaults() -> ml_collections.ConfigDict:
    """The config schema of ``pretrain_table``. ``runs`` holds one ``lm`` config per method
    (``configs/<method>.py``, filled by ``configs/pretrain_table.py``; each is checked by
    :func:`experiments.lm.validate`); the shared settings below override theirs."""
    c = ml_collections.ConfigDict()
    c.experiment = "pretrain_table"
    c.model = "tiny"               # the lm preset of every run
    c.steps = 100
    c.batch_size = 12
    c.seq_len = 128
    c.eval_windows = 64
    c.methods = METHODS
    c.seed = 0
    c.relora_segments = 4          # ReLoRA restarts per run
    c.runs = ml_collections.ConfigDict()
    return c


def run_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The ``lm`` config of method ``name`` with the shared settings applied."""
    c = ml_collections.ConfigDict(config.runs[name].to_dict())
    c.train.steps = config.steps
    c.train.batch_size = config.batch_size
    c.data.seq_len = config.seq_len
    c.train.eval_windows = config.eval_windows
    c.seed = config.seed
    c.train.eval_every = config.steps          # evaluate once, at the end
    c.train.checkpoint_every = 0
    c.train.log_every = max(1, min(c.train.log_every, config.steps))
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(config.steps // 10, 1))
    if c.param.get("relora_every", 0):
        c.param.relora_every = max(1, config.steps // config.relora_segments)
        c.param.relora_warmup = min(c.param.relora_warmup, max(1, c.param.relora_every // 5))
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the shared settings and every selected method's ``lm`` config."""
    common.check_keys(config, defaults())
    for key in ("experiment", "methods", "model", "runs", "relora_segments", *SHARED):
        if key not in config:
            raise ConfigError(f"config.{key} is missing (see configs/pretrain_table.py)")
    common.check_choice(config.model, lm.PRESET_NAMES, "model")
    for key in (*SHARED[:-1], "relora_segments"):
        common.check_positive(config[key], key)
    if not config.methods:
        raise ConfigError(f"config.methods is empty; valid: {', '.join(config.runs)}")
    for name in config.methods:
        common.check_choice(name, list(config.runs), "methods[...]")
        try:
            lm.validate(run_config(config, name))
        except ConfigError as e:
            raise ConfigError(f"method {name!r}: {e}") from None


def _row(name: str, s: dict[str, Any]) -> dict[str, Any]:
    return {"method": name, "optimizer": s["optimizer"], "param": s.get("param", "none"),
            "steps": s["steps"], "eval loss": s["eval_loss"],
            "eval bits/byte": s["eval_bits_per_byte"],
            "trainable params (M)": s["trainable_params"] / 1e6,
            "frozen params (M)": s["frozen_params"] / 1e6,
            "opt state (MB)": s["opt_state_bytes"] / 2**20,
            "compiled peak (MB)": (s["compiled_peak_bytes"] or 0) / 2**20,
            "tokens/s": s["tokens_per_s"], "wall (s)": s["wall_seconds"]}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains every method in ``config.methods`` and writes the table; returns the summary."""
    wall0 = time.perf_counter()
    rows, runs = [], {}
    for name in config.methods:
        sub = os.path.join(workdir, name)
        path = os.path.join(sub, "summary.json")
        done = None
        if os.path.exists(path):
            with open(path) as f:
                done = json.load(f)
            if done.get("status") != "done" or done.get("steps") != config.steps:
                done = None
        if done is None:
            lm.run(run_config(config, name), sub)
            with open(path) as f:
                done = json.load(f)
            if done.get("status") != "done":  # SIGTERM/SIGINT: checkpointed, stop the study
                raise SystemExit(f"pretrain_table: run {name!r} {done.get('status')}; rerun the "
                                 "same command to resume")
        runs[name] = done
        rows.append(_row(name, done))
        common.write_table(workdir, "pretrain_table", rows, title=(
            f"Pretraining at {config.steps} steps x {config.batch_size} x {config.seq_len} "
            f"tokens, model {config.model}, {done['data']['corpus']}, {done['devices']}"))
    summary = {"experiment": "pretrain_table", "model": config.model, "steps": config.steps,
               "batch_size": config.batch_size, "seq_len": config.seq_len,
               "rows": rows, "wall_seconds": time.perf_counter() - wall0,
               "ordering_by_eval_loss": [r["method"] for r in sorted(
                   rows, key=lambda r: r["eval loss"])]}
    common.write_summary(workdir, summary)
    return {k: summary[k] for k in ("experiment", "model", "steps", "ordering_by_eval_loss",
                                    "wall_seconds")}
