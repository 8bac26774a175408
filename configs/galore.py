"""GaLore pretraining (Zhao et al., arXiv 2403.03507) — the main job of lrx.

The paper's recipe: GaLore on the attention and MLP matrices only (AdamW, unprojected, for
embeddings, LM head and norms, at the same learning rate), lr 0.01, scale 0.25, update_proj_gap 200,
warmup then cosine to 10%. Defaults: the tiny LLaMA on Shakespeare (CPU, a few minutes) with rank 32
(a quarter of the hidden size, the paper's 128/512 ratio for LLaMA-60M).

    python run.py --config=configs/galore.py
    python run.py --config=configs/galore.py:llama_60m   # the paper's 60M setup (rank 128)
    python run.py --config=configs/galore.py:rank=64,proj_type=reverse_std
    python run.py --config=configs/galore.py --config.optimizer.projector=randomized
"""

from experiments import common, lm


def get_config(arg=None):
    config = lm.defaults()
    config.optimizer = lm.optimizer_defaults("galore")
    config.optimizer.learning_rate = 0.01
    config.optimizer.rank = 32
    return common.apply_arg(config, arg, lm.VARIANTS, inactive=lm.inactive_sections)
