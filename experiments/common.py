"""Shared edges of the experiments: config checks that give clear messages, and output writers
(``summary.json``, Markdown tables, PNG plots). No math lives here."""

from __future__ import annotations

import ast
import difflib
import json
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import ml_collections


class ConfigError(ValueError):
    """A user error in a config: ``run.py`` prints it without a traceback and exits with code 2."""


def suggest(name: str, choices: Iterable[str]) -> str:
    """' Did you mean X?' when ``name`` is close to one of ``choices`` (difflib's close matches,
    or an abbreviation: the initials ``lr`` of ``learning_rate``, a prefix ``warm`` of
    ``warmup_steps``), else ''."""
    name, choices = str(name), [str(c) for c in choices]
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not close and len(name) >= 2:
        lowered = name.lower().replace("-", "_")
        initials = [c for c in choices if "_" in c
                    and "".join(w[0] for w in c.split("_") if w) == lowered]
        prefixes = [c for c in choices if c.lower().startswith(lowered)]
        close = (initials or prefixes)[:1]
    if not close:
        close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return f" Did you mean {close[0]!r}?" if close else ""


def check_choice(value: Any, choices: Sequence[Any], key: str) -> None:
    """Raises ConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(f"config.{key}={value!r} is not valid.{suggest(value, choices)} "
                          f"Valid choices: {', '.join(map(repr, choices))}.")


def seed_key(key: Any, s: int) -> Any:
    """The PRNG key of seed ``s`` of a seeded study (``config.seeds``): seed 0 keeps ``key``
    (the keys of a single-seed run), seed ``s > 0`` is ``fold_in(key, s)``."""
    import jax

    return key if s == 0 else jax.random.fold_in(key, s)


def check_positive(value: Any, key: str, *, allow_zero: bool = False) -> None:
    """Raises ConfigError unless ``value`` is a number > 0 (or >= 0 with ``allow_zero``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"config.{key}={value!r} must be a finite number {bound}.")


def check_keys(config: Mapping[str, Any], schema: Mapping[str, Any], prefix: str = "") -> None:
    """Raises ConfigError if ``config`` has a key that ``schema`` lacks (recursively), naming the
    closest valid key, or if a value's type differs from the schema's (ints pass as floats; a
    schema value of ``None`` accepts anything)."""
    config = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    schema = schema.to_dict() if isinstance(schema, ml_collections.ConfigDict) else schema
    for key, value in config.items():
        path = f"{prefix}{key}"
        if key not in schema:
            raise ConfigError(f"config.{path} is not a known key.{suggest(key, schema.keys())} "
                              f"Valid keys{' under config.' + prefix[:-1] if prefix else ''}: "
                              f"{', '.join(sorted(schema.keys()))}.")
        ref = schema[key]
        if isinstance(ref, Mapping) and not isinstance(value, Mapping):
            raise ConfigError(f"config.{path} must be a section with keys {sorted(ref.keys())}, "
                              f"got {value!r}.")
        if isinstance(ref, Mapping):
            if ref:  # an empty schema section accepts any keys
                check_keys(value, ref, prefix=f"{path}.")
            continue
        if ref is None or value is None:
            continue
        if isinstance(ref, bool) != isinstance(value, bool):
            raise ConfigError(f"config.{path}={value!r} must be a {type(ref).__name__}.")
        if isinstance(ref, float) and isinstance(value, (int, float)):
            continue
        if isinstance(ref, (tuple, list)) and isinstance(value, (tuple, list)):
            continue
        if not isinstance(value, type(ref)):
            raise ConfigError(f"config.{path}={value!r} must be a {type(ref).__name__} "
                              f"(like the default {ref!r}).")


# --- the config-argument grammar -------------------------------------------------------------
# Every config file is ``get_config(arg)`` = its experiment's ``defaults()`` (the schema), its own
# settings, then ``apply_arg(config, arg, VARIANTS)``: ``arg`` is comma-separated tokens, each a
# named variant (a function ``config -> None``) or a typed ``KEY=VALUE``.


