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


# --- the config-argument grammar (apply_arg / set_key / parse_value) ------------------------------

def _grammar_config():
    import ml_collections

    c = ml_collections.ConfigDict()
    c.name = "x"
    c.flag = False
    c.train = ml_collections.ConfigDict(dict(steps=10, learning_rate=1e-3, ranks=(1, 4),
                                             methods=("a", "b"), lambdas=(0.5,), empty=()))
    c.optimizer = ml_collections.ConfigDict(dict(rank=8))
    c.param = ml_collections.ConfigDict(dict(rank=4))
    return c


def test_values_are_typed_like_the_schema():
    c = common.apply_arg(_grammar_config(), "steps=7,learning_rate=2,flag=true,name=y,"
                         "ranks=1+8+32,methods=c,lambdas=0.25+1,empty=p+q")
    assert c.train.steps == 7 and isinstance(c.train.steps, int)
    assert c.train.learning_rate == 2.0 and isinstance(c.train.learning_rate, float)
    assert c.flag is True and c.name == "y"
    assert c.train.ranks == (1, 8, 32) and c.train.methods == ("c",)
    assert c.train.lambdas == (0.25, 1.0) and c.train.empty == ("p", "q")
    # the command line (--config.KEY=VALUE) also takes a Python literal for a tuple
    assert common.parse_value((1, 4), "(2, 3)", "train.ranks") == (2, 3)
    assert common.parse_value([1.0], "[2]", "x") == [2]


def test_variants_apply_left_to_right():
    calls = []

    def v(c):
        calls.append(c.train.steps)
        c.train.steps = 99

    c = common.apply_arg(_grammar_config(), "steps=3,v,steps=5", {"v": v})
    assert calls == [3] and c.train.steps == 5


@pytest.mark.parametrize("arg,message", [
    ("smok", r"unknown config argument 'smok'. Did you mean 'smoke'\? Valid tokens: smoke, or "
             r"KEY=VALUE"),
    ("stpes=3", r"config argument stpes=3: no such key. Did you mean 'train.steps'\?"),
    ("rank=3", r"ambiguous, matches optimizer.rank, param.rank"),
    ("steps=3.5", r"config argument steps=3.5: expected a int \(like the default 10\)"),
    ("ranks=1+x", r"expected a int"),
    ("flag=yes", r"expected a bool"),
])
def test_grammar_errors_name_the_choices(arg, message):
    with pytest.raises(ConfigError, match=message):
        common.apply_arg(_grammar_config(), arg, {"smoke": lambda c: None})


def test_inactive_sections_lose_bare_key_ties():
    c = common.apply_arg(_grammar_config(), "rank=3", inactive=lambda c: ("param.",))
    assert c.optimizer.rank == 3 and c.param.rank == 4
    c = common.apply_arg(_grammar_config(), "param.rank=2", inactive=lambda c: ("param.",))
    assert c.param.rank == 2 and c.optimizer.rank == 8


def test_check_models_names_the_problem():
    ok = {"models": ("a",), "ranks": {"a": 1}, "other": {"a": 2}}
    common.check_models(ok, ("a", "b"), ("ranks", "other"))
    with pytest.raises(ConfigError, match="config.models is empty; valid models: a, b"):
        common.check_models({"models": (), "ranks": {}}, ("a", "b"))
    with pytest.raises(ConfigError, match="models"):
        common.check_models({"models": ("c",), "ranks": {"c": 1}}, ("a", "b"))
    with pytest.raises(ConfigError, match="config.other has no rank for model 'a'"):
        common.check_models({"models": ("a",), "ranks": {"a": 1}, "other": {}}, ("a",),
                            ("ranks", "other"))
