"""Spectral study of low-rank training (lrx.analysis): gradient-rank emergence and projector drift
under AdamW / GaLore / LoRA, intruder dimensions of LoRA vs full fine-tuning, WeLore rank reduction.

    python run.py --config=configs/spectra.py                 # defaults, ~15 min on 2 CPU cores
    python run.py --config=configs/spectra.py:quick           # ~3 min
    python run.py --config=configs/spectra.py:small           # 4x64 model, 64-byte windows
    python run.py --config=configs/spectra.py:smoke           # seconds
    python run.py --config=configs/spectra.py:finetune.lora_ranks=1+8+32,analysis.every=10
"""

from experiments import common, spectra


def get_config(arg=None):
    config = spectra.defaults()
    return common.apply_arg(config, arg, spectra.VARIANTS)
