"""LoRA pretraining on a frozen random base (the "LoRA" baseline of GaLore, arXiv 2403.03507,
Table 2): every attention/MLP matrix becomes W0 + (alpha / r) a @ b with W0 the model's random
init (frozen), a Kaiming-uniform and b = 0 (lrx.param.lora); embeddings, LM head and norms train
densely with AdamW. Rank 32 on the tiny model, alpha = rank (scale 1); the paper variants use the
papers' ranks (128/256/256/512).

    python run.py --config=configs/lora.py
    python run.py --config=configs/lora.py:llama_60m
    python run.py --config=configs/lora.py:param.rank=16,param.alpha=32.0,param.rslora=true
    python run.py --config=configs/lora.py:smoke
"""

from experiments import common, lm


def get_config(arg=None):
    config = lm.defaults()
    config.optimizer = lm.optimizer_defaults("adamw")
    config.param.method = "lora"
    config.param.rank = 32
    # the llama_* variants use the paper's ranks
    return common.apply_arg(config, arg, lm.VARIANTS, inactive=lm.inactive_sections)
