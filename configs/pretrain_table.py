"""The pretraining comparison table (GaLore arXiv 2403.03507 Table 2 / SLTrain arXiv 2406.02214
Table 1, at our scale): full-rank AdamW, GaLore, FRUGAL, Fira, low-rank, LoRA, ReLoRA and SLTrain
trained for the same number of steps on the same data, one Markdown table (eval loss, bits per
byte, trainable params, optimizer-state bytes, compiled peak memory, tokens/s).

Each method's run config is its own config file (configs/<method>.py, the single source of its
hyperparameters); `steps`, `batch_size`, `seq_len`, `eval_windows` and `seed` below are applied to
every run so that the comparison is at equal steps and tokens. ReLoRA restarts `relora_segments`
times per run.

    python run.py --config=configs/pretrain_table.py                 # tiny model, CPU (<= 30 min)
    python run.py --config=configs/pretrain_table.py:model=llama_60m # GPU: the papers' 60M recipes
    python run.py --config=configs/pretrain_table.py:methods=adamw+lora,steps=100
    python run.py --config=configs/pretrain_table.py:smoke

Tokens: `smoke`, `model=<preset>` (tiny, llama_60m, llama_130m, llama_350m, llama_1b),
`steps=<int>`, `methods=<a+b+...>`.
"""

import importlib.util
import os

import ml_collections

METHODS = ("adamw", "galore", "frugal", "fira", "lowrank", "lora", "relora", "sltrain")
PRESETS = ("tiny", "llama_60m", "llama_130m", "llama_350m", "llama_1b")
_HERE = os.path.dirname(os.path.abspath(__file__))


def _method_config(name, arg):
    spec = importlib.util.spec_from_file_location(f"_lrx_config_{name}",
                                                  os.path.join(_HERE, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def get_config(arg=None):
    smoke, preset, steps, methods = False, "tiny", None, METHODS
    for token in (t.strip() for t in (arg or "").split(",") if t.strip()):
        key, _, value = token.partition("=")
        if token == "smoke":
            smoke = True
        elif key == "model" and value in PRESETS:
            preset = value
        elif key == "steps" and value.isdigit() and int(value) > 0:
            steps = int(value)
        elif key == "methods" and value and all(m in METHODS for m in value.split("+")):
            methods = tuple(value.split("+"))
        else:
            raise ValueError(f"unknown or invalid config argument {token!r}; valid tokens: smoke, "
                             f"model=<{'|'.join(PRESETS)}>, steps=<positive int>, "
                             f"methods=<a+b+... of {', '.join(METHODS)}>")
    c = ml_collections.ConfigDict()
    c.experiment = "pretrain_table"
    c.model = preset
    if preset == "tiny":
        # Budget: 8 runs in <= 30 min on a shared 2-core CPU (~1.5 s per step there).
        c.steps, c.batch_size, c.seq_len, c.eval_windows = 100, 12, 128, 64
    else:
        # A reduced-budget GPU table with the papers' per-method recipes (lr, rank, alpha):
        # sequence length 256 as in the papers, 128 sequences per step, 2000 steps.
        c.steps, c.batch_size, c.seq_len, c.eval_windows = 2000, 128, 256, 256
    if smoke:
        # One method only (each lm run compiles its own train step); the table pipeline is the
        # same for every method.
        c.steps, c.batch_size, c.seq_len, c.eval_windows = 2, 4, 32, 4
        methods = methods if methods != METHODS else ("lora",)
    if steps:
        c.steps = steps
    c.methods = methods
    c.seed = 0
    c.relora_segments = 4
    variant = "smoke" if smoke else (None if preset == "tiny" else preset)
    c.runs = ml_collections.ConfigDict({name: _method_config(name, variant) for name in METHODS})
    return c
