"""The pretraining comparison table: every method of the ``lm`` experiment with its learning rate
tuned, at equal steps and tokens, with seeds.

The question of GaLore (Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank
Projection", arXiv 2403.03507) Table 2, Fira (Chen et al., arXiv 2410.01623), APOLLO (Zhu et al.,
arXiv 2412.05270), FRUGAL (Zmushko et al., arXiv 2411.07837) and SLTrain (Han et al., arXiv
2406.02214) Table 1 at our scale: full-rank AdamW, the lrx.optim gradient methods (GaLore, Fira,
FRUGAL, APOLLO, APOLLO-Mini) and the lrx.param weight parameterizations (low-rank, LoRA, ReLoRA,
SLTrain), each from its own config file (``configs/<method>.py``), with the shared ``steps``,
``batch_size``, ``seq_len``, ``eval_windows`` and ``seed`` of this config.

Protocol, two phases, each one vmapped sweep per method (:mod:`lrx.train.sweep`, one compiled
program for all replicas):

1. **tune**: the method's learning rate over ``lr_factors`` times its paper's value (the lr of its
   ``llama_60m`` recipe: AdamW, low-rank, LoRA, ReLoRA, FRUGAL 1e-3, SLTrain 3e-3, GaLore, Fira,
   APOLLO, APOLLO-Mini 1e-2), seed ``seed``; the best lr is the one with the lowest final eval
   loss among the replicas that did not diverge (a best lr at the edge of the grid is flagged).
   With ``extend_grid = n > 0``, a best lr at an edge of the grid extends it: one more lr beyond
   that edge (the grid's ratio at that edge, e.g. 3x) runs as its own phase ``extend<k>``, up to
   ``n`` times, until the best lr is inside the lrs tried (the usual rule: the optimum is bracketed
   before it is reported, whatever method it favours).
2. **seeds**: the best lr with ``seeds`` seeds (init and step randomness; the data stream is
   shared), reported as mean ± std (n - 1) of the final eval bits/byte. Seed ``seed`` is the
   tuning sweep's replica at that lr (a replica of a vmapped sweep equals the run done alone,
   tests/train/test_sweep.py), so this phase trains seeds ``seed + 1 .. seed + seeds - 1``.

Every run evaluates ``evals`` times, so ``curves.png`` and the curve table show eval loss against
tokens for each method's best lr (mean over seeds) and ``summary.json`` records the ordering of
the methods at each evaluation and since when it has not changed. The projector refresh gap of the
gradient methods is ``proj_gap_fraction`` of the steps (GaLore's 200 of 10K steps); ReLoRA
restarts ``relora_segments`` times. Each phase of each method runs in ``workdir/<method>/<phase>/``
(checkpointed at every evaluation); a finished one is not rerun (resume after interruption by
rerunning the same command).
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import ml_collections
import numpy as np

from experiments import common, lm
from experiments.common import ConfigError

SHARED = ("steps", "batch_size", "seq_len", "eval_windows", "seed")
METHODS = ("adamw", "galore", "fira", "frugal", "apollo", "apollo_mini", "lowrank", "lora",
           "relora", "sltrain")
# method -> (config module, its variant tokens)
METHOD_CONFIGS = {name: (name, ()) for name in METHODS} | {"apollo_mini": ("apollo", ("mini",))}
# The papers' LLaMA-60M C4 validation perplexity (1.1B tokens), beside each row: GaLore Table 2
# (full-rank, GaLore, low-rank, LoRA, ReLoRA), Fira Table 2 (Fira), SLTrain Table 1 (recalled in
# /work/shared/reference/parameterizations.md, not re-verified), APOLLO-Mini as quoted in issue #15
# (the APOLLO paper's table; not in shared/reference). FRUGAL and APOLLO: not retrieved.
PAPER_60M_PPL: dict[str, tuple[float | None, str]] = {
    "adamw": (34.06, "GaLore Tab. 2"), "galore": (34.88, "GaLore Tab. 2"),
    "fira": (31.06, "Fira Tab. 2"), "frugal": (None, "not retrieved"),
    "apollo": (None, "not retrieved"), "apollo_mini": (30.95, "APOLLO (issue #15)"),
    "lowrank": (78.18, "GaLore Tab. 2"), "lora": (34.99, "GaLore Tab. 2"),
    "relora": (37.04, "GaLore Tab. 2"), "sltrain": (34.15, "SLTrain Tab. 1 (recalled)")}
PHASES = ("tune", "seeds")


def defaults() -> ml_collections.ConfigDict:
    """The config schema of ``pretrain_table``. ``runs`` holds one ``lm`` config per method
    (filled by ``configs/pretrain_table.py``; each is checked by :func:`experiments.lm.validate`);
    the shared settings below override theirs."""
    c = ml_collections.ConfigDict()
    c.experiment = "pretrain_table"
    c.model = "tiny"               # the lm preset of every run
    c.steps = 200
    c.batch_size = 8
    c.seq_len = 128
    c.eval_windows = 64
    c.methods = METHODS
    c.seed = 0
    c.relora_segments = 4          # ReLoRA restarts per run
    c.lr_factors = (1 / 3, 1.0, 3.0)   # the tuning grid: these times the paper's lr
    c.extend_grid = 0              # a best lr at a grid edge: up to this many lrs beyond it
    c.seeds = 3                    # seeds of the best lr
    c.evals = 8                    # evaluations per run (the eval-loss-vs-tokens curves)
    c.proj_gap_fraction = 0.02     # update_proj_gap = this x steps (GaLore: 200 of 10K)
    c.paper_lr = ml_collections.ConfigDict()  # method -> its paper's lr (the grid's centre)
    c.runs = ml_collections.ConfigDict()
    return c


def run_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
    """The ``lm`` config of method ``name`` with the shared settings applied (no sweep)."""
    c = ml_collections.ConfigDict(config.runs[name].to_dict())
    c.train.steps = config.steps
    c.train.batch_size = config.batch_size
    c.data.seq_len = config.seq_len
    c.train.eval_windows = config.eval_windows
    c.seed = config.seed
    every = max(1, config.steps // config.get("evals", 1))
    c.train.eval_every = every
    c.train.checkpoint_every = every           # resume mid-run after an interruption
    c.train.keep_checkpoints = 1
    c.train.log_every = max(1, min(c.train.log_every, every))
    c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(config.steps // 10, 1))
    if "update_proj_gap" in c.optimizer and config.get("proj_gap_fraction", 0):
        c.optimizer.update_proj_gap = max(1, round(config.proj_gap_fraction * config.steps))
    if c.param.get("relora_every", 0):
        c.param.relora_every = max(1, config.steps // config.relora_segments)
        c.param.relora_warmup = min(c.param.relora_warmup, max(1, c.param.relora_every // 5))
    return c


def lr_grid(config: ml_collections.ConfigDict, name: str) -> tuple[float, ...]:
    """The tuning grid of method ``name``: ``lr_factors`` x its paper's lr."""
    centre = float(config.paper_lr[name])
    return tuple(float(f"{centre * f:.4g}") for f in config.lr_factors)


