"""experiments.common: the workdir-integrity rule (what may change when a run resumes)."""

import json
import os

import pytest

from experiments import common
from experiments.common import ConfigError

CONFIG = {"experiment": "lm", "seed": 0,
          "optimizer": {"name": "galore", "learning_rate": 0.01, "rank": 32},
          "train": {"steps": 10, "stop_at": 0, "log_every": 5, "eval_every": 5,
                    "checkpoint_every": 5, "keep_checkpoints": 3, "resume": True}}


def _with(**changes):
    config = json.loads(json.dumps(CONFIG))
    for key, value in changes.items():
        section, leaf = key.split("__")
        config[section][leaf] = value
    return config


def _workdir(tmp_path, config=CONFIG):
    workdir = tmp_path / "run"
    workdir.mkdir()
    common.write_json(str(workdir / "config.json"), config)
    (workdir / "metrics.jsonl").write_text("{}\n")
    return workdir


def test_config_differences_ignore_run_length_and_cadence():
    assert common.config_differences(CONFIG, _with(train__steps=20, train__stop_at=7,
                                                   train__log_every=1, train__eval_every=2,
                                                   train__checkpoint_every=3)) == {}
    assert common.config_differences(CONFIG, _with(optimizer__learning_rate=0.5)) == {
        "optimizer.learning_rate": (0.01, 0.5)}
    new = _with()
    del new["optimizer"]["rank"]
    assert common.config_differences(CONFIG, new) == {"optimizer.rank": (32, "<absent>")}


def test_a_changed_config_is_refused_with_one_line(tmp_path):
    workdir = _workdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        common.prepare_workdir(str(workdir), _with(optimizer__learning_rate=0.5, optimizer__rank=8))
    message = str(info.value)
    assert "\n" not in message
    assert "optimizer.learning_rate: 0.01 -> 0.5; optimizer.rank: 32 -> 8" in message
    assert "a new --workdir, or --config.train.resume=False" in message
    assert json.loads((workdir / "config.json").read_text()) == CONFIG  # not overwritten


def test_run_length_changes_resume(tmp_path):
    workdir = _workdir(tmp_path)
    assert common.prepare_workdir(str(workdir), _with(train__steps=40)) is None
    assert (workdir / "metrics.jsonl").exists()


def test_resume_false_moves_the_old_run_aside(tmp_path):
    workdir = _workdir(tmp_path)
    moved = common.prepare_workdir(str(workdir), _with(optimizer__rank=8), resume=False)
    assert moved.startswith(str(workdir) + ".old-")
    assert json.loads(open(os.path.join(moved, "config.json")).read()) == CONFIG  # kept whole
    assert os.path.exists(os.path.join(moved, "metrics.jsonl"))
    assert os.listdir(workdir) == []


def test_fresh_workdir_is_accepted(tmp_path):
    assert common.prepare_workdir(str(tmp_path / "new"), CONFIG) is None
    assert common.prepare_workdir(str(tmp_path / "new"), CONFIG, resume=False) is None
