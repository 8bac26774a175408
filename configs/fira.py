"""Fira pretraining (Chen et al., arXiv 2410.01623): GaLore's low-rank Adam plus the norm-scaled
full-rank residual with the norm-growth limiter (gamma 1.01). Recipe as GaLore: lr 0.01, scale 0.25,
update_proj_gap 200; rank 32 for the tiny model.

    python run.py --config=configs/fira.py
    python run.py --config=configs/fira.py:llama_60m
    python run.py --config=configs/fira.py:residual=paper
"""

from experiments import common, lm


def get_config(arg=None):
    config = lm.defaults()
    config.optimizer = lm.optimizer_defaults("fira")
    config.optimizer.learning_rate = 0.01
    config.optimizer.rank = 32
    return common.apply_arg(config, arg, lm.VARIANTS, inactive=lm.inactive_sections)