def next_lr(config: ml_collections.ConfigDict, name: str, tried: list[float],
            best_lr: float) -> float | None:
    """The lr that extends the grid of method ``name`` past the edge where ``best_lr`` sits
    (``tried``: every lr run so far), or None when the best lr is inside the lrs tried or the grid
    has one lr. The step is the grid's own ratio at that edge (``lr_factors`` 1/3, 1, 3: 3x).

    >>> c = ml_collections.ConfigDict({"lr_factors": (0.5, 1.0, 3.0), "paper_lr": {"m": 1e-3}})
    >>> next_lr(c, "m", [5e-4, 1e-3, 3e-3], 3e-3), next_lr(c, "m", [5e-4, 1e-3, 3e-3], 5e-4)
    (0.009, 0.00025)
    >>> next_lr(c, "m", [5e-4, 1e-3, 3e-3], 1e-3) is None
    True
    """
    factors = sorted(config.lr_factors)
    if len(factors) < 2 or min(tried) < best_lr < max(tried):
        return None
    if best_lr == max(tried):
        return float(f"{best_lr * factors[-1] / factors[-2]:.4g}")
    return float(f"{best_lr * factors[0] / factors[1]:.4g}")


def phase_config(config: ml_collections.ConfigDict, name: str, phase: str,
                 best_lr: float | None = None) -> ml_collections.ConfigDict:
    """The ``lm`` config of one phase: 'tune' sweeps :func:`lr_grid` at ``seed``; 'extend' runs
    the one lr ``best_lr`` (from :func:`next_lr`) at ``seed``, as a tuning replica; 'seeds' runs
    ``best_lr`` with the other ``seeds - 1`` seeds (``seed + 1, ...``; seed ``seed`` is the
    tuning replica)."""
    c = run_config(config, name)
    if phase == "tune":
        c.sweep.lr, c.sweep.seeds = lr_grid(config, name), 1
    elif phase == "extend":
        c.sweep.lr, c.sweep.seeds = (float(best_lr),), 1
    else:
        if config.seeds < 2:
            raise ValueError("the seeds phase needs config.seeds >= 2")
        c.seed = int(config.seed) + 1
        c.sweep.lr, c.sweep.seeds = (float(best_lr),), int(config.seeds) - 1
    return c


