"""The one entry point of lrx.

    python run.py --config=configs/NAME.py[:ARG] [--config.KEY=VALUE ...] [--workdir=DIR]

Loads the config, dispatches on ``config.experiment`` to ``experiments/<experiment>.py``, validates
the config before any compilation, checks that the workdir holds no run of another config (a rerun
may change only the run length and the log/eval/checkpoint intervals;
``--config.train.resume=False`` moves an old run aside), saves the resolved config
(``config.json``) and the command line (``overrides.json``) in the workdir, limits the host BLAS
threads, and runs ``run(config, workdir) -> summary``. User errors (a typo'd key, a wrong type, an
impossible value, a workdir of another run) print one message and exit with code 2.

``--config.optimizer.name=NAME`` (any key of an experiment's ``SECTION_SWITCHES``) rebuilds that
section with NAME's own defaults before the section's other overrides are applied, so
``configs/adamw.py --config.optimizer.name=galore --config.optimizer.rank=8`` works.
"""

from __future__ import annotations

import ast
import json
import logging as pylogging
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file: configs/NAME.py[:ARG]; override values with --config.KEY=VALUE.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Output directory (default: runs/<config name>[-<arg>]). A run resumes from "
    "the latest checkpoint found there.")
flags.mark_flag_as_required("config")


def default_workdir(config_arg: str) -> str:
    """``runs/<config name>[-<arg>]`` for ``--config=configs/<name>.py[:<arg>]``."""
    path, _, arg = config_arg.partition(":")
    name = os.path.splitext(os.path.basename(path))[0]
    if arg:
        name += "-" + "".join(c if c.isalnum() or c in "._=-" else "_" for c in arg)
    return os.path.join("runs", name)


