"""configs/pretrain_table.py and experiments/pretrain_table.py: argument parsing and validation
(no training; the smoke run is covered by tests/test_run.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from configs.pretrain_table import get_config
from experiments import pretrain_table
from experiments.common import ConfigError


def test_runs_share_steps_and_tokens():
    c = get_config("methods=adamw+relora+sltrain,steps=40")
    assert c.methods == ("adamw", "relora", "sltrain")
    runs = {m: pretrain_table.run_config(c, m) for m in c.methods}
    for r in runs.values():
        assert (r.train.steps, r.train.batch_size, r.data.seq_len) == (40, c.batch_size,
                                                                      c.seq_len)
    assert runs["relora"].param.relora_every == 40 // c.relora_segments
    assert runs["sltrain"].param.method == "sltrain" and runs["adamw"].param.method == "none"


def test_gpu_variant_uses_paper_recipes():
    c = get_config("model=llama_60m")
    r = pretrain_table.run_config(c, "sltrain")
    assert r.model.preset == "llama_60m" and (r.param.rank, r.param.alpha) == (128, 32.0)
    assert pretrain_table.run_config(c, "lora").param.rank == 128


def test_bad_tokens_and_values():
    for bad in ("model=gpt5", "steps=0", "methods=adamw+sgd", "fast"):
        with pytest.raises(ValueError, match="(?i)valid (tokens|choices)|must be a finite number"):
            get_config(bad)
    c = get_config("methods=lora")
    c.batch_size = 0
    with pytest.raises(ConfigError, match="batch_size"):
        pretrain_table.validate(c)
    c = get_config("methods=lora")
    c.runs.lora.param.method = "lorax"
    with pytest.raises(ConfigError, match="method 'lora'.*param.method"):
        pretrain_table.validate(c)


# -- v2: the tuning grid, the seeds phase, the GPU protocol, the table's arithmetic ---------------

def test_tune_and_seed_phases():
    c = get_config("methods=galore+apollo_mini+sltrain,steps=100")
    assert c.paper_lr.galore == 1e-2 and c.paper_lr.sltrain == 3e-3 and c.paper_lr.adamw == 1e-3
    tune = pretrain_table.phase_config(c, "galore", "tune")
    assert tune.sweep.lr == (0.003333, 0.01, 0.03) and tune.sweep.seeds == 1
    assert tune.optimizer.update_proj_gap == 2            # 2% of 100 steps (GaLore: 200 of 10K)
    assert tune.train.eval_every == 100 // c.evals == tune.train.checkpoint_every
    seeds = pretrain_table.phase_config(c, "galore", "seeds", best_lr=0.03)
    # seed 0 is the tuning replica: the seeds phase trains seeds 1 and 2
    assert seeds.sweep.lr == (0.03,) and (seeds.seed, seeds.sweep.seeds) == (1, 2)
    mini = pretrain_table.run_config(c, "apollo_mini")
    assert (mini.optimizer.rank, mini.optimizer.scale_type) == (1, "tensor")
    pretrain_table.validate(c)


def test_llama_60m_is_galore_table2_protocol():
    c = get_config("model=llama_60m,methods=adamw+galore")
    r = pretrain_table.phase_config(c, "galore", "tune")
    assert (r.train.steps, r.train.batch_size, r.data.seq_len) == (10_000, 512, 256)
    assert (r.optimizer.warmup_steps, r.optimizer.update_proj_gap, r.optimizer.rank) == (
        1000, 200, 128)
    assert r.optimizer.grad_clip == 0.0 and r.sweep.lr == (0.003333, 0.01, 0.03)
    assert pretrain_table.phase_config(c, "adamw", "tune").sweep.lr == (0.0003333, 0.001, 0.003)


@pytest.mark.parametrize("arg,message", [
    ("lr_factors=1+-2", "lr_factors: -2.0 must be a finite number > 0"),
    ("lr_factors=1+1", "repeats a factor"),
    ("steps=4,evals=8", "evals=8 exceeds steps=4"),
    ("seeds=0", "seeds"),
])
def test_v2_validation(arg, message):
    with pytest.raises(ConfigError, match=message):
        pretrain_table.validate(get_config("methods=lora," + arg))


def _tune_summary(losses, diverged=()):
    reps = [{"replica": i, "peak_lr": lr, "seed": 0,
             "status": "diverged" if lr in diverged else "done",
             "eval_loss": float("nan") if lr in diverged else loss,
             "eval_bits_per_byte": float("nan") if lr in diverged else loss / np.log(2),
             "final_train_loss": loss} for i, (lr, loss) in enumerate(losses.items())]
    return {"replicas": reps, "opt_state_bytes": 2**20, "trainable_params": 2e6,
            "frozen_params": 0, "compiled_peak_bytes": 2**21, "wall_seconds": 10.0}


def test_best_lr_skips_diverged_replicas_and_flags_the_grid_edge():
    c = get_config("methods=lora")
    grid = pretrain_table.lr_grid(c, "lora")
    tune = _tune_summary({grid[0]: 2.0, grid[1]: 1.9, grid[2]: 0.5}, diverged=(grid[2],))
    assert pretrain_table.best_replica(tune)["peak_lr"] == grid[1]
    assert pretrain_table.best_replica(_tune_summary({grid[0]: 1.0}, diverged=(grid[0],))) is None
    edge = _tune_summary({grid[0]: 2.0, grid[1]: 1.9, grid[2]: 1.5})
    losses = [1.5, 1.6, 1.45]                             # seed 0 = the tuning replica (1.5)
    seeds = _tune_summary({grid[2]: 0.0}) | {"replicas": [
        {"seed": s, "eval_bits_per_byte": x / np.log(2), "status": "done"}
        for s, x in enumerate(losses[1:], start=1)]}
    row = pretrain_table._row(c, "lora", edge, seeds)
    assert row["best lr"] == f"{grid[2]:g} (grid edge)"
    bits = np.array(losses) / np.log(2)
    mean, std = bits.mean(), np.sqrt(((bits - bits.mean()) ** 2).sum() / 2)  # n - 1
    assert row["eval bits/byte (mean ± std)"] == f"{mean:.4f} ± {std:.4f} (n=3)"
    assert row["paper 60M ppl"] == 34.99 and row["opt state (MB)"] == 1.0
    assert row["wall tune + seeds (s)"] == 20.0


def test_orderings_per_evaluation():
    curves = {"a": [(10, 3.0, 0), (20, 2.0, 0), (30, 1.5, 0)],
              "b": [(10, 2.5, 0), (20, 2.1, 0), (30, 1.6, 0)]}
    assert pretrain_table._orderings(curves) == [
        {"step": 10, "ordering": ["b", "a"]}, {"step": 20, "ordering": ["a", "b"]},
        {"step": 30, "ordering": ["a", "b"]}]


def test_eval_curve_joins_the_tuning_replica_and_the_seeds(tmp_path):
    def write(sub, rows):
        os.makedirs(tmp_path / "m" / sub)
        with open(tmp_path / "m" / sub / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)

    write("tune", [{"step": 10, "replica": 0, "eval_loss": 9.0},
                   {"step": 10, "replica": 1, "eval_loss": 3.0},
                   {"step": 7, "replica": 1, "eval_loss": 5.0},     # an interrupted run's eval
                   {"step": 20, "replica": 1, "eval_loss": 2.0},
                   {"step": 20, "replica": 1, "loss": 2.5}])
    write("seeds", [{"step": 10, "replica": 0, "eval_loss": 4.0},
                    {"step": 10, "replica": 1, "eval_loss": 3.5},
                    {"step": 20, "replica": 0, "eval_loss": 2.2},
                    {"step": 20, "replica": 1, "eval_loss": 2.4}])
    curve = pretrain_table._eval_curve(str(tmp_path), "m", {"replica": 1}, every=10, last=20)
    assert [s for s, _, _ in curve] == [10, 20]
    for (_, mean, std), values in zip(curve, ([3.0, 4.0, 3.5], [2.0, 2.2, 2.4])):
        assert np.isclose(mean, np.mean(values)) and np.isclose(std, np.std(values, ddof=1))


# -- grid extension past an edge (extend_grid) and the seeds=1 table -----------------------------

def _fake_phases(monkeypatch, losses: dict[float, float], diverged=()):
    """``_run_phase`` replaced by a table of final eval losses per lr; returns the list of
    (phase dir, lrs) it was called with."""
    calls = []

    def run_phase(c, sub, steps):
        lrs = tuple(c.sweep.lr)
        calls.append((os.path.basename(sub), lrs))
        return _tune_summary({lr: losses[lr] for lr in lrs}, diverged=diverged)

    monkeypatch.setattr(pretrain_table, "_run_phase", run_phase)
    return calls


def test_grid_extends_past_the_edge_until_the_best_lr_is_inside(monkeypatch, tmp_path):
    c = get_config("methods=adamw,extend_grid=3")
    pretrain_table.validate(c)
    # paper lr 1e-3, grid 3.333e-4/1e-3/3e-3; the loss falls up to 9e-3 and rises at 2.7e-2
    losses = {3.333e-4: 4.0, 1e-3: 3.0, 3e-3: 2.5, 9e-3: 2.2, 0.027: 2.4, 0.081: 9.0}
    calls = _fake_phases(monkeypatch, losses)
    tune = pretrain_table._tune(c, "adamw", str(tmp_path))
    assert calls == [("tune", (3.333e-4, 1e-3, 3e-3)), ("extend1", (9e-3,)),
                     ("extend2", (0.027,))]                     # 9e-3 bracketed: stop
    best = pretrain_table.best_replica(tune)
    assert (best["peak_lr"], best["phase"]) == (9e-3, "extend1")
    row = pretrain_table._row(c, "adamw", tune, None)
    assert row["best lr"] == "0.009" and row["lr grid"] == "0.0003333/0.001/0.003/0.009/0.027"


def test_grid_extends_downwards_and_stops_at_the_limit_or_a_divergence(monkeypatch, tmp_path):
    c = get_config("methods=adamw,extend_grid=1")
    losses = {1.111e-4: 1.0, 3.333e-4: 2.0, 1e-3: 3.0, 3e-3: 4.0}
    calls = _fake_phases(monkeypatch, losses)
    tune = pretrain_table._tune(c, "adamw", str(tmp_path))
    assert [p for p, _ in calls] == ["tune", "extend1"] and calls[1][1] == (1.111e-4,)
    assert pretrain_table._row(c, "adamw", tune, None)["best lr"] == "0.0001111 (grid edge)"
    # an lr past the top edge that diverges ends the extension (it is not retried)
    c = get_config("methods=adamw,extend_grid=3")
    losses = {3.333e-4: 4.0, 1e-3: 3.0, 3e-3: 2.5, 9e-3: 0.0}
    calls = _fake_phases(monkeypatch, losses, diverged=(9e-3,))
    tune = pretrain_table._tune(c, "adamw", str(tmp_path))
    assert [p for p, _ in calls] == ["tune", "extend1"]
    assert pretrain_table.best_replica(tune)["peak_lr"] == 3e-3
    # extend_grid=0 (the default) runs the grid alone
    calls = _fake_phases(monkeypatch, {3.333e-4: 4.0, 1e-3: 3.0, 3e-3: 2.5})
    pretrain_table._tune(get_config("methods=adamw"), "adamw", str(tmp_path))
    assert [p for p, _ in calls] == ["tune"]


@pytest.mark.parametrize("value", ["-1", "1.5", "True"])
def test_extend_grid_must_be_a_count(value):
    with pytest.raises(ConfigError, match="extend_grid"):
        pretrain_table.validate(get_config("methods=lora,extend_grid=" + value))


def test_one_seed_reports_the_tuning_replica(monkeypatch, tmp_path):
    c = get_config("methods=adamw,seeds=1")
    pretrain_table.validate(c)
    calls = _fake_phases(monkeypatch, {3.333e-4: 4.0, 1e-3: 3.0, 3e-3: 3.5})
    out = pretrain_table.run(c, str(tmp_path))
    assert [p for p, _ in calls] == ["tune"]                  # no seeds phase
    summary = json.load(open(tmp_path / "summary.json"))
    assert summary["complete"] and out["ordering_by_eval_loss"] == ["adamw"]
    assert summary["rows"][0]["eval bits/byte (mean ± std)"] == f"{3.0 / np.log(2):.4f} (tune, n=1)"
