"""Experiments: one module per study, each exposing ``run(config, workdir) -> dict``.

An experiment module may also expose ``validate(config) -> None`` that raises
:class:`experiments.common.ConfigError` for bad values; ``run.py`` calls it before any work.
"""

from __future__ import annotations

import importlib
import pkgutil
import types

_NOT_EXPERIMENTS = {"common", "finetuning"}


def available() -> list[str]:
    """Names of the experiment modules (valid values of ``config.experiment``)."""
    names = [m.name for m in pkgutil.iter_modules(__path__)]
    return sorted(n for n in names if n not in _NOT_EXPERIMENTS and not n.startswith("_"))


def load(name: str) -> types.ModuleType:
    """Imports ``experiments.<name>``; raises ConfigError naming the valid choices."""
    from experiments.common import ConfigError, suggest

    names = available()
    if name not in names:
        raise ConfigError(f"config.experiment={name!r} is not an experiment.{suggest(name, names)} "
                          f"Valid choices: {', '.join(names)}.")
    return importlib.import_module(f"experiments.{name}")
