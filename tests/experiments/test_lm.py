"""The lm experiment: exact resume of the real model, config arguments, schema checks."""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import lm
from experiments.common import ConfigError


def _config(steps, arg="smoke", stop_at=0):
    config = lm.apply_arg(lm.defaults(), arg, lm.VARIANTS)
    config.train.steps = steps
    config.train.stop_at = stop_at
    config.train.checkpoint_every = 0
    return config


def _final_params(workdir, step):
    path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "default"))
    restored = ocp.StandardCheckpointer().restore(path)
    return restored["params"]


def test_llama_resume_is_bit_identical(tmp_path):
    lm.run(_config(6), str(tmp_path / "straight"))
    first = lm.run(_config(6, stop_at=3), str(tmp_path / "resumed"))
    assert first["steps"] == 3 and first["status"] == "stopped by stop_at=3"
    summary = lm.run(_config(6), str(tmp_path / "resumed"))
    assert summary["steps"] == 6
    a = _final_params(tmp_path / "straight", 6)
    b = _final_params(tmp_path / "resumed", 6)
    flat_a = np.concatenate([np.ravel(x) for x in _leaves(a)])
    flat_b = np.concatenate([np.ravel(x) for x in _leaves(b)])
    np.testing.assert_array_equal(flat_a, flat_b)


def _leaves(tree):
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _leaves(tree[k])
    else:
        yield np.asarray(tree)


def test_config_arguments():
    c = lm.apply_arg(lm.defaults(), "llama_60m,steps=7,learning_rate=0.5", lm.VARIANTS)
    assert c.model.preset == "llama_60m" and c.train.steps == 7
    assert c.optimizer.learning_rate == 0.5 and c.data.seq_len == 256


def test_config_argument_errors():
    with pytest.raises(ConfigError, match="unknown config argument 'smok'.*Did you mean 'smoke'"):
        lm.apply_arg(lm.defaults(), "smok", lm.VARIANTS)
    with pytest.raises(ConfigError, match="no such key"):
        lm.apply_arg(lm.defaults(), "rnak=3", lm.VARIANTS)


def test_validate_rejects_unknown_keys_and_bad_values():
    c = lm.defaults()
    c.train.stpes = 3
    with pytest.raises(ConfigError, match="config.train.stpes is not a known key.*'steps'"):
        lm.validate(c)
    c = lm.defaults()
    c.data.val_plays = ("macbeth", "hamlt")
    with pytest.raises(ConfigError, match="Did you mean 'hamlet'"):
        lm.validate(c)
    c = lm.defaults()
    c.data.seq_len = 4096
    with pytest.raises(ConfigError, match="exceeds model preset 'tiny'"):
        lm.validate(c)
    c = lm.defaults()
    c.optimizer.rank = 4  # a GaLore key on an AdamW config
    with pytest.raises(ConfigError, match="optimizer.rank is not a known key"):
        lm.validate(c)


def test_analysis_hook_changes_nothing_in_training(tmp_path):
    off = _config(3)
    on = _config(3)
    on.analysis.every = 1
    lm.run(off, str(tmp_path / "off"))
    lm.run(on, str(tmp_path / "on"))
    a = np.concatenate([np.ravel(x) for x in _leaves(_final_params(tmp_path / "off", 3))])
    b = np.concatenate([np.ravel(x) for x in _leaves(_final_params(tmp_path / "on", 3))])
    np.testing.assert_array_equal(a, b)
    records = [json.loads(line) for line in open(tmp_path / "on" / "metrics.jsonl")]
    assert any(k.startswith("grad/layers_0/attn/q/kernel/effective_rank") for r in records
               for k in r)
    assert not any(k.startswith("grad/") for line in open(tmp_path / "off" / "metrics.jsonl")
                   for k in json.loads(line))
