"""Test settings. float64 is enabled only inside tests that ask for it
(``jax.experimental.enable_x64``), so the library is exercised in its default float32.

Speed of the session (the default suite must run in a few minutes on 2 CPU cores):

- ``pytest`` runs in parallel worker processes (pytest-xdist, ``-n auto --dist loadfile`` in
  setup.cfg: every test file stays in one process, so its module fixtures and jit caches are
  shared); the heaviest files are scheduled first (``HEAVY_FIRST``). ``pytest -n 0`` runs in one
  process.
- XLA:CPU compiles the tests' tiny programs with LLVM optimisation level 0, without the expensive
  LLVM passes and with the classic elemental emitters instead of the MLIR fusion emitters
  (``TEST_XLA_FLAGS``, set before JAX starts and inherited by the subprocesses): compilation
  dominates the suite; measured on the tiny LLaMA train steps of tests/train/test_per_layer.py,
  compile+run CPU 8.8 s -> 2.1 s (opt level 0 alone: 5.7 s), per tiny eager op 65 -> 27 ms.
  Execution of tiny shapes is unaffected in practice. The same operations run (no fast-math;
  float32 results agree to rounding); ``LRX_TEST_XLA_FLAGS=`` (empty) compiles as in production.
- One persistent XLA compilation cache per test process (see ``pytest_configure``).
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TEST_XLA_FLAGS = os.environ.get(
    "LRX_TEST_XLA_FLAGS",
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
    "--xla_cpu_use_fusion_emitters=false")
if TEST_XLA_FLAGS and TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()


def xla_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a child process with ``devices`` fake CPU devices, keeping this session's
    flags (``TEST_XLA_FLAGS`` and whatever the caller set)."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"


# Test files that take the longest (measured, seconds of one process): dispatched to the workers
# first so that the short files fill in at the end (a stale entry only changes the order).
HEAVY_FIRST = (
    "tests/experiments/test_lm_multidevice.py", "tests/test_run.py", "tests/experiments/test_lm.py",
    "tests/models/test_s4.py", "tests/ssm/test_kernels.py", "tests/train/test_per_layer.py",
    "tests/param/test_nodes.py", "tests/param/test_core.py", "tests/optim/test_engine.py",
    "tests/models/test_gpt.py", "tests/train/test_loop.py", "tests/optim/test_subspace.py",
    "tests/models/test_llama.py", "tests/optim/test_nnx.py", "tests/analysis/test_spectra.py",
    "tests/optim/test_galore.py",
)

_CREATED: list[str] = []  # the session's temporary cache folder, removed at the end


def pytest_configure(config):  # noqa: ARG001
    """One persistent XLA compilation cache per test session (``$LRX_TEST_JAX_CACHE`` or a fresh
    temporary folder; under xdist one sub-folder per worker, so that no two processes write the
    same entry at once), shared with the ``run.py`` subprocesses through the environment: the many
    smoke runs of the same tiny models compile once. Results are unchanged (the cache stores the
    compiled executables of identical programs)."""
    import tempfile

    cache = os.environ.get("LRX_TEST_JAX_CACHE")
    if not cache:
        cache = tempfile.mkdtemp(prefix="lrx-jax-cache-")
        _CREATED.append(cache)
        os.environ["LRX_TEST_JAX_CACHE"] = cache  # the xdist workers inherit the folder
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker:
        cache = os.path.join(cache, worker)
        os.makedirs(cache, exist_ok=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_collection_modifyitems(config, items):  # noqa: ARG001
    """Stable re-order: the files of ``HEAVY_FIRST`` first, in that order; the rest as collected."""
    rank = {path: i for i, path in enumerate(HEAVY_FIRST)}

    def key(item):
        path = os.path.relpath(str(item.path), ROOT).replace(os.sep, "/")
        return rank.get(path, len(rank))

    items[:] = sorted(items, key=key)


def pytest_unconfigure(config):  # noqa: ARG001
    import shutil

    for path in _CREATED:
        shutil.rmtree(path, ignore_errors=True)
