"""The pretraining comparison table (GaLore arXiv 2403.03507 Table 2 / SLTrain arXiv 2406.02214
Table 1 / Fira arXiv 2410.01623 / APOLLO arXiv 2412.05270, at our scale): full-rank AdamW, GaLore,
Fira, FRUGAL, APOLLO, APOLLO-Mini, low-rank, LoRA, ReLoRA and SLTrain, each with its learning rate
tuned over a grid around its paper's value (one vmapped sweep per method) and its best lr rerun
with 3 seeds (vmapped), at the same steps and tokens (experiments/pretrain_table.py).

Each method's run config is its own config file (configs/<method>.py; APOLLO-Mini is
configs/apollo.py:mini; with ``model=<preset>`` its paper variant); `steps`, `batch_size`,
`seq_len`, `eval_windows` and `seed` are applied to every run.

    python run.py --config=configs/pretrain_table.py                 # tiny model, CPU
    python run.py --config=configs/pretrain_table.py:model=llama_60m # GPU: GaLore's Table 2
    python run.py --config=configs/pretrain_table.py:methods=adamw+lora,steps=100
    python run.py --config=configs/pretrain_table.py:smoke

Tokens: `smoke`, and KEY=VALUE for any key (`model=<preset>` of tiny, llama_60m, llama_130m,
llama_350m, llama_1b; `steps=<int>`; `methods=<a+b+...>`; `lr_factors=0.333+1+3`; `seeds=3`;
`extend_grid=2`: a best lr at a grid edge runs up to 2 more lrs past it, one at a time).

Budgets. tiny (the default): 200 steps x 8 x 128 bytes (205k tokens per run), 8 evaluations per
run, lr grid (1/3, 1, 3) x paper lr, 3 seeds (seed 0 from the tuning sweep): 10 methods x (3 + 2)
replicas, sized for <= 60 min
on 2 uncontended CPU cores (README "Results: pretraining" has the measured wall time). The llama
presets are GaLore's Table 2 protocol (experiments/lm.py PAPER_SETUPS; each config's paper
variant): 10K / 20K / 60K / 100K steps x 512 x 256 tokens, warm-up 10%, cosine to 10%, the
papers' ranks and per-method recipes, refresh gap 200 (2% of 10K) - one command for the GPU.
"""

import importlib

from experiments import common, lm, pretrain_table

# Budgets per model: (steps, batch_size, seq_len, eval_windows).
BUDGETS = {"tiny": (200, 8, 128, 64)}
BUDGETS.update({name: (steps, 512, 256, 512) for name, (steps, _) in lm.PAPER_SETUPS.items()})
# smoke: one method, a 2-lr sweep and 2 seeds of 2 steps (the pipeline is the same).
SMOKE = (2, 4, 32, 4)
_BUDGET_KEYS = ("steps", "batch_size", "seq_len", "eval_windows")


def _method_config(name: str, variant: str | None):
    module, tokens = pretrain_table.METHOD_CONFIGS[name]
    arg = ",".join([*tokens, *([variant] if variant else [])]) or None
    return importlib.import_module(f"configs.{module}").get_config(arg)


def get_config(arg=None):
    c = pretrain_table.defaults()
    for key in _BUDGET_KEYS:
        c[key] = None  # None: the model's budget (resolved below)
    smoke = []

    def _smoke(c):
        smoke.append(True)
        for key, value in zip(_BUDGET_KEYS, SMOKE):
            c[key] = value
        c.lr_factors, c.seeds, c.evals = (1.0, 3.0), 2, 1

    common.apply_arg(c, arg, {"smoke": _smoke})
    common.check_choice(c.model, ("tiny", "llama_60m", "llama_130m", "llama_350m", "llama_1b"),
                        "model")
    for name in c.methods:
        common.check_choice(name, pretrain_table.METHODS, "methods[...]")
    for key, value in zip(_BUDGET_KEYS, BUDGETS[c.model]):
        if c[key] is None:
            c[key] = value
        common.check_positive(c[key], key)
    if smoke and c.methods == pretrain_table.METHODS:
        c.methods = ("lora",)
    variant = "smoke" if smoke else (None if c.model == "tiny" else c.model)
    c.runs = {name: _method_config(name, variant) for name in pretrain_table.METHODS}
    # the grid's centre: each method's lr in its paper recipe (the llama_60m variant)
    c.paper_lr = {name: float(_method_config(name, "llama_60m").optimizer.learning_rate)
                  for name in pretrain_table.METHODS}
    return c
