"""Child process of test_lm_multidevice.py: runs lm cases in one process (one JAX start-up) and
appends one JSON line per case event to a results file, flushed at once, so that the parent sees
which case is running when a run hangs.

    python -m tests.experiments.lm_cases OUT_FILE WORKDIR MESH_DATA MESH_FSDP CASE [CASE ...]

CASE is ``<config name>:<scan|unrolled>[:<optimizer key>=<value>]`` (``configs/<config name>.py``).
Each case: the config's ``smoke`` variant with 5 steps, batch 8, ``update_proj_gap=2`` (refreshes
after steps 2 and 4).
"""

import importlib
import json
import os
import sys
import traceback

STEPS, GAP = 5, 2


def case_config(name: str, layout: str, data: int, fsdp: int, setting: str = ""):
    config = importlib.import_module(f"configs.{name}").get_config("smoke")
    config.train.steps, config.train.batch_size, config.train.eval_windows = STEPS, 8, 8
    config.train.log_every, config.train.eval_every, config.train.checkpoint_every = 1, 0, 0
    config.model.scan_layers = layout == "scan"
    config.mesh.data, config.mesh.fsdp = data, fsdp
    if "update_proj_gap" in config.optimizer:
        config.optimizer.update_proj_gap = GAP
    if setting:
        key, value = setting.split("=", 1)
        config.optimizer[key] = type(config.optimizer[key])(value)
    return config


def main(out_file, workdir, data, fsdp, *cases):
    from experiments import lm
    from lrx.train import loop

    def emit(record):
        with open(out_file, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    for case in cases:
        name, layout, *setting = case.split(":")
        emit({"case": case, "event": "start"})
        try:
            config = case_config(name, layout, int(data), int(fsdp), *setting)
            lm.validate(config)
            sub = os.path.join(workdir, "".join(ch if ch.isalnum() else "-" for ch in case))
            lm.run(config, sub)
            losses = [r["loss"] for r in loop.read_metrics(sub) if "loss" in r]
            emit({"case": case, "event": "done", "losses": losses})
        except Exception as e:  # noqa: BLE001 - reported to the parent, which fails the case
            emit({"case": case, "event": "error", "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()[-3000:]})


if __name__ == "__main__":
    main(*sys.argv[1:])
