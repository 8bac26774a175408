"""The lm experiment: exact resume of the real model, config arguments, schema checks."""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from experiments import common, lm
from experiments.common import ConfigError


def _config(steps, arg="smoke", stop_at=0):
    config = common.apply_arg(lm.defaults(), arg, lm.VARIANTS, inactive=lm.inactive_sections)
    config.train.steps = steps
    config.train.stop_at = stop_at
    config.train.checkpoint_every = 0
    return config


def _final_params(workdir, step):
    path = os.path.abspath(os.path.join(workdir, "checkpoints", str(step), "default"))
    restored = ocp.StandardCheckpointer().restore(path)
    return restored["params"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """A 6-step smoke run of the tiny LLaMA (shared by the resume and analysis-hook tests)."""
    workdir = tmp_path_factory.mktemp("straight")
    lm.run(_config(6), str(workdir))
    return workdir


def test_llama_resume_is_bit_identical(straight, tmp_path):
    first = lm.run(_config(6, stop_at=3), str(tmp_path / "resumed"))
    assert first["steps"] == 3 and first["status"] == "stopped by stop_at=3"
    summary = lm.run(_config(6), str(tmp_path / "resumed"))
    assert summary["steps"] == 6
    a = _final_params(straight, 6)
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
    c = common.apply_arg(lm.defaults(), "llama_60m,steps=7,learning_rate=0.5", lm.VARIANTS)
    assert c.model.preset == "llama_60m" and c.train.steps == 7
    assert c.optimizer.learning_rate == 0.5 and c.data.seq_len == 256


def test_config_argument_errors():
    with pytest.raises(ConfigError, match="unknown config argument 'smok'.*Did you mean 'smoke'"):
        common.apply_arg(lm.defaults(), "smok", lm.VARIANTS)
    with pytest.raises(ConfigError, match="no such key"):
        common.apply_arg(lm.defaults(), "rnak=3", lm.VARIANTS)


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


def test_analysis_hook_changes_nothing_in_training(straight, tmp_path):
    on = _config(6)
    on.analysis.every = 1
    lm.run(on, str(tmp_path / "on"))
    a = np.concatenate([np.ravel(x) for x in _leaves(_final_params(straight, 6))])
    b = np.concatenate([np.ravel(x) for x in _leaves(_final_params(tmp_path / "on", 6))])
    np.testing.assert_array_equal(a, b)
    records = [json.loads(line) for line in open(tmp_path / "on" / "metrics.jsonl")]
    assert any(k.startswith("grad/layers_0/attn/q/kernel/effective_rank") for r in records
               for k in r)
    assert not any(k.startswith("grad/") for line in open(straight / "metrics.jsonl")
                   for k in json.loads(line))


# --- bad inputs fail before compiling, with one line naming the problem and the choices ---------

def _text_config(tmp_path, train: bytes | None, val: bytes | None, same=False):
    c = lm.defaults()
    c.data.source = "text_files"
    train_path, val_path = tmp_path / "train.txt", tmp_path / "val.txt"
    if train is not None:
        train_path.write_bytes(train)
    if val is not None:
        val_path.write_bytes(val)
    c.data.paths = str(train_path)
    c.data.val_paths = str(train_path if same else val_path)
    return c


@pytest.mark.parametrize("train,val,same,message", [
    (b"", b"x" * 1000, False, r"the training text \(1 file\(s\)\) holds 0 bytes, fewer than one "
                              r"window of data.seq_len \+ 1 = 129 bytes; add text or lower"),
    (b"hello", b"x" * 1000, False, r"training text \(1 file\(s\)\) holds 5 bytes"),
    (b"x" * 1000, b"", False, r"data.val_paths=.*the validation text \(1 file\(s\)\) holds 0"),
    (b"x" * 1000, None, True, r"data.paths and data.val_paths both name .*train.txt: validation "
                              r"files are held out of training.*point data.val_paths at other"),
    (None, b"x" * 1000, False, r"data.paths=.*matches no training file; give a glob of existing"),
])
def test_bad_text_files_fail_in_validate(tmp_path, train, val, same, message):
    with pytest.raises(ConfigError, match=message):
        lm.validate(_text_config(tmp_path, train, val, same))


def test_text_files_long_enough_pass(tmp_path):
    lm.validate(_text_config(tmp_path, b"x" * 200, b"y" * 200))


@pytest.mark.parametrize("key,value,message", [
    ("scale", float("nan"), r"config.optimizer.scale=nan must be a finite number \(default 0.25\)"),
    ("learning_rate", float("inf"), r"optimizer.learning_rate=inf must be a finite number"),
    ("scale", -1.0, r"optimizer.scale=-1.0 must be a finite number > 0"),
    ("b2", 1.0, r"optimizer.b2=1.0 must satisfy 0 <= b2 < 1"),
])
def test_nan_and_out_of_range_hyperparameters(key, value, message):
    c = lm.defaults()
    lm.switch_optimizer(c, "galore")
    c.optimizer.rank = 8
    c.optimizer[key] = value
    with pytest.raises(ConfigError, match=message):
        lm.validate(c)


def test_frugal_density_range():
    c = lm.defaults()
    lm.switch_optimizer(c, "frugal")
    c.optimizer.density = 0.0
    with pytest.raises(ConfigError, match=r"density=0.0 must satisfy 0 < density <= 1"):
        lm.validate(c)


@pytest.mark.parametrize("rank", [128, 1000])
def test_rank_that_reduces_no_projected_matrix_is_an_error(rank):
    c = lm.defaults()
    lm.switch_optimizer(c, "galore")
    c.optimizer.rank = rank
    with pytest.raises(ConfigError, match=rf"optimizer.rank={rank} is >= the smaller dimension of "
                       r"every projected matrix \(layers_0/attn/k/kernel 128x128.*below 128"):
        lm.validate(c)
    c.model.scan_layers = True  # stacked (layers, m, n) kernels: the matrix is the last two axes
    with pytest.raises(ConfigError, match=r"\(layers/attn/k/kernel 128x128"):
        lm.validate(c)


def test_rank_report_warns_naming_the_unreduced_matrices():
    projected = {"a/kernel": (64, 256), "b/kernel": (6, 16, 512), "c/kernel": (256, 256)}
    error, warning = lm.rank_report(8, projected)
    assert error is None and warning is None
    error, warning = lm.rank_report(64, projected)
    assert error is None
    assert warning == ("optimizer.rank=64 does not reduce 2 of the 3 projected matrices "
                       "(a/kernel 64x256, b/kernel 16x512): they keep full-rank optimizer state; "
                       "choose optimizer.rank below 16 to reduce all")
    error, _ = lm.rank_report(256, projected)
    assert error and "every projected matrix" in error


def test_rank_warning_is_logged_once(caplog, monkeypatch):
    monkeypatch.setattr(lm, "rank_report", lambda *a: (None, "optimizer.rank=9 does not reduce"))
    monkeypatch.setattr(lm, "_warned", set())
    c = lm.defaults()
    lm.switch_optimizer(c, "galore")
    c.optimizer.rank = 9
    with caplog.at_level("WARNING", logger="lrx.lm"):
        lm.validate(c)
        lm.validate(c)
    assert [r.getMessage() for r in caplog.records].count("optimizer.rank=9 does not reduce") == 1


def test_switching_the_optimizer_brings_its_own_keys():
    c = lm.defaults()  # AdamW
    lm.switch_optimizer(c, "galore")
    assert c.optimizer.rank == 128 and c.optimizer.update_proj_gap == 200
    c.optimizer.rank = 8
    lm.validate(c)
    lm.switch_optimizer(c, "adamw")  # back: no GaLore key is left behind
    assert "rank" not in c.optimizer
    lm.validate(c)
    with pytest.raises(ConfigError, match=r"optimizer.name='galroe' is not valid.*'galore'"):
        lm.switch_optimizer(c, "galroe")


def test_a_key_of_another_optimizer_names_its_owner():
    c = lm.defaults()
    c.optimizer.density = 0.5
    with pytest.raises(ConfigError, match=r"optimizer.density is not a known key.*'density' is a "
                       r"key of frugal: switch with --config.optimizer.name=frugal"):
        lm.validate(c)


def test_abbreviated_keys_get_a_suggestion():
    from experiments.common import suggest

    keys = lm.optimizer_defaults("galore").keys()
    assert suggest("lr", keys) == " Did you mean 'learning_rate'?"
    assert suggest("wd", keys) == " Did you mean 'weight_decay'?"
    assert suggest("rnak", keys) == " Did you mean 'rank'?"
    assert suggest("zzz", keys) == ""


# --- recipes: ReLoRA's restart and the paper variants' hyperparameters ----------------------------

def _relora_state():
    import jax
    import jax.numpy as jnp
    import optax

    import lrx.param
    from lrx.train import loop

    key = jax.random.key(0)
    params = {"embed": jax.random.normal(key, (10, 4)),
              "layers_0": {"attn": {"q": {"kernel": jax.random.normal(jax.random.key(1), (4, 6))}},
                           "norm": jnp.ones((4,))}}
    params = lrx.param.apply(params, [(r".*attn/q/kernel", lrx.param.lora(rank=2))], key)
    trainable, frozen = lrx.param.partition(params)
    b1, b2 = 0.9, 0.999
    optimizer = optax.chain(optax.clip_by_global_norm(1e6), optax.adamw(1e-3, b1=b1, b2=b2))
    state = loop.create_state(trainable, optimizer, seed=0, frozen=frozen)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), trainable)
    _, opt_state = optimizer.update(grads, state.opt_state, trainable)
    return state.replace(opt_state=opt_state), b1, b2


