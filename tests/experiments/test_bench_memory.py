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
    # the targets are for one micro-batch: accumulated rows give none
    accumulated = [r | {"micro_batches": 8} for r in rows]
    assert bench_memory.targets(accumulated) == []


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


# A compiled-HLO excerpt in XLA's text format: a collective on the step, one inside a while body
# of 3 trips (counted 3 times), and one in a conditional branch (the refresh) that calls a
# nested while of 2 trips.
_TRIP = 'backend_config={{"known_trip_count":{{"n":"{}"}}}}'
_HLO = """HloModule jit_step, entry_computation_layout={()->f32[]}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %add.1 = f32[] add(%x, %y)
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %ag = f32[4,8]{1,0} all-gather(f32[4,1]{1,0} %v), channel_id=1, dimensions={1}
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %ag)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %lt = pred[] compare(%a, %b), direction=LT
}

%inner (p: (s32[], bf16[16])) -> (s32[], bf16[16]) {
  %p = (s32[], bf16[16]{0}) parameter(0)
  %ar = bf16[16]{0} all-reduce(bf16[16]{0} %v), channel_id=2, to_apply=%add
  ROOT %t = (s32[], bf16[16]{0}) tuple(%i, %ar)
}

%refresh (p: (f32[8,8])) -> (f32[8,8]) {
  %p = (f32[8,8]{1,0}) parameter(0)
  %g = f32[8,8]{1,0} all-gather(f32[1,8]{1,0} %x), channel_id=3, dimensions={0}
  %w = (s32[], bf16[16]{0}) while(%t0), condition=%cond, body=%inner, {trip2}
  ROOT %t = (f32[8,8]{1,0}) tuple(%g)
}

%keep (p: (f32[8,8])) -> (f32[8,8]) {
  ROOT %p = (f32[8,8]{1,0}) parameter(0)
}

ENTRY %main.1 (a: f32[16,8]) -> f32[] {
  %a = f32[16,8]{1,0} parameter(0)
  %rs = f32[2,8]{1,0} reduce-scatter(f32[16,8]{1,0} %a), channel_id=4, dimensions={0}, to_apply=%add
  %loop = (s32[], f32[4,8]{1,0}) while(%t1), condition=%cond, body=%body, {trip3}
  %c = (f32[8,8]{1,0}) conditional(%pred, %t2, %t3), branch_computations={%keep, %refresh}
  ROOT %s = f32[] constant(0)
}
""".replace("{trip2}", _TRIP.format(2)).replace("{trip3}", _TRIP.format(3))


def test_hlo_collectives_counts_loops_and_refresh_branches():
    got = bench_memory.hlo_collectives(_HLO)
    step, cond = got["step"], got["cond"]
    assert step["all-gather"] == 3 * 4 * 8 * 4          # f32[4,8] result, 3 trips
    assert step["reduce-scatter"] == 16 * 8 * 4          # the operand
    assert step["all-reduce"] == 0
    assert cond["all-gather"] == 8 * 8 * 4
    assert cond["all-reduce"] == 2 * 16 * 2              # bf16[16], 2 trips, inside the branch
    assert cond["reduce-scatter"] == 0
    with pytest.raises(ValueError, match="ENTRY"):
        bench_memory.hlo_collectives("HloModule empty\n")


def test_fsdp_targets_from_rows():
    g = 2.0 ** 30
    base = dict(model="llama_1b", variant="fsdp", devices=8, projected_grad_bytes=4 * g)
    rows = [dict(base, optimizer="adamw", peak_bytes=2 * g, allgather_bytes_refresh=0),
            dict(base, optimizer="galore", peak_bytes=3 * g, allgather_bytes_refresh=4 * g),
            dict(base, optimizer="galore_randomized", peak_bytes=1.5 * g,
                 allgather_bytes_refresh=0.2 * g)]
    got = [(t["measured"], t["met"]) for t in bench_memory.fsdp_targets(rows)]
    assert got == [(0.05, True), (1.0, False), (0.75, True), (1.5, False)]
    # ordinary rows of the same model and optimizer do not count
    assert bench_memory.fsdp_targets([dict(rows[1], variant="ordinary")]) == []


def test_validate_fsdp_keys():
    with pytest.raises(ConfigError, match="fsdp_optimizers.*'adamw'"):
        bench_memory.validate(_config(fsdp_optimizers=("lion",)))
    with pytest.raises(ConfigError, match="fsdp_batch_size=6 must be divisible"):
        bench_memory.validate(_config(fsdp_batch_size=6))


@pytest.mark.slow  # a child process with 8 fake devices compiling three tiny FSDP steps (~40 s)
def test_fsdp_rows_from_a_child_process(tmp_path):
    c = _config(optimizers=(), fsdp_models=("tiny",))
    out = bench_memory.run(c, str(tmp_path))
    import json

    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    by = {r["optimizer"]: r for r in rows}
    assert set(by) == {"adamw", "galore", "galore_randomized"} and out["rows"] == 3
    for r in rows:
        for key in ("devices", "allgather_bytes_refresh", "allgather_bytes_step",
                    "projected_grad_bytes", "peak_bytes"):
            assert key in r
    h, i, _, n_layers, kernels = _shapes(c)
    assert by["galore"]["projected_grad_bytes"] == 4 * n_layers * sum(a * b for a, b in kernels)
    # exact SVD gathers every projected gradient once; the randomized refresh gathers nothing
    assert by["galore"]["allgather_bytes_refresh"] == by["galore"]["projected_grad_bytes"]
    assert by["galore_randomized"]["allgather_bytes_refresh"] == 0
    assert by["galore_randomized"]["allreduce_bytes_refresh"] > 0
    assert by["adamw"]["allgather_bytes_refresh"] == 0
    assert (tmp_path / "fsdp.md").exists()


def test_config_argument_uses_the_shared_grammar():
    from configs import bench_memory as config_file

    c = config_file.get_config("llama_1b,optimizers=adamw+galore_bf16,seq_len=128")
    assert (c.models, c.optimizers, c.seq_len) == (("llama_1b",), ("adamw", "galore_bf16"), 128)
    assert config_file.get_config(None).models == ("llama_1b", "llama_7b")
    with pytest.raises(ConfigError, match="unknown config argument 'llama_13b'"):
        config_file.get_config("llama_13b")
    with pytest.raises(ConfigError):
        config_file.get_config("no_such_key=3")