def validate(config: ml_collections.ConfigDict) -> None:
    """Checks the shared settings and every selected method's ``lm`` config."""
    common.check_keys(config, defaults())
    for key in ("experiment", "methods", "model", "runs", "relora_segments", *SHARED):
        if key not in config:
            raise ConfigError(f"config.{key} is missing (see configs/pretrain_table.py)")
    common.check_choice(config.model, lm.PRESET_NAMES, "model")
    for key in (*SHARED[:-1], "relora_segments", "seeds", "evals"):
        common.check_positive(config[key], key)
    if not config.lr_factors:
        raise ConfigError("config.lr_factors is empty; give the grid as factors of each "
                          "method's paper lr, e.g. lr_factors=0.333+1+3")
    for f in config.lr_factors:
        if not (isinstance(f, (int, float)) and math.isfinite(f) and f > 0):
            raise ConfigError(f"config.lr_factors: {f!r} must be a finite number > 0")
    if len(set(config.lr_factors)) != len(config.lr_factors):
        raise ConfigError(f"config.lr_factors={tuple(config.lr_factors)} repeats a factor")
    extend = config.get("extend_grid", 0)
    if not (isinstance(extend, int) and not isinstance(extend, bool) and extend >= 0):
        raise ConfigError(f"config.extend_grid={extend!r} must be an integer >= 0 (the most lrs "
                          "run beyond a grid edge where the best lr sits; 0: none)")
    if config.evals > config.steps:
        raise ConfigError(f"config.evals={config.evals} exceeds steps={config.steps}")
    if not 0 <= config.proj_gap_fraction <= 1:
        raise ConfigError(f"config.proj_gap_fraction={config.proj_gap_fraction} must be in "
                          "[0, 1] (0 keeps each config's update_proj_gap)")
    if not config.methods:
        raise ConfigError(f"config.methods is empty; valid: {', '.join(config.runs)}")
    for name in config.methods:
        common.check_choice(name, list(config.runs), "methods[...]")
        if name not in config.paper_lr:
            raise ConfigError(f"config.paper_lr has no lr for method {name!r}")
        try:
            lm.validate(phase_config(config, name, "tune"))
        except ConfigError as e:
            raise ConfigError(f"method {name!r}: {e}") from None