def test_relora_restart_resets_only_the_adapters_moments():
    import jax

    state, b1, b2 = _relora_state()
    hook = lm._relora_hook(ml_collections_dict(relora_every=3), seed=0)
    restarted, record = hook(3, state, None)
    assert record == {"relora_restart": 1}
    adam = restarted.opt_state[1][0]
    # One Adam step from zero with gradient 0.5: mu = (1 - b1) 0.5, nu = (1 - b2) 0.25 (closed
    # form) on the dense leaves; the adapters' moments are zero after the restart.
    np.testing.assert_allclose(np.asarray(adam.mu["embed"]), (1 - b1) * 0.5, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(adam.nu["embed"]), (1 - b2) * 0.25, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(adam.mu["layers_0"]["norm"]), (1 - b1) * 0.5,
                               rtol=1e-6)
    lora_mu = adam.mu["layers_0"]["attn"]["q"]["kernel"]
    lora_nu = adam.nu["layers_0"]["attn"]["q"]["kernel"]
    leaves = jax.tree.leaves(lora_mu) + jax.tree.leaves(lora_nu)
    assert len(leaves) == 4 and all(np.all(np.asarray(x) == 0) for x in leaves)
    before = state.opt_state[1][0]
    assert all(np.all(np.asarray(x) != 0) for x in jax.tree.leaves(
        before.mu["layers_0"]["attn"]["q"]["kernel"]))  # they were not zero before
    assert int(adam.count) == int(before.count) == 1  # counters kept: schedules continue
    # and the adapters themselves were merged and re-initialised (LoRA b = 0 again)
    assert np.all(np.asarray(restarted.params["layers_0"]["attn"]["q"]["kernel"].b) == 0)


