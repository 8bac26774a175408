"""ReLoRA pretraining ("ReLoRA: High-Rank Training Through Low-Rank Updates", Lialin et al., arXiv
2307.05695): LoRA on a frozen random base whose adapters are merged into the base and
re-initialised every `relora_every` steps, with the optimizer moments of the adapters reset and the
learning rate re-warmed over `relora_warmup` steps (jagged schedule), so that the sum of low-rank
updates can reach high rank. Rank 32 on the tiny model, a restart every 150 of the 600 default
steps (4 segments); the paper variants use the papers' ranks and a restart every 5000 steps / 10%
of training, whichever is smaller, with re-warm 100.

A restart zeroes the adapters' optimizer moments only (embedding, norm and LM-head moments are
kept), as the official code (Guitaricet/relora). Paper variants: AdamW lr 1e-3 (torch eps 1e-8),
gradient clipping at 1.0 (the ReLoRA code's --clip_grad_norm default; other recipes do not clip).

Deviations from the paper: no full-rank warm start before the first restart and a full (not 99%
magnitude-pruned) reset of the adapters' optimizer moments.

    python run.py --config=configs/relora.py
    python run.py --config=configs/relora.py:llama_60m
    python run.py --config=configs/relora.py:param.relora_every=100
    python run.py --config=configs/relora.py:smoke
"""

from experiments import common, lm


def _paper(name):
    def apply(c):
        lm.VARIANTS[name](c)  # the paper's setup, with its LoRA rank
        c.param.relora_every = min(5000, c.train.steps // 10)
        c.param.relora_warmup = 100
        c.optimizer.grad_clip = 1.0  # ReLoRA's torchrun_main --clip_grad_norm default
    return apply


def _smoke(c):
    lm.VARIANTS["smoke"](c)
    c.param.relora_every, c.param.relora_warmup = 1, 1


def get_config(arg=None):
    config = lm.defaults()
    config.optimizer = lm.optimizer_defaults("adamw")
    config.param.method = "lora"
    config.param.rank = 32
    config.param.relora_every = 150
    config.param.relora_warmup = 25
    variants = {**lm.VARIANTS, "smoke": _smoke,
                **{name: _paper(name) for name in lm.PAPER_SETUPS}}
    return common.apply_arg(config, arg, variants, inactive=lm.inactive_sections)
