"""run.py: every config runs 2 steps (subprocess smoke tests) and user errors fail fast, cleanly."""

import glob
import importlib
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

CONFIGS = sorted(os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith("_"))


def run_cli(*args, timeout=600):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "run.py"), *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=timeout)


def test_unknown_config_file_is_one_clear_line(tmp_path):
    out = run_cli("--config=configs/does_not_exist.py", f"--workdir={tmp_path}")
    assert out.returncode == 2
    assert "no config file" in out.stderr and "Traceback" not in out.stderr


def _load_config(name, arg):
    return importlib.import_module(f"configs.{name[:-3]}").get_config(arg)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_smoke_variant_validates(name):
    """Every config's ``smoke`` variant names an experiment and passes its validation in-process."""
    import experiments

    config = _load_config(name, "smoke")
    module = experiments.load(config.experiment)
    if hasattr(module, "validate"):
        module.validate(config)


# The smoke runs go through run.execute (everything run.py does after parsing its flags) in this
# process: one JAX start-up, and the session's compilation cache (tests/conftest.py) shares the
# compiled tiny models between them. LM configs that differ from configs/galore.py only in the
# optimizer or parameterization section, and the slowest studies, are `slow` (the optimizers also
# run end to end in tests/experiments/test_lm_multidevice.py); so is the same smoke run of every
# config through a run.py subprocess each. tests/test_run.py keeps one run.py subprocess smoke test
# by default: test_workdir_of_another_config_is_refused_and_console_is_quiet.
SLOW_SMOKE = {"adamw.py", "apollo.py", "fira.py", "frugal.py", "lora.py", "lowrank.py", "relora.py",
              "sltrain.py", "pretrain_table.py", "finetune_table.py", "spectra.py", "s4.py",
              "bench_optim.py", "icl_linear.py"}


def _check_smoke_outputs(workdir):
    assert os.path.exists(workdir / "config.json")
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary, "empty summary"


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_SMOKE
                                  else n for n in CONFIGS])
def test_config_smoke_in_process(name, tmp_path, monkeypatch):
    """Each config in configs/ runs with its own quick 'smoke' variant (config arg ``smoke``)."""
    import run

    monkeypatch.chdir(ROOT)
    run.execute(f"configs/{name}:smoke", [], str(tmp_path))
    _check_smoke_outputs(tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", CONFIGS)
def test_config_smoke(name, tmp_path):
    """Each config in configs/ runs with its own quick 'smoke' variant through run.py."""
    out = run_cli(f"--config=configs/{name}:smoke", f"--workdir={tmp_path}")
    assert out.returncode == 0, out.stderr[-4000:]
    _check_smoke_outputs(tmp_path)


def _error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("lrx: error:")]


