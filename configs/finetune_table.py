"""Fine-tuning table (lrx.param methods under a genre shift): pre-train the tiny LLaMA on the
non-tragedies (cached in the workdir), fine-tune on the tragedies with full FT, LoRA, rsLoRA,
PiSSA, OLoRA, LoRA-GA, LoRA-SB, EVA, DoRA, VeRA, RandLoRA, NOLA, SoRA, DyLoRA and WeLore-LRC.

    python run.py --config=configs/finetune_table.py          # defaults (target <= 15 min, 2 CPUs)
    python run.py --config=configs/finetune_table.py:quick    # fewer steps
    python run.py --config=configs/finetune_table.py:smoke    # seconds
    python run.py --config=configs/finetune_table.py:finetune.rank=4,finetune.methods=lora+dora
"""

from experiments import common, finetune_table


def get_config(arg=None):
    config = finetune_table.defaults()
    return common.apply_arg(config, arg, finetune_table.VARIANTS)
