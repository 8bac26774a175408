"""experiments/finetune_table.py: config validation, and a smoke run of every method (slow)."""

from __future__ import annotations

import json
import os

import pytest

import configs.finetune_table
from experiments import finetune_table
from experiments.common import ConfigError


def get_config(arg=None):
    return configs.finetune_table.get_config(arg)


def test_defaults_validate_and_errors():
    finetune_table.validate(get_config())
    finetune_table.validate(get_config("smoke"))
    with pytest.raises(ConfigError, match="finetune.methods"):
        finetune_table.validate(get_config("finetune.methods=lora+nope"))
    with pytest.raises(ConfigError, match="2 \\* rank"):
        finetune_table.validate(get_config("finetune.rank=40"))
    with pytest.raises(ConfigError, match="target genre"):
        finetune_table.validate(get_config("data.source_val_plays=macbeth"))
    assert set(finetune_table.CLAIMS) == set(finetune_table.METHODS)


@pytest.mark.slow
def test_smoke_every_method_and_cached_pretraining(tmp_path):
    config = get_config("smoke")
    config.finetune.methods = finetune_table.METHODS
    finetune_table.run(config, str(tmp_path))
    summary = json.load(open(tmp_path / "summary.json"))
    names = [r["method"] for r in summary["rows"]]
    assert names[:2] == ["full", "lora"] and "dylora@1" in names and "welore_lrc" in names
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["lora_sb"]["trainable params"] == 7 * 2 * 2          # r^2 per matrix
    assert rows["lora"]["trainable params"] < rows["full"]["trainable params"]
    assert (tmp_path / "finetune_table.md").exists() and (tmp_path / "finetune_table.png").exists()
    assert (tmp_path / "pretrained.msgpack").exists()
    # the cached pre-trained model is reused (same "before" losses, file untouched)
    stamp = os.path.getmtime(tmp_path / "pretrained.msgpack")
    config.finetune.methods = ("lora",)
    finetune_table.run(config, str(tmp_path))
    again = json.load(open(tmp_path / "summary.json"))
    assert again["before"] == summary["before"]
    assert os.path.getmtime(tmp_path / "pretrained.msgpack") == stamp