def ml_collections_dict(**kv):
    import ml_collections

    return ml_collections.ConfigDict(kv)


PAPER_CONFIGS = ("adamw", "galore", "fira", "frugal", "apollo", "lowrank", "lora", "sltrain")


@pytest.mark.parametrize("name", PAPER_CONFIGS)
@pytest.mark.parametrize("size", sorted(lm.PAPER_SETUPS))
def test_paper_variants_do_not_clip(name, size):
    import importlib

    c = importlib.import_module(f"configs.{name}").get_config(size)
    assert c.optimizer.grad_clip == 0.0
    assert c.model.preset == size and c.data.seq_len == 256 and c.train.batch_size == 512
    assert c.optimizer.min_lr_ratio == 0.1 and c.optimizer.weight_decay == 0.0
    assert c.optimizer.warmup_steps == c.train.steps // 10 or name == "sltrain"
    lm.validate(c)  # the recipe is a valid config (e.g. FRUGAL's block_order reaches lrx.optim)


def test_paper_variants_follow_the_official_scripts():
    import importlib

    def get(name, arg):
        return importlib.import_module(f"configs.{name}").get_config(arg)

    f = get("frugal", "llama_60m").optimizer  # FRUGAL scripts: block_adamw, descending
    assert (f.subspace, f.block_order, f.learning_rate, f.eps, f.density, f.update_proj_gap,
            f.state_free, f.reset_on_refresh) == ("blocks", "descending", 1e-3, 1e-8, 0.25, 200,
                                                  "signsgd", True)
    g = get("galore", "llama_130m")
    assert (g.optimizer.learning_rate, g.optimizer.scale, g.optimizer.rank,
            g.optimizer.update_proj_gap, g.train.steps, g.optimizer.warmup_steps) == (
        0.01, 0.25, 256, 200, 20_000, 2_000)
    assert get("fira", "llama_350m").optimizer.scale == 0.25
    assert get("fira", "llama_1b").optimizer.scale == 0.0625
    a = get("apollo", "llama_60m").optimizer
    assert (a.learning_rate, a.rank, a.scale, a.scale_type) == (0.01, 128, 1.0, "channel")
    for arg in ("mini,llama_60m", "llama_60m,mini"):
        m = get("apollo", arg).optimizer
        assert (m.rank, m.scale, m.scale_type) == (1, 128.0, "tensor")
    w = get("adamw", "llama_60m").optimizer
    assert (w.learning_rate, w.eps) == (1e-3, 1e-8)
    s = get("sltrain", "llama_130m")
    assert (s.param.rank, s.param.alpha, s.train.steps, s.optimizer.warmup_steps,
            s.optimizer.learning_rate) == (256, 16.0, 22_000, 2_200, 3e-3)
    r = get("relora", "llama_60m")
    assert r.optimizer.grad_clip == 1.0 and r.param.relora_warmup == 100  # ReLoRA's own code
    assert r.param.relora_every == 1000 and r.param.rank == 128


