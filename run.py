"""The one entry point of lrx.

    python run.py --config=configs/NAME.py[:ARG] [--config.KEY=VALUE ...] [--workdir=DIR]

Loads the config, dispatches on ``config.experiment`` to ``experiments/<experiment>.py``, validates
the config before any compilation, saves the resolved config (``config.json``) and the command line
(``overrides.json``) in the workdir, and runs ``run(config, workdir) -> summary``. User errors (a
typo'd key, a wrong type, an impossible value) print one message and exit with code 2.
"""

from __future__ import annotations

import json
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


class _QuietLibraries(logging.logging.Filter):
    """Drops the INFO chatter of orbax (one line per file written) from the absl log."""

    def filter(self, record) -> bool:
        return record.levelno >= logging.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> int:
    handler = logging.get_absl_handler()
    for h in (handler, getattr(handler, "python_handler", None)):
        if h is not None:
            h.addFilter(_QuietLibraries())
    if len(argv) > 1:
        _fail(f"unexpected positional arguments: {' '.join(argv[1:])}")
    import experiments
    from experiments.common import ConfigError, to_dict, write_json

    config = _CONFIG.value
    config_arg = _config_arg(sys.argv)
    try:
        if "experiment" not in config:
            raise ConfigError("the config has no 'experiment' key. Valid experiments: "
                              + ", ".join(experiments.available()) + ".")
        module = experiments.load(config.experiment)
        if hasattr(module, "validate"):
            module.validate(config)
    except ConfigError as e:
        _fail(str(e))

    workdir = _WORKDIR.value or default_workdir(config_arg)
    os.makedirs(workdir, exist_ok=True)
    write_json(os.path.join(workdir, "config.json"), to_dict(config))
    write_json(os.path.join(workdir, "overrides.json"),
               {"config": config_arg, "overrides": _overrides(sys.argv)})
    logging.info("experiment=%s workdir=%s", config.experiment, workdir)
    try:
        summary = module.run(config, workdir)
    except ConfigError as e:
        _fail(str(e))
    print(json.dumps(summary, indent=2, default=str))
    return 0


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
            for override in _overrides(argv):
                key = override[len("--config."):].split("=", 1)[0]
                node, walked = base, []
                for part in key.split("."):
                    keys = list(node.keys()) if hasattr(node, "keys") else []
                    if part not in keys:
                        where = "config." + ".".join(walked) if walked else "config"
                        _fail(f"{override}: {where} has no key {part!r}.{suggest(part, keys)} "
                              f"Valid keys: {', '.join(sorted(keys))}.")
                    node, walked = node[part], walked + [part]
        out = flags.FLAGS(argv)
        _ = _CONFIG.value.keys()  # surfaces lazy config-loading errors here
        return out
    except ConfigError as e:
        _fail(str(e))
    except flags.Error as e:
        _fail(str(e))
    return []  # unreachable


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
