"""run.py: every config runs 2 steps (subprocess smoke tests) and user errors fail fast, cleanly."""

import glob
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


@pytest.mark.parametrize("name", CONFIGS)
def test_config_smoke(name, tmp_path):
    """Each config in configs/ runs with its own quick 'smoke' variant (config arg ``smoke``)."""
    out = run_cli(f"--config=configs/{name}:smoke", f"--workdir={tmp_path}")
    assert out.returncode == 0, out.stderr[-4000:]
    assert os.path.exists(tmp_path / "config.json")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary, "empty summary"