def _load(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _run_phase(c: ml_collections.ConfigDict, sub: str, steps: int) -> dict:
    """``lm.run`` of one phase unless ``sub`` holds its finished summary; returns the summary
    (status 'done', or 'diverged' when every replica diverged)."""
    path = os.path.join(sub, "summary.json")
    done = _load(path)
    if done and (done.get("status") == "diverged"
                 or (done.get("status") == "done" and done.get("steps") == steps)):
        return done
    try:
        lm.run(c, sub)
    except ConfigError as e:
        if "diverged" not in str(e):
            raise
    done = _load(path) or {}
    if done.get("status") not in ("done", "diverged"):  # SIGTERM/SIGINT: checkpointed
        raise SystemExit(f"pretrain_table: run {sub} {done.get('status')}; rerun the same "
                         "command to resume")
    return done


def best_replica(summary: dict) -> dict | None:
    """The replica of a tuning sweep with the lowest final eval loss among those that trained to
    the end (None when all diverged)."""
    live = [r for r in summary.get("replicas", []) if r["status"] == "done"
            and math.isfinite(r["eval_loss"])]
    return min(live, key=lambda r: r["eval_loss"]) if live else None


def _tune(config: ml_collections.ConfigDict, name: str, workdir: str) -> dict:
    """The tuning phase of method ``name`` and its grid extensions (:func:`next_lr`, at most
    ``extend_grid``, each in ``workdir/<name>/extend<k>``): the tuning summary with the replicas
    of every phase (each tagged with its ``phase``) and their summed wall time."""
    tune = _run_phase(phase_config(config, name, "tune"), os.path.join(workdir, name, "tune"),
                      config.steps)
    merged = dict(tune)
    merged["replicas"] = [r | {"phase": "tune"} for r in tune.get("replicas", [])]
    for k in range(1, config.get("extend_grid", 0) + 1):
        best = best_replica(merged)
        if best is None:
            break
        lr = next_lr(config, name, [r["peak_lr"] for r in merged["replicas"]], best["peak_lr"])
        if lr is None or lr in {r["peak_lr"] for r in merged["replicas"]}:
            break                     # bracketed, or the lr past the edge diverged already
        phase = f"extend{k}"
        ext = _run_phase(phase_config(config, name, "extend", lr),
                         os.path.join(workdir, name, phase), config.steps)
        merged["replicas"] += [r | {"phase": phase} for r in ext.get("replicas", [])]
        merged["wall_seconds"] = merged.get("wall_seconds", 0.0) + ext.get("wall_seconds", 0.0)
    return merged


def _eval_curve(workdir: str, name: str, best: dict,
                every: int = 1, last: int = 0) -> list[tuple[int, float, float]]:
    """``(step, mean, std)`` of the eval loss over the seeds of method ``name`` at its best lr
    (the tuning replica ``best`` and every replica of the seeds phase), per scheduled evaluation
    (steps that are multiples of ``every``, and ``last``; an evaluation at an interruption is left
    out)."""
    from lrx.train.loop import read_metrics

    rows = [r for r in read_metrics(os.path.join(workdir, name, best.get("phase", "tune")))
            if r.get("replica") == best["replica"]]
    rows += read_metrics(os.path.join(workdir, name, "seeds"))
    by_step: dict[int, list[float]] = {}
    for r in rows:
        if "eval_loss" in r and (int(r["step"]) % every == 0 or int(r["step"]) == last):
            by_step.setdefault(int(r["step"]), []).append(float(r["eval_loss"]))
    return [(s, float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
            for s, v in sorted(by_step.items())]


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = [x for x in values if math.isfinite(x)]
    if not v:
        return math.nan, math.nan
    return float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0


def _row(config, name: str, tune: dict, seeds: dict | None) -> dict[str, Any]:
    grid = sorted({*lr_grid(config, name), *(r["peak_lr"] for r in tune.get("replicas", []))})
    best = best_replica(tune)
    ppl, source = PAPER_60M_PPL.get(name, (None, ""))
    row: dict[str, Any] = {"method": name, "paper lr": config.paper_lr[name],
                           "lr grid": "/".join(f"{x:g}" for x in grid)}
    if best is None:
        return row | {"best lr": "diverged at every lr", "paper 60M ppl": ppl}
    edge = " (grid edge)" if best["peak_lr"] in (grid[0], grid[-1]) and len(grid) > 1 else ""
    row["best lr"] = f"{best['peak_lr']:g}{edge}"
    if seeds and seeds.get("replicas"):
        bpb = [best["eval_bits_per_byte"]] + [r["eval_bits_per_byte"]
                                              for r in seeds["replicas"]]
        mean, std = _mean_std(bpb)
        n = sum(math.isfinite(x) for x in bpb)
        row["eval bits/byte (mean ± std)"] = f"{mean:.4f} ± {std:.4f} (n={n})"
        row["_mean_bpb"] = mean
        source_summary = seeds
    else:
        row["eval bits/byte (mean ± std)"] = f"{best['eval_bits_per_byte']:.4f} (tune, n=1)"
        row["_mean_bpb"] = best["eval_bits_per_byte"]
        source_summary = tune
    row.update({"paper 60M ppl": ppl if ppl is not None else f"– ({source})",
                "opt state (MB)": source_summary["opt_state_bytes"] / 2**20,
                "trainable params (M)": source_summary["trainable_params"] / 1e6,
                "frozen params (M)": source_summary["frozen_params"] / 1e6,
                "compiled peak, all replicas (MB)":
                    (source_summary["compiled_peak_bytes"] or 0) / 2**20,
                "wall tune + seeds (s)": tune["wall_seconds"] + (seeds or {}).get(
                    "wall_seconds", 0.0)})
    return row


def _orderings(curves: dict[str, list]) -> list[dict]:
    """The ordering of the methods by mean eval loss at each evaluation step they all have."""
    if not curves:
        return []
    steps = sorted(set.intersection(*[{s for s, _, _ in c} for c in curves.values()]))
    out = []
    for step in steps:
        at = {m: next(v for s, v, _ in c if s == step) for m, c in curves.items()}
        out.append({"step": step, "ordering": sorted(at, key=at.get)})
    return out


def _write_outputs(config, workdir: str, tunes: dict, seeds: dict, wall0: float) -> dict:
    rows = [_row(config, n, tunes[n], seeds.get(n)) for n in config.methods if n in tunes]
    tokens_per_step = config.batch_size * config.seq_len
    first = next(iter(tunes.values()))
    title = (f"Pretraining at {config.steps} steps x {config.batch_size} x {config.seq_len} "
             f"tokens ({config.steps * tokens_per_step / 1e6:.2f}M tokens), model {config.model}, "
             f"{first.get('data', {}).get('corpus', '?')}, {first.get('devices', '?')}; lr tuned "
             f"over {tuple(config.lr_factors)} x paper lr"
             + (f" (extended past an edge up to {config.extend_grid} times)"
                if config.get("extend_grid", 0) else "")
             + f", best lr with {config.seeds} seeds")
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    common.write_table(workdir, "pretrain_table", public, title=title)
    tuning = []
    for n in config.methods:
        if n not in tunes:
            continue
        for r in sorted(tunes[n].get("replicas", []), key=lambda r: r["peak_lr"]):
            tuning.append({"method": n, "lr": r["peak_lr"], "phase": r.get("phase", "tune"),
                           "status": r["status"],
                           "eval loss": r["eval_loss"], "eval bits/byte": r["eval_bits_per_byte"],
                           "train loss": r["final_train_loss"]})
    common.write_table(workdir, "tuning", tuning, title="Tuning sweeps (seed "
                       f"{config.seed}): final eval loss per learning rate")
    # every tuned method's curve at its best lr: over its seeds once the seeds phase ran, the
    # tuning replica alone (std 0) before
    every = max(1, config.steps // config.evals)
    curves = {n: _eval_curve(workdir, n, best_replica(tunes[n]), every, config.steps)
              for n in tunes
              if best_replica(tunes[n]) is not None}
    orderings = _orderings(curves)
    stable_since = None
    if orderings:
        final = orderings[-1]["ordering"]
        stable_since = orderings[-1]["step"]
        for o in reversed(orderings):
            if o["ordering"] != final:
                break
            stable_since = o["step"]
    curve_rows = []
    for n, c in curves.items():
        row = {"method": n}
        for s, v, sd in c:
            bits, bits_sd = v / math.log(2), sd / math.log(2)
            row[f"{s * tokens_per_step / 1e3:g}k tok"] = f"{bits:.3f}±{bits_sd:.3f}"
        curve_rows.append(row)
    if curve_rows:
        common.write_table(workdir, "curves", curve_rows, title="Eval bits/byte vs tokens at each "
                           "method's best lr (mean ± std over seeds; ±0 = one seed so far)")
        _plot(workdir, curves, tokens_per_step)
    ranked = sorted([r for r in rows if math.isfinite(r.get("_mean_bpb", math.nan))],
                    key=lambda r: r["_mean_bpb"])
    summary = {"experiment": "pretrain_table", "model": config.model, "steps": config.steps,
               "batch_size": config.batch_size, "seq_len": config.seq_len,
               "lr_factors": list(config.lr_factors),
               "extend_grid": config.get("extend_grid", 0), "seeds": config.seeds,
               "rows": public, "tuning": tuning,
               "curves": {n: [{"step": s, "tokens": s * tokens_per_step, "eval_loss": v,
                               "eval_loss_std": sd} for s, v, sd in c]
                          for n, c in curves.items()},
               "orderings": orderings,
               "ordering_stable_since_step": stable_since,
               "ordering_by_eval_loss": [r["method"] for r in ranked],
               "complete": all(n in (seeds if config.seeds > 1 else tunes)
                               for n in config.methods),
               "wall_seconds": time.perf_counter() - wall0}
    common.write_summary(workdir, summary)
    return summary


def _plot(workdir: str, curves: dict[str, list], tokens_per_step: int) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for n, c in curves.items():
        x = [s * tokens_per_step / 1e6 for s, _, _ in c]
        y = np.array([v for _, v, _ in c]) / math.log(2)
        sd = np.array([d for _, _, d in c]) / math.log(2)
        line, = ax.plot(x, y, "o-", ms=3, label=n)
        ax.fill_between(x, y - sd, y + sd, color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("eval bits/byte (held-out plays)")
    ax.set_title("each method at its best lr, mean ± std over seeds")
    ax.legend(fontsize=7, ncol=2)
    common.savefig(fig, workdir, "curves")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Tunes every method in ``config.methods``, reruns its best lr with seeds and writes the
    tables, the curves and the summary; returns the summary's headline."""
    wall0 = time.perf_counter()
    tunes: dict[str, dict] = {}
    seeds: dict[str, dict] = {}
    for name in config.methods:   # phase 1 for every method first: a tuned table early
        tunes[name] = _tune(config, name, workdir)
        _write_outputs(config, workdir, tunes, seeds, wall0)
    for name in config.methods:
        best = best_replica(tunes[name])
        if best is None or config.seeds < 2:   # seeds=1: the tuning replica is the row
            continue
        seeds[name] = _run_phase(phase_config(config, name, "seeds", best["peak_lr"]),
                                 os.path.join(workdir, name, "seeds"), config.steps)
        _write_outputs(config, workdir, tunes, seeds, wall0)
    summary = _write_outputs(config, workdir, tunes, seeds, wall0)
    return {k: summary[k] for k in ("experiment", "model", "steps", "ordering_by_eval_loss",
                                    "ordering_stable_since_step", "wall_seconds")}
