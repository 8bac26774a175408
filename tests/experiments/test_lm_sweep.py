"""The lm experiment's sweep (``config.sweep``, lrx.train.sweep through experiments.lm): the
config grammar and its errors, and a replica of a real-model sweep equal to the same run alone
(ReLoRA: LoRA parameters with frozen bases and the vmapped merge-and-restart hook)."""

import json
import math
import os

import numpy as np
import pytest

from configs import relora
from experiments import common, lm
from experiments.common import ConfigError


def _config(arg="smoke"):
    return common.apply_arg(lm.defaults(), arg, lm.VARIANTS, inactive=lm.inactive_sections)


def test_sweep_grid_from_both_grammars():
    assert lm.sweep_grid(lm._merged(_config())) is None              # default: a single run
    c = _config("smoke,sweep.lr=1e-3+3e-3,sweep.seeds=2,seed=5")
    lm.validate(c)
    assert lm.sweep_grid(lm._merged(c)) == [
        {"peak_lr": 1e-3, "seed": 5}, {"peak_lr": 1e-3, "seed": 6},
        {"peak_lr": 3e-3, "seed": 5}, {"peak_lr": 3e-3, "seed": 6}]
    c = _config("smoke")
    c.sweep.lr = common.parse_value(c.sweep.lr, "(1e-3,3e-2)", "sweep.lr")
    lm.validate(c)
    assert [r["peak_lr"] for r in lm.sweep_grid(lm._merged(c))] == [1e-3, 3e-2]
    c = _config("smoke,sweep.seeds=3")                                # seeds at the config's lr
    assert lm.sweep_grid(lm._merged(c)) == [
        {"peak_lr": c.optimizer.learning_rate, "seed": s} for s in (0, 1, 2)]


@pytest.mark.parametrize("arg,message", [
    ("sweep.lr=0.0+1e-3", r"every learning rate must be a finite number > 0, got '0.0'"),
    ("sweep.lr=-1e-3", r"> 0, got '-1e-3'"),
    ("sweep.lr=1e-3+inf", r"> 0, got 'inf'"),
    ("sweep.lr=1e-3+abc", r"'abc' is not a number"),
    ("sweep.lr=1e-3+1e-3", r"repeats a learning rate"),
    ("sweep.seeds=0", r"sweep.seeds=0 must be an integer >= 1"),
    ("sweep.seeds=2,analysis.every=5", r"does not combine with analysis.every"),
])
def test_sweep_errors(arg, message):
    with pytest.raises(ConfigError, match=message):
        lm.validate(_config("smoke," + arg))


def test_sweep_with_per_layer_is_an_error():
    c = _config("smoke,sweep.lr=1e-3+1e-2,model.scan_layers=True,train.per_layer=True")
    with pytest.raises(ConfigError, match="does not combine with train.per_layer"):
        lm.validate(c)


@pytest.mark.slow
def test_relora_sweep_replica_equals_solo_run(tmp_path):
    """A 2 x 2 (lr x seed) ReLoRA sweep with a restart every step: replica (lr 3e-3, seed 1)
    ends with the eval loss and final train loss of that run done alone."""
    c = relora.get_config("smoke")
    c.train.steps = 3
    c.sweep.lr, c.sweep.seeds = (1e-3, 3e-3), 2
    lm.validate(c)
    swept = lm.run(c, str(tmp_path / "sweep"))
    with open(os.path.join(tmp_path, "sweep", "summary.json")) as f:
        summary = json.load(f)
    rows = summary["replicas"]
    assert [(r["peak_lr"], r["seed"]) for r in rows] == [(1e-3, 0), (1e-3, 1), (3e-3, 0),
                                                         (3e-3, 1)]
    assert all(r["status"] == "done" for r in rows)
    best = min(rows, key=lambda r: r["eval_loss"])
    assert swept["eval_loss"] == best["eval_loss"] and summary["best_replica"] == best["replica"]
    solo = relora.get_config("smoke")
    solo.train.steps, solo.optimizer.learning_rate, solo.seed = 3, 3e-3, 1
    alone = lm.run(solo, str(tmp_path / "alone"))
    np.testing.assert_allclose(rows[3]["eval_loss"], alone["eval_loss"], rtol=1e-5)
    np.testing.assert_allclose(rows[3]["final_train_loss"], alone["final_train_loss"], rtol=1e-5)
    assert not math.isclose(rows[2]["eval_loss"], rows[3]["eval_loss"], rel_tol=1e-6)
    # per-replica bytes in the summary: the solo run's, plus the replica's lr and the injected
    # counter (8 bytes) less a share of the counters every replica shares
    assert abs(summary["opt_state_bytes"] - alone["opt_state_bytes"]) <= 16
    metrics = [json.loads(line) for line in open(tmp_path / "sweep" / "metrics.jsonl")]
    assert {(r["replica"], r["peak_lr"], r["seed"]) for r in metrics if "loss" in r} == {
        (i, r["peak_lr"], r["seed"]) for i, r in enumerate(rows)}
