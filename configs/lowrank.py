"""Low-rank pretraining from scratch, W = U V on every attention/MLP matrix (the "Low-Rank"
baseline of GaLore, arXiv 2403.03507, Table 2, and SLTrain, arXiv 2406.02214, Table 1), with AdamW.
U, V start from the spectral split of the model's own dense init (lrx.param.lowrank); embeddings,
LM head and norms stay dense. Rank 32 on the tiny model (a quarter of the hidden size, the papers'
128/512 ratio for LLaMA-60M); the paper variants use the papers' ranks (128/256/256/512).

    python run.py --config=configs/lowrank.py
    python run.py --config=configs/lowrank.py:llama_60m
    python run.py --config=configs/lowrank.py:param.rank=16,param.init=kaiming
    python run.py --config=configs/lowrank.py:smoke
"""

from experiments import common, lm


def get_config(arg=None):
    config = lm.defaults()
    config.optimizer = lm.optimizer_defaults("adamw")
    config.param.method = "lowrank"
    config.param.rank = 32
    # the llama_* variants use the paper's ranks
    return common.apply_arg(config, arg, lm.VARIANTS, inactive=lm.inactive_sections)
