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

import json
import logging as pylogging
import os
import sys

from absl import app, flags, logging

_CONFIG_ARG = flags.DEFINE_string(
    "config", None, "Config file: configs/NAME.py[:ARG]; override values with --config.KEY=VALUE "
    "(or --config.KEY VALUE).")
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


# Filled by _parse_flags: the config-file argument and the --config.KEY=VALUE overrides in
# command-line order (main() loads the file once, applies section switches, then the overrides).
_PARSED: dict = {"config_arg": "config", "overrides": []}


def split_overrides(argv: list[str]) -> tuple[list[str], list[tuple[str, str | None]]]:
    """``(argv without the overrides, [(key, raw value or None)])`` for the ``--config.KEY=VALUE``
    and ``--config.KEY VALUE`` forms (absl's space-separated form; ``None``: a bare
    ``--config.KEY``, true for a bool key)."""
    kept, overrides, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            body = a[len("--config."):]
            if "=" in body:
                key, raw = body.split("=", 1)
                overrides.append((key, raw))
            elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                overrides.append((body, argv[i + 1]))
                i += 1
            else:
                overrides.append((body, None))
        else:
            kept.append(a)
        i += 1
    return kept, overrides


def main(argv: list[str]) -> int:
    install_log_filter()
    if len(argv) > 1:
        _fail(f"unexpected positional arguments: {' '.join(argv[1:])}")
    from experiments.common import ConfigError

    try:
        summary = execute(_PARSED["config_arg"], _PARSED["overrides"], _WORKDIR.value)
    except ConfigError as e:
        _fail(str(e))
    print(json.dumps(summary, indent=2, default=str))
    return 0


def execute(config_arg: str, overrides: list[tuple[str, str | None]],
            workdir: str | None = None) -> dict:
    """Everything ``run.py`` does after parsing its flags, in this process: builds the config
    (:func:`build_config`), validates it, checks the workdir (default
    :func:`default_workdir`), writes ``config.json`` and ``overrides.json``, limits the host BLAS
    threads and returns ``run(config, workdir)``. User errors raise ConfigError."""
    from experiments.common import RESUME_KEYS, prepare_workdir, to_dict, write_json

    config, module = build_config(config_arg, overrides)
    if hasattr(module, "validate"):
        module.validate(config)
    workdir = workdir or default_workdir(config_arg)
    train = config.get("train", {})
    moved = prepare_workdir(workdir, to_dict(config), resume=train.get("resume", True),
                            ignore=getattr(module, "RESUME_KEYS", RESUME_KEYS))
    if moved:
        logging.warning("train.resume=False: moved the previous run in %s to %s", workdir, moved)
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), to_dict(config))
    write_json(os.path.join(workdir, "overrides.json"),
               {"config": config_arg, "overrides": [f"--config.{k}={v}" if v is not None
                                                    else f"--config.{k}" for k, v in overrides]})
    logging.info("experiment=%s workdir=%s", config.experiment, workdir)
    from lrx.train.loop import limit_blas_threads

    limit_blas_threads(1)  # scipy's OpenBLAS threads spin against XLA's (see the function)
    return module.run(config, workdir)


def build_config(config_arg: str, overrides: list[tuple[str, str | None]]):
    """``(config, experiment module)`` for ``--config=FILE[:ARG]`` and the command-line overrides
    ``[(key, raw value)]``: loads the config file once, applies the section switches of the
    experiment (``SECTION_SWITCHES``, e.g. ``optimizer.name``: the section becomes that name's
    own defaults) and then every other override in command-line order, typed like the value it
    replaces (:func:`experiments.common.parse_value`). Raises ConfigError for a missing file, an
    unknown experiment, key or variant, or a value of the wrong type."""
    import experiments
    from experiments.common import ConfigError, suggest

    path, _, arg = config_arg.partition(":")
    if not os.path.isfile(path):
        here = sorted(f"configs/{f}" for f in os.listdir("configs") if f.endswith(".py")
                      and not f.startswith("_")) if os.path.isdir("configs") else []
        raise ConfigError(f"no config file {path!r}.{suggest(path, here)} "
                          f"Configs: {', '.join(here)}.")
    config = _load_config_file(path, arg)
    if "experiment" not in config:
        raise ConfigError("the config has no 'experiment' key. Valid experiments: "
                          + ", ".join(experiments.available()) + ".")
    module = experiments.load(config.experiment)
    switches = getattr(module, "SECTION_SWITCHES", {})
    switched = []
    for key, switch in switches.items():
        given = [raw for k, raw in overrides if k == key]
        if not given or _get(config, key) == given[-1]:
            continue  # not given, or the file already chose it: keep the file's tuned section
        switch(config, given[-1])
        switched.append((key, given[-1]))
    for key, raw in overrides:
        if key in switches and switched and key in dict(switched):
            continue
        _check_key(config, key, module)
        _set_override(config, key, raw)
    for key, value in switched:
        section = key.rsplit(".", 1)[0]
        logging.warning("--config.%s=%s: config.%s is %s's own defaults plus the command "
                        "line (%s)", key, value, section, value,
                        ", ".join(f"{k}={v}" for k, v in config[section].items()))
    config.lock()
    return config, module


def _get(config, key: str):
    node = config
    for part in key.split("."):
        if not hasattr(node, "keys") or part not in node:
            return None
        node = node[part]
    return node


def _check_key(config, key: str, module) -> None:
    """ConfigError naming the closest valid key when ``config`` has no ``key``."""
    from experiments.common import ConfigError, suggest

    node, walked = config, []
    for part in key.split("."):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            where = "config." + ".".join(walked) if walked else "config"
            hint = getattr(module, "section_hint", lambda k: "")(key)
            raise ConfigError(f"--config.{key}: {where} has no key {part!r}.{suggest(part, keys)} "
                              f"Valid keys: {', '.join(sorted(keys))}.{hint}")
        node, walked = node[part], walked + [part]


def _set_override(config, key: str, raw: str | None) -> None:
    """Sets ``config.<key>`` from the command-line text ``raw`` (None: a bare bool flag)."""
    from experiments.common import ConfigError, parse_value

    *parents, leaf = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    old = node[leaf]
    if raw is None:
        if not isinstance(old, bool):
            raise ConfigError(f"--config.{key} needs a value (--config.{key}=VALUE; the default "
                              f"is {old!r})")
        raw = "true"
    if hasattr(old, "keys"):
        raise ConfigError(f"--config.{key}={raw}: config.{key} is a section; set its keys "
                          f"({', '.join(sorted(old.keys()))})")
    value = parse_value(old, raw, f"--config.{key}")
    with config.unlocked():
        node[leaf] = value


def _fail(message: str) -> None:
    print(f"lrx: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing with the ``--config.KEY[=]VALUE`` overrides taken out (``main`` applies
    them to the config it loads once); every user error is one line and exit code 2."""
    argv, overrides = split_overrides(argv)
    _PARSED["overrides"] = overrides
    try:
        out = flags.FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))
    _PARSED["config_arg"] = _CONFIG_ARG.value
    return out


def _load_config_file(path: str, arg: str):
    """``get_config(arg)`` of the config file at ``path`` (the one place a file is loaded by
    path: the command line names it). A ValueError of the file (a bad argument) is a
    ConfigError."""
    import importlib.util

    from experiments.common import ConfigError

    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(f"_lrx_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        return module.get_config(arg) if arg else module.get_config()
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"--config={path}:{arg}: {e}") from None


def _entry() -> None:
    app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
    _entry()
