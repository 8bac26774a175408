"""Test settings. float64 is enabled only inside tests that ask for it
(``jax.experimental.enable_x64``), so the library is exercised in its default float32."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


_CREATED: list[str] = []  # the session's temporary cache folder, removed at the end


def pytest_configure(config):  # noqa: ARG001
    """One persistent XLA compilation cache per test session (``$LRX_TEST_JAX_CACHE`` or a fresh
    temporary folder), shared with the ``run.py`` subprocesses through the environment: the many
    smoke runs of the same tiny models compile once. Results are unchanged (the cache stores the
    compiled executables of identical programs)."""
    import tempfile

    cache = os.environ.get("LRX_TEST_JAX_CACHE")
    if not cache:
        cache = tempfile.mkdtemp(prefix="lrx-jax-cache-")
        _CREATED.append(cache)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", cache)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    import jax

    jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def pytest_unconfigure(config):  # noqa: ARG001
    import shutil

    for path in _CREATED:
        shutil.rmtree(path, ignore_errors=True)
