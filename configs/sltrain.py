"""SLTrain pretraining ("SLTrain: a sparse plus low-rank approach for parameter and memory
efficient pretraining", Han et al., arXiv 2406.02214): every attention/MLP matrix becomes
(alpha / r) a @ b + S with S on a fixed random support of density 0.03 (lrx.param.sltrain), AdamW
at lr 3e-3 (the official scripts). The official LLaMA-60M script uses r = 128, alpha = 32 (scale
0.25); the tiny model keeps that scale at rank 32 (alpha = 8). Paper variants: r / alpha =
128/32, 256/16, 256/16, 512/8 for 60M / 130M / 350M / 1B.

    python run.py --config=configs/sltrain.py
    python run.py --config=configs/sltrain.py:llama_60m
    python run.py --config=configs/sltrain.py:param.density=0.05
    python run.py --config=configs/sltrain.py:smoke
"""

from experiments import common, lm

PAPER = {"llama_60m": (128, 32.0), "llama_130m": (256, 16.0), "llama_350m": (256, 16.0),
         "llama_1b": (512, 8.0)}


def _paper(name):
    def apply(c):
        lm.VARIANTS[name](c)
        c.param.rank, c.param.alpha = PAPER[name]
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