@pytest.mark.parametrize("args,message", [
    (["--config=configs/adamw.py", "--config.optimizer.lr=0.1"],
     "config.optimizer has no key 'lr'. Did you mean 'learning_rate'?"),
    (["--config=configs/galore.py", "--config.optimizer.scale=nan"],
     "config.optimizer.scale=nan must be a finite number (default 0.25)."),
    (["--config=configs/galore.py", "--config.optimizer.rank=1000"],
     "config.optimizer.rank=1000 is >= the smaller dimension of every projected matrix"),
    (["--config=configs/adamw.py", "--config.optimizer.rank=8"],
     "('rank' is a key of galore, fira, apollo: add --config.optimizer.name=galore, which brings "
     "its defaults.)"),
    (["--config=configs/adamw.py", "--config.optimizer.name=galore"],  # GaLore's default rank 128
     "config.optimizer.rank=128 is >= the smaller dimension of every projected matrix"),
])
def test_bad_inputs_fail_before_compiling_with_one_line(args, message, tmp_path):
    out = run_cli(*args, f"--workdir={tmp_path / 'w'}", timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    errors = _error_lines(out.stderr)
    assert len(errors) == 1 and message in errors[0], out.stderr[-3000:]
    assert not (tmp_path / "w" / "config.json").exists()


def test_bad_text_file_fails_before_compiling(tmp_path):
    (tmp_path / "tiny.txt").write_bytes(b"hello")
    (tmp_path / "val.txt").write_bytes(b"x" * 1000)
    out = run_cli("--config=configs/adamw.py", "--config.data.source=text_files",
                  f"--config.data.paths={tmp_path / 'tiny.txt'}",
                  f"--config.data.val_paths={tmp_path / 'val.txt'}", f"--workdir={tmp_path / 'w'}",
                  timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    errors = _error_lines(out.stderr)
    assert len(errors) == 1 and "holds 5 bytes, fewer than one window" in errors[0]


@pytest.mark.parametrize("config,switch,extra,expected", [
    ("adamw", "galore", ["--config.optimizer.rank=8"], {"name": "galore", "rank": 8}),
    ("galore", "adamw", [], {"name": "adamw"}),
])
def test_switching_the_optimizer_on_the_command_line(config, switch, extra, expected, tmp_path,
                                                     monkeypatch):
    import run

    monkeypatch.chdir(ROOT)
    _, overrides = run.split_overrides([f"--config.optimizer.name={switch}", *extra,
                                        "--config.train.steps=1"])
    run.execute(f"configs/{config}.py:smoke", overrides, str(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())["optimizer"]
    assert expected.items() <= saved.items()
    if switch == "adamw":
        assert "rank" not in saved  # nothing of GaLore's section is left behind
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["optimizer"] == switch


def test_workdir_of_another_config_is_refused_and_console_is_quiet(tmp_path):
    workdir = tmp_path / "run"
    base = ["--config=configs/galore.py:smoke", "--config.train.steps=2", f"--workdir={workdir}"]
    first = run_cli(*base, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    chatter = [line for line in first.stderr.splitlines() if "orbax" in line or "libtpu" in line]
    assert chatter == [], chatter[:5]
    saved = (workdir / "config.json").read_text()

    changed = run_cli(*base, "--config.optimizer.learning_rate=0.5", timeout=120)
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    errors = _error_lines(changed.stderr)
    assert len(errors) == 1, changed.stderr[-3000:]
    assert "holds a run with a different config (optimizer.learning_rate: 0.01 -> 0.5)" in errors[0]
    assert "--config.train.resume=False" in errors[0]
    assert (workdir / "config.json").read_text() == saved  # never overwritten

    longer = run_cli(*base[:-2], "--config.train.steps=3", base[-1], timeout=300)
    assert longer.returncode == 0, longer.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["resumed_from"] == 2 and summary["steps"] == 3

    restart = run_cli(*base, "--config.optimizer.rank=4", "--config.train.resume=False",
                      timeout=300)
    assert restart.returncode == 0, restart.stderr[-3000:]
    old = [p for p in os.listdir(tmp_path) if p.startswith("run.old-")]
    assert len(old) == 1
    assert json.loads((tmp_path / old[0] / "summary.json").read_text())["steps"] == 3
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["resumed_from"] is None and summary["steps"] == 2
    assert json.loads((workdir / "config.json").read_text())["optimizer"]["rank"] == 4


# --- in-process: the command line's grammar (no subprocess, no JAX compile) -----------------------

def test_space_separated_overrides_switch_the_section_like_equals():
    import run

    argv = ["run.py", "--config=configs/adamw.py:smoke", "--config.optimizer.name", "galore",
            "--config.optimizer.rank", "8", "--config.train.resume", "--workdir=/tmp/x"]
    kept, overrides = run.split_overrides(argv)
    assert kept == ["run.py", "--config=configs/adamw.py:smoke", "--workdir=/tmp/x"]
    assert overrides == [("optimizer.name", "galore"), ("optimizer.rank", "8"),
                         ("train.resume", None)]
    os.chdir(ROOT)
    spaced, _ = run.build_config("configs/adamw.py:smoke", overrides)
    equals, _ = run.build_config("configs/adamw.py:smoke", run.split_overrides(
        ["--config.optimizer.name=galore", "--config.optimizer.rank=8"])[1])
    assert spaced.optimizer.to_dict() == equals.optimizer.to_dict()
    assert spaced.optimizer.name == "galore" and spaced.optimizer.rank == 8
    # the section is GaLore's own defaults plus the command line (the file's AdamW keys are gone)
    assert spaced.optimizer.update_proj_gap == 200 and spaced.optimizer.scale == 0.25
