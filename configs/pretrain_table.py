"""The pretraining comparison table (GaLore arXiv 2403.03507 Table 2 / SLTrain arXiv 2406.02214
Table 1, at our scale): full-rank AdamW, GaLore, FRUGAL, Fira, low-rank, LoRA, ReLoRA and SLTrain
trained for the same number of steps on the same data, one Markdown table (eval loss, bits per
byte, trainable params, optimizer-state bytes, compiled peak memory, tokens/s).

Each method's run config is its own config file (configs/<method>.py, the single source of its
hyperparameters; with ``model=<preset>`` its paper variant); `steps`, `batch_size`, `seq_len`,
`eval_windows` and `seed` are applied to every run so that the comparison is at equal steps and
tokens. ReLoRA restarts `relora_segments` times per run.

    python run.py --config=configs/pretrain_table.py                 # tiny model, CPU (<= 30 min)
    python run.py --config=configs/pretrain_table.py:model=llama_60m # GPU: the papers' 60M recipes
    python run.py --config=configs/pretrain_table.py:methods=adamw+lora,steps=100
    python run.py --config=configs/pretrain_table.py:smoke

Tokens: `smoke`, and KEY=VALUE for any key (`model=<preset>` of tiny, llama_60m, llama_130m,
llama_350m, llama_1b; `steps=<int>`; `methods=<a+b+...>`).
"""

import importlib

from experiments import common, pretrain_table

# Budgets per model: (steps, batch_size, seq_len, eval_windows).
# tiny: 8 runs in <= 30 min on a shared 2-core CPU (~1.5 s per step there). The llama presets: a
# reduced-budget GPU table with the papers' per-method recipes (lr, rank, alpha), sequence length
# 256 as in the papers, 128 sequences per step, 2000 steps.
BUDGETS = {"tiny": (100, 12, 128, 64), "gpu": (2000, 128, 256, 256)}
# smoke: one method only (each lm run compiles its own train step); the pipeline is the same.
SMOKE = (2, 4, 32, 4)
_BUDGET_KEYS = ("steps", "batch_size", "seq_len", "eval_windows")


def get_config(arg=None):
    c = pretrain_table.defaults()
    for key in _BUDGET_KEYS:
        c[key] = None  # None: the model's budget (resolved below)
    smoke = []

    def _smoke(c):
        smoke.append(True)
        for key, value in zip(_BUDGET_KEYS, SMOKE):
            c[key] = value

    common.apply_arg(c, arg, {"smoke": _smoke})
    common.check_choice(c.model, ("tiny", "llama_60m", "llama_130m", "llama_350m", "llama_1b"),
                        "model")
    for name in c.methods:
        common.check_choice(name, pretrain_table.METHODS, "methods[...]")
    budget = BUDGETS["tiny" if c.model == "tiny" else "gpu"]
    for key, value in zip(_BUDGET_KEYS, budget):
        if c[key] is None:
            c[key] = value
        common.check_positive(c[key], key)
    if smoke and c.methods == pretrain_table.METHODS:
        c.methods = ("lora",)
    variant = "smoke" if smoke else (None if c.model == "tiny" else c.model)
    c.runs = {name: importlib.import_module(f"configs.{name}").get_config(variant)
              for name in pretrain_table.METHODS}
    return c
