"""SLTrain pretraining ("SLTrain: a sparse plus low-rank approach for parameter and memory
efficient pretraining", Han et al., arXiv 2406.02214): every attention/MLP matrix becomes
(alpha / r) a @ b + S with S on a fixed random support of density 0.03 (lrx.param.sltrain), AdamW
at lr 3e-3 (the official scripts). The official LLaMA-60M script uses r = 128, alpha = 32 (scale
0.25); the tiny model keeps that scale at rank 32 (alpha = 8). Paper variants: r / alpha =
128/32, 256/16, 256/16, 512/8 for 60M / 130M / 350M / 1B, with the scripts' 11K / 22K / 65K / 140K
steps and 1.1K / 2.2K / 6.5K / 10K warm-up steps, no gradient clipping.

    python run.py --config=configs/sltrain.py
    python run.py --config=configs/sltrain.py:llama_60m
    python run.py --config=configs/sltrain.py:param.density=0.05
    python run.py --config=configs/sltrain.py:smoke
"""

from experiments import common, lm

# andyjm3/SLTrain scripts/llm_pretrain: (rank, alpha, steps, warm-up steps) per model.
PAPER = {"llama_60m": (128, 32.0, 11_000, 1_100), "llama_130m": (256, 16.0, 22_000, 2_200),
         "llama_350m": (256, 16.0, 65_000, 6_500), "llama_1b": (512, 8.0, 140_000, 10_000)}


def _paper(name):
    def apply(c):
        lm.VARIANTS[name](c)  # GaLore's setup (seq 256, batch 512, AdamW, no clipping) ...
        rank, alpha, steps, warmup = PAPER[name]
        c.param.rank, c.param.alpha, c.param.density = rank, alpha, 0.03
        c.train.steps, c.optimizer.warmup_steps = steps, warmup  # ... with SLTrain's schedule
        c.optimizer.learning_rate = 3e-3
    return apply


def get_config(arg=None):
    config = lm.defaults()
    config.optimizer = lm.optimizer_defaults("adamw")
    config.optimizer.learning_rate = 3e-3
    config.param.method = "sltrain"
    config.param.rank = 32
    config.param.alpha = 8.0
    config.param.density = 0.03
    variants = {**lm.VARIANTS, **{name: _paper(name) for name in PAPER}}
    return common.apply_arg(config, arg, variants, inactive=lm.inactive_sections)