def test_validate_has_no_side_effects(monkeypatch):
    """lm.validate starts no jax.distributed and builds no mesh (both happen in lm.run)."""
    import jax

    from lrx.train import sharding

    def forbidden(*a, **k):
        raise AssertionError("called during validate")

    monkeypatch.setattr(jax.distributed, "initialize", forbidden)
    monkeypatch.setattr(sharding, "make_mesh", forbidden)
    c = lm.defaults()
    c.multihost = True
    lm.validate(c)
    c.multihost = False
    c.mesh.data = 3  # checked without a mesh: 3 devices asked for, 1 available
    with pytest.raises(ConfigError, match=r"mesh data=3 x fsdp=1 = 3 devices, but 1 are available"):
        lm.validate(c)
    c.mesh.data, c.train.eval_windows = 0, 63
    assert lm.check_mesh(c, 1) == 1
    with pytest.raises(ConfigError, match=r"train.eval_windows=63 is not divisible by the "
                       r"data-parallel size 2"):
        lm.check_mesh(c, 2)


def test_builder_exposes_the_newer_param_methods():
    import jax

    import lrx.param

    for method in ("sora", "dylora", "randlora"):
        c = _config(2)
        c.param.method, c.param.rank = method, 4
        lm.validate(c)
    c = _config(2)
    c.param.method = "lora_ga"
    with pytest.raises(ConfigError, match=r"param.method='lora_ga' initialises from data "
                       r"statistics.*finetune_table.py.*'sora', 'dylora'"):
        lm.validate(c)
    c = _config(2)
    c.param.method, c.param.rank = "sora", 4
    s = lm.build(c)
    nodes = [x for x in jax.tree.leaves(s.params, is_leaf=lrx.param.is_node)
             if isinstance(x, lrx.param.SoRA)]
    assert len(nodes) == 7 * s.model_config.num_layers  # q, k, v, o, gate, up, down per layer
    state = s.optimizer.init(s.params)
    assert any(type(x).__name__ == "SoRAProximalState" for x in jax.tree.leaves(
        state, is_leaf=lambda x: type(x).__name__ == "SoRAProximalState"))


def _per_layer_config(per_layer, micro_batches=1, **optimizer):
    config = _config(3, "smoke,scan")
    config.train.micro_batches = micro_batches
    lm.switch_optimizer(config, "galore")
    config.optimizer.rank = 4
    config.optimizer.update_proj_gap = 2  # a refresh at steps 0 and 2
    config.optimizer.grad_clip = 0.0
    for key, value in optimizer.items():
        config.optimizer[key] = value
    config.train.per_layer = per_layer
    return config


@pytest.mark.parametrize("micro", [1, 2])
def test_per_layer_training_matches_the_ordinary_step(tmp_path, micro):
    """train.per_layer=True (lrx.train.per_layer through lm.run and loop.train's step_fn) gives
    the ordinary step's parameters for GaLore on the scanned tiny LLaMA, with and without
    gradient accumulation (micro=2: layer-major accumulation against the ordinary scan)."""
    lm.run(_per_layer_config(False, micro), str(tmp_path / "ordinary"))
    summary = lm.run(_per_layer_config(True, micro), str(tmp_path / "per_layer"))
    assert summary["steps"] == 3
    a = np.concatenate([np.ravel(x) for x in _leaves(_final_params(tmp_path / "ordinary", 3))])
    b = np.concatenate([np.ravel(x) for x in _leaves(_final_params(tmp_path / "per_layer", 3))])
    np.testing.assert_allclose(b, a, rtol=0, atol=2e-5 * np.abs(a).max())
    initial = lm.build(_per_layer_config(False)).params
    moved = np.abs(a - np.concatenate([np.ravel(x) for x in _leaves(initial)])).max()
    assert moved > 1e-4  # training moved the parameters, so the equality above is not vacuous


def test_per_layer_refuses_what_it_cannot_reproduce():
    c = _per_layer_config(True)
    c.model.scan_layers = False
    with pytest.raises(ConfigError, match="per_layer=True needs model.scan_layers=True"):
        lm.validate(c)
    c = _per_layer_config(True)
    lm.switch_optimizer(c, "frugal")
    c.optimizer.subspace = "blocks"
    with pytest.raises(ConfigError, match="per_layer=True: .*blocks"):
        lm.validate(c)
