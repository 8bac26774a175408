"""Full-rank AdamW baseline: the tiny LLaMA on Shakespeare (CPU, a few minutes).

    python run.py --config=configs/adamw.py
    python run.py --config=configs/adamw.py:llama_60m        # the GaLore paper's 60M setup
    python run.py --config=configs/adamw.py:smoke            # 2 steps
"""

from experiments import common, lm


def get_config(arg=None):
    config = lm.defaults()
    config.optimizer = lm.optimizer_defaults("adamw")
    return common.apply_arg(config, arg, lm.VARIANTS, inactive=lm.inactive_sections)
