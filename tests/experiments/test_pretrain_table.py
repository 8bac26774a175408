"""configs/pretrain_table.py and experiments/pretrain_table.py: argument parsing and validation
(no training; the smoke run is covered by tests/test_run.py)."""

from __future__ import annotations

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