def parse_value(old: Any, raw: str, key: str) -> Any:
    """The text ``raw`` as a value of the type of ``old`` (the schema's current value of ``key``).

    bool: ``true/false/1/0``; int; float; str as is; tuple/list: ``a+b+c`` (elements typed like
    ``old``'s first element, strings when ``old`` is empty) or a Python literal ``(1, 2)``;
    ``None``: a Python literal, else the text. Raises ConfigError naming the expected type.
    """
    try:
        if isinstance(old, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if isinstance(old, int):
            return int(raw)
        if isinstance(old, float):
            return float(raw)
        if isinstance(old, str):
            return raw
        if isinstance(old, (tuple, list)):
            text = raw.strip()
            if text[:1] in ("(", "["):
                value = ast.literal_eval(text)
                items = list(value) if isinstance(value, (tuple, list)) else [value]
            else:
                element = old[0] if len(old) else ""
                items = [parse_value(element, part, f"{key}[...]")
                         for part in text.split("+") if part]
            return type(old)(items)
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    except ConfigError:
        raise
    except (ValueError, SyntaxError, TypeError):
        kind = "'+'-separated tuple" if isinstance(old, (tuple, list)) else type(old).__name__
        raise ConfigError(f"{key}={raw}: expected a {kind} (like the default {old!r})") from None


def _leaves(config: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_key(config: ml_collections.ConfigDict, key: str, raw: str,
            inactive: Sequence[str] = ()) -> str:
    """Sets the leaf ``key`` of ``config`` from the text ``raw`` (typed by :func:`parse_value`);
    returns the full dotted key. ``key`` is a dotted path or a bare suffix naming exactly one
    leaf (``rank`` for ``optimizer.rank``); leaves under the section prefixes ``inactive`` lose
    ties (``param.rank`` while no parameterization is chosen)."""
    flat = _leaves(config)
    matches = [k for k in flat if k == key] or [k for k in flat if k.endswith("." + key)]
    if len(matches) > 1:
        active = [k for k in matches if not any(k.startswith(p) for p in inactive)]
        matches = active or matches
    if len(matches) != 1:
        if matches:
            raise ConfigError(f"config argument {key}={raw}: ambiguous, matches "
                              f"{', '.join(matches)}; write the full key.")
        raise ConfigError(f"config argument {key}={raw}: no such key.{suggest(key, flat)} "
                          f"Keys: {', '.join(sorted(flat))}.")
    full = matches[0]
    *parents, leaf = full.split(".")
    node = config
    for part in parents:
        node = node[part]
    value = parse_value(node[leaf], raw, f"config argument {key}")
    node[leaf] = value  # an existing key: allowed on a locked ConfigDict
    return full


def apply_arg(config: ml_collections.ConfigDict, arg: str | None,
              variants: Mapping[str, Any] | None = None,
              inactive: Any = None) -> ml_collections.ConfigDict:
    """Applies a config-file argument (``configs/NAME.py:ARG``) to ``config`` and returns it.

    ``ARG`` is comma-separated tokens, applied left to right: a name of ``variants`` (a function
    ``config -> None``, e.g. ``smoke`` or ``llama_60m``) or ``KEY=VALUE`` (see :func:`set_key`,
    :func:`parse_value`: ``rank=64``, ``train.steps=7``, ``methods=adamw+lora``). ``inactive``:
    an optional function ``config -> section prefixes`` that lose bare-key ties. An unknown
    variant or key raises ConfigError naming the valid choices.
    """
    variants = dict(variants or {})
    for token in (t.strip() for t in (arg or "").split(",") if t.strip()):
        if "=" in token:
            key, value = token.split("=", 1)
            set_key(config, key.strip(), value.strip(), inactive(config) if inactive else ())
        elif token in variants:
            variants[token](config)
        else:
            raise ConfigError(f"unknown config argument {token!r}.{suggest(token, variants)} "
                              f"Valid tokens: {', '.join(variants) or '(no variants)'}, or "
                              "KEY=VALUE for any key of the config.")
    return config


# Keys that may differ between a run and its resumption: how long it runs and how often it logs,
# evaluates and checkpoints. Any other difference means the workdir holds a different run.
RESUME_KEYS = ("train.steps", "train.stop_at", "train.log_every", "train.eval_every",
               "train.checkpoint_every", "train.keep_checkpoints", "train.resume",
               "train.stop_grace_seconds")


def check_models(config: Mapping[str, Any], models: Sequence[str],
                 rank_tables: Sequence[str] = ("ranks",)) -> None:
    """Raises ConfigError unless ``config.models`` is non-empty, each entry is one of ``models``
    and has a rank in every ``config[table]`` of ``rank_tables`` (the benchmarks' model lists)."""
    if not config["models"]:
        raise ConfigError("config.models is empty; valid models: " + ", ".join(models))
    for m in config["models"]:
        check_choice(m, models, "models[...]")
        missing = [t for t in rank_tables if m not in config[t]]
        if missing:
            raise ConfigError(f"config.{' / config.'.join(missing)} has no rank for model {m!r}")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{'a.b': leaf}`` for a nested mapping (ConfigDicts included)."""
    tree = tree.to_dict() if isinstance(tree, ml_collections.ConfigDict) else tree
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any],
                       ignore: Sequence[str] = RESUME_KEYS) -> dict[str, tuple[Any, Any]]:
    """``{key: (old value, new value)}`` for every leaf that differs (a missing leaf is
    ``'<absent>'``), except the keys in ``ignore``. Values compare as JSON."""
    a, b = flatten(to_dict(old)), flatten(to_dict(new))
    missing = "<absent>"
    return {k: (a.get(k, missing), b.get(k, missing)) for k in sorted(set(a) | set(b))
            if k not in ignore and a.get(k, missing) != b.get(k, missing)}


def prepare_workdir(workdir: str, config: Mapping[str, Any], *, resume: bool = True,
                    ignore: Sequence[str] = RESUME_KEYS) -> str | None:
    """Makes sure ``workdir`` may be used by a run of ``config`` (before anything is written).

    A workdir holding another run's ``config.json`` is resumed only if the configs agree except
    for ``ignore`` (run length and logging cadence); otherwise ConfigError names the differing keys
    and the choices. With ``resume=False`` an existing run is moved aside to
    ``<workdir>.old-<time>`` (never deleted) and its path returned; else returns None.
    """
    saved = os.path.join(workdir, "config.json")
    if not resume:
        if not (os.path.isdir(workdir) and os.listdir(workdir)):
            return None
        here = os.path.abspath(os.getcwd())
        if os.path.commonpath([here, os.path.abspath(workdir)]) == os.path.abspath(workdir):
            raise ConfigError(f"--config.train.resume=False would move {workdir}, which holds "
                              "the current directory, aside; pass a sub-directory as --workdir")
        moved = f"{os.path.normpath(workdir)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
        while os.path.exists(moved):
            moved += "x"
        os.replace(workdir, moved)
        os.makedirs(workdir)
        return moved
    if not os.path.exists(saved):
        return None
    try:
        with open(saved) as f:
            old = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"workdir {workdir} has an unreadable config.json ({e}); use a new "
                          "--workdir, or --config.train.resume=False to move the old run aside"
                          ) from None
    diff = config_differences(old, config, ignore)
    if diff:
        shown = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in list(diff.items())[:6])
        more = f" (and {len(diff) - 6} more)" if len(diff) > 6 else ""
        raise ConfigError(
            f"workdir {workdir} holds a run with a different config ({shown}{more}); only the "
            "run length and log/eval/checkpoint intervals may change when resuming. Choices: a "
            "new --workdir, or --config.train.resume=False to move the old run aside to "
            f"{os.path.normpath(workdir)}.old-<time> and start over.")
    return None


def to_dict(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict:
    """A plain, JSON-serialisable dict of a (nested) ConfigDict."""
    if isinstance(config, ml_collections.ConfigDict):
        config = config.to_dict()
    return json.loads(json.dumps(config, default=_json_default))


def _json_default(obj: Any) -> Any:
    try:
        import numpy as np

        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def write_json(path: str, obj: Any) -> None:
    """Writes ``obj`` as indented JSON, atomically (write to a temporary file, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=_json_default)
        f.write("\n")
    os.replace(tmp, path)


def write_summary(workdir: str, summary: Mapping[str, Any]) -> None:
    """Writes ``workdir/summary.json``."""
    write_json(os.path.join(workdir, "summary.json"), dict(summary))


def format_value(value: Any, digits: int = 4) -> str:
    """Compact cell text: floats to ``digits`` significant digits, everything else via str."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}"
    return str(value)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
                   digits: int = 4) -> str:
    """A GitHub Markdown table of ``rows`` (dicts), columns in order of first appearance."""
    if columns is None:
        columns = []
        for row in rows:
            columns.extend(k for k in row if k not in columns)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        cells = (format_value(row.get(c, ""), digits) for c in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(workdir: str, name: str, rows: Sequence[Mapping[str, Any]],
                columns: Sequence[str] | None = None, title: str | None = None,
                digits: int = 4) -> str:
    """Writes ``workdir/<name>.md`` holding a Markdown table (and an optional title); returns it."""
    text = markdown_table(rows, columns, digits)
    if title:
        text = f"## {title}\n\n{text}"
    path = os.path.join(workdir, f"{name}.md")
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return text


def savefig(fig: Any, workdir: str, name: str) -> str:
    """Saves a matplotlib figure as ``workdir/<name>.png`` (150 dpi) and closes it."""
    import matplotlib.pyplot as plt

    path = os.path.join(workdir, f"{name}.png")
    os.makedirs(workdir, exist_ok=True)
    fig.savefig(path, dpi=150, bbox_inches="tight")
    plt.close(fig)
    return path


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (safe on headless machines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
