"""experiments.bench_memory: rows hold the exact parameter / state bytes (closed forms), the
compiled peak covers the donated arguments, targets are computed from the rows; the lm config's
vocab_size key reaches the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import bench_memory, lm
from experiments.common import ConfigError
from lrx.models.llama import Llama, preset


def _config(**kw):
    c = bench_memory.defaults()
    c.models, c.vocab_size, c.seq_len, c.num_layers, c.block_size = ("tiny",), 256, 16, 2, 256
    c.update(kw)
    return c


def _shapes(c):
    cfg = preset("tiny", vocab_size=c.vocab_size, num_layers=c.num_layers)
    h, i, v, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    kernels = [(h, h)] * 4 + [(h, i), (h, i), (i, h)]
    return h, i, v, n_layers, kernels


def test_rows_have_exact_param_and_state_bytes():
    c = _config()
    h, i, v, n_layers, kernels = _shapes(c)
    n_params = 2 * v * h + h + n_layers * (sum(a * b for a, b in kernels) + 2 * h)
    adamw = bench_memory.measure(c, "tiny", "adamw")
    assert adamw["param_bytes"] == 2 * n_params                     # bf16
    assert adamw["state_bytes"] == 2 * 2 * n_params + 4             # mu, nu in bf16 + count
    # The compiled step reads the donated state and batch: peak >= params + state.
    assert adamw["peak_bytes"] >= adamw["param_bytes"] + adamw["state_bytes"]
    for key in ("model", "optimizer", "per_layer", "state_dtype", "param_bytes", "state_bytes",
                "peak_bytes"):
        assert key in adamw
    # Per-layer GaLore + 8-bit: per layer slice, every tensor of >= 4096 values keeps uint8 codes
    # plus one float32 absmax per block of 256; smaller ones float32 moments; projectors bf16.
    row = bench_memory.measure(c, "tiny", "galore_per_layer_8bit", compile=False)
    rank = c.ranks["tiny"]

    def moments(n):    # bytes of (m, v) for a tensor of n values
        return 2 * (n + 4 * -(-n // 256)) if n >= 4096 else 2 * 4 * n

    per_layer = 0
    for a, b in kernels:   # reverse_std: the projector spans the larger side, R is (min, r)
        per_layer += moments(rank * min(a, b)) + 2 * max(a, b) * rank
    per_layer += 2 * moments(h)                                     # the two norms
    outer = 2 * moments(v * h) + moments(h)
    counts = (n_layers + 1) * 3 * 4          # galore, adam and learning-rate counts (int32)
    assert row["state_bytes"] == n_layers * per_layer + outer + counts
    assert row["per_layer"] and row["state_dtype"] == "8bit"


def test_targets_from_rows():
    g = 2.0 ** 30
    rows = [dict(model="llama_7b", optimizer="adamw", peak_bytes=80 * g),
            dict(model="llama_7b", optimizer="galore_per_layer_8bit", peak_bytes=20 * g),
            dict(model="llama_1b", optimizer="adamw", peak_bytes=10 * g),
            dict(model="llama_1b", optimizer="galore_bf16", peak_bytes=9 * g)]
    got = {t["target"]: (t["measured"], t["met"]) for t in bench_memory.targets(rows)}
    assert len(got) == 3                                            # galore f32 row missing
    values = sorted(got.values())
    assert values == [(0.25, True), (0.9, False), (20.0, True)]


def test_validate_names_the_problem():
    with pytest.raises(ConfigError, match="llama_13b"):
        bench_memory.validate(_config(models=("llama_13b",)))
    with pytest.raises(ConfigError, match="adamw_4bit"):
        bench_memory.validate(_config(optimizers=("adamw_4bit",)))
    bench_memory.validate(_config())


def test_lm_vocab_size_option():
    c = lm.defaults()
    c.model.vocab_size = 32000
    model, cfg = lm.build_model(c, 256)
    assert cfg.vocab_size == 32000
    shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 4), jnp.int32)),
                            jax.random.key(0))
    assert shapes["params"]["embedding"].shape == (32000, cfg.hidden_size)
    c.model.vocab_size = 0                                          # default: the corpus' bytes
    assert lm.build_model(c, 256)[1].vocab_size == 256
    c.model.vocab_size = 100
    with pytest.raises(ConfigError, match="vocab_size=100"):
        lm.validate(c)
    assert isinstance(Llama(preset("llama_7b")), Llama) and np.isfinite(1.0)


def test_config_argument_uses_the_shared_grammar():
    from configs import bench_memory as config_file

    c = config_file.get_config("llama_1b,optimizers=adamw+galore_bf16,seq_len=128")
    assert (c.models, c.optimizers, c.seq_len) == (("llama_1b",), ("adamw", "galore_bf16"), 128)
    assert config_file.get_config(None).models == ("llama_1b", "llama_7b")
    with pytest.raises(ConfigError, match="unknown config argument 'llama_13b'"):
        config_file.get_config("llama_13b")
    with pytest.raises(ConfigError):
        config_file.get_config("no_such_key=3")