def _config_arg(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return "config"


def _overrides(argv: list[str]) -> list[str]:
    return [a for a in argv if a.startswith("--config.")]


_CHATTY = ("/orbax/", "/jax/_src/xla_bridge.py", "/tensorstore/")


class _QuietLibraries(pylogging.Filter):
    """Drops the INFO chatter of orbax (one line per file written) and of JAX's backend probing
    from the absl log; their warnings and errors pass. ``record.levelno`` is a Python logging
    level (absl's own ``logging.WARNING`` constant is an absl verbosity, -1)."""

    def filter(self, record) -> bool:
        return (record.levelno >= pylogging.WARNING
                or not any(part in record.pathname for part in _CHATTY))


def install_log_filter() -> None:
    """Adds :class:`_QuietLibraries` to the absl handler (and the Python handler it wraps)."""
    handler = logging.get_absl_handler()
    for h in (handler, getattr(handler, "python_handler", None)):
        if h is not None and not any(isinstance(f, _QuietLibraries) for f in h.filters):
            h.addFilter(_QuietLibraries())


# Overrides of a switched section, applied in main() after the switch: [(key, raw value)].
_DEFERRED: list[tuple[str, str]] = []
_SWITCHED: list[tuple[str, str]] = []
_ORIGINAL_ARGV: list[str] = []  # the command line when _parse_flags shortened sys.argv


def main(argv: list[str]) -> int:
    install_log_filter()
    if len(argv) > 1:
        _fail(f"unexpected positional arguments: {' '.join(argv[1:])}")
    import experiments
    from experiments.common import RESUME_KEYS, ConfigError, prepare_workdir, to_dict, write_json

    config = _CONFIG.value
    command_line = _ORIGINAL_ARGV or sys.argv
    config_arg = _config_arg(command_line)
    try:
        if "experiment" not in config:
            raise ConfigError("the config has no 'experiment' key. Valid experiments: "
                              + ", ".join(experiments.available()) + ".")
        module = experiments.load(config.experiment)
        for key, value in _SWITCHED:
            getattr(module, "SECTION_SWITCHES", {})[key](config, value)
        for key, raw in _DEFERRED:
            _set_override(config, key, raw)
        if _SWITCHED:
            key, value = _SWITCHED[0]
            section = key.rsplit(".", 1)[0]
            logging.warning("--config.%s=%s: config.%s is %s's own defaults plus the command "
                            "line (%s)", key, value, section, value,
                            ", ".join(f"{k}={v}" for k, v in config[section].items()))
        if hasattr(module, "validate"):
            module.validate(config)
        workdir = _WORKDIR.value or default_workdir(config_arg)
        train = config.get("train", {})
        moved = prepare_workdir(workdir, to_dict(config), resume=train.get("resume", True),
                                ignore=getattr(module, "RESUME_KEYS", RESUME_KEYS))
    except ConfigError as e:
        _fail(str(e))
    if moved:
        logging.warning("train.resume=False: moved the previous run in %s to %s", workdir, moved)

    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), to_dict(config))
    write_json(os.path.join(workdir, "overrides.json"),
               {"config": config_arg, "overrides": _overrides(command_line)})
    logging.info("experiment=%s workdir=%s", config.experiment, workdir)
    from lrx.train.loop import limit_blas_threads

    limit_blas_threads(1)  # scipy's OpenBLAS threads spin against XLA's (see the function)
    try:
        summary = module.run(config, workdir)
    except ConfigError as e:
        _fail(str(e))
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _set_override(config, key: str, raw: str) -> None:
    """Sets ``config.<key>`` from the command-line text ``raw``, typed like the current value."""
    from experiments.common import ConfigError

    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    old = node[leaf]
    try:
        if isinstance(old, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            value = raw.lower() in ("true", "1")
        elif isinstance(old, int):
            value = int(raw)
        elif isinstance(old, float):
            value = float(raw)
        elif isinstance(old, (tuple, list)):
            value = type(old)(ast.literal_eval(raw))
        elif isinstance(old, str):
            value = raw
        else:
            try:
                value = ast.literal_eval(raw)
            except (ValueError, SyntaxError):
                value = raw
    except (ValueError, SyntaxError, TypeError):
        raise ConfigError(f"--config.{key}={raw}: expected a {type(old).__name__} (like the "
                          f"default {old!r})") from None
    with config.unlocked():
        node[leaf] = value


def _fail(message: str) -> None:
    print(f"lrx: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing where every user error (a missing config file, a ConfigError raised by the
    config file, a typo'd override key, a value of the wrong type) is one line and exit code 2."""
    from experiments.common import ConfigError, suggest

    config_arg = _config_arg(argv)
    path, _, arg = config_arg.partition(":")
    if config_arg != "config" and not os.path.isfile(path):
        here = sorted(f"configs/{f}" for f in os.listdir("configs") if f.endswith(".py")
                      and not f.startswith("_")) if os.path.isdir("configs") else []
        _fail(f"no config file {path!r}.{suggest(path, here)} Configs: {', '.join(here)}.")
    try:
        base = _load_config_file(path, arg) if config_arg != "config" else None
        if base is not None:
            argv = _split_switches(base, argv)
            if _SWITCHED:  # config_flags reads its overrides from sys.argv
                _ORIGINAL_ARGV[:] = sys.argv
                sys.argv = list(argv)
            for override in _overrides(argv) + [f"--config.{k}={v}" for k, v in _DEFERRED]:
                key = override[len("--config."):].split("=", 1)[0]
                node, walked = base, []
                for part in key.split("."):
                    keys = list(node.keys()) if hasattr(node, "keys") else []
                    if part not in keys:
                        where = "config." + ".".join(walked) if walked else "config"
                        _fail(f"{override}: {where} has no key {part!r}.{suggest(part, keys)} "
                              f"Valid keys: {', '.join(sorted(keys))}.{_hint(base, key)}")
                    node, walked = node[part], walked + [part]
        out = flags.FLAGS(argv)
        _ = _CONFIG.value.keys()  # surfaces lazy config-loading errors here
        return out
    except ConfigError as e:
        _fail(str(e))
    except flags.Error as e:
        _fail(str(e))
    return []  # unreachable


def _hint(base, key: str) -> str:
    """The experiment's ``section_hint(key)`` (e.g. which optimizer has the key), or ''."""
    import experiments

    try:
        return getattr(experiments.load(base.experiment), "section_hint", lambda k: "")(key)
    except Exception:  # noqa: BLE001 - a hint must never mask the error itself
        return ""


def _split_switches(base, argv: list[str]) -> list[str]:
    """Handles ``--config.<switch key>=VALUE`` (an experiment's ``SECTION_SWITCHES``): applies the
    switch to ``base`` (for the key checks), records it for main(), and takes the switched
    section's overrides out of ``argv`` (main() applies them after the switch)."""
    import experiments

    if "experiment" not in base:
        return argv
    try:
        switches = getattr(experiments.load(base.experiment), "SECTION_SWITCHES", {})
    except Exception:  # noqa: BLE001 - an unknown experiment is reported by main()
        return argv
    kept = list(argv)
    for key, switch in switches.items():
        given = [a for a in argv if a.startswith(f"--config.{key}=")]
        if not given:
            continue
        value = given[-1].split("=", 1)[1]
        node = base
        for part in key.split(".")[:-1]:
            node = node[part]
        if node.get(key.rsplit(".", 1)[1]) == value:
            continue  # the file already chose it: keep the file's tuned section
        switch(base, value)
        _SWITCHED.append((key, value))
        section = key.rsplit(".", 1)[0] + "."
        for a in argv:
            if a.startswith(f"--config.{section}"):
                kept.remove(a)
                name, raw = a[len("--config."):].split("=", 1) if "=" in a else (a, "")
                if name != key:
                    _DEFERRED.append((name, raw))
    return kept


def _load_config_file(path: str, arg: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("_lrx_config_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def _entry() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    _entry()
