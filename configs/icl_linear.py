"""In-context linear regression (Akyürek et al., arXiv 2211.15661; von Oswald et al., 2212.07677).

    python run.py --config=configs/icl_linear.py              # Fig. 1 analogue, noiseless (CPU)
    python run.py --config=configs/icl_linear.py:noise        # Fig. 2: noise sweep -> ridge lambda
    python run.py --config=configs/icl_linear.py:depth        # Fig. 3: depth sweep 1, 2, 4, 8
    python run.py --config=configs/icl_linear.py:lowrank      # GaLore / low-rank / LoRA attention
    python run.py --config=configs/icl_linear.py:paper        # paper scale (accelerator)
    python run.py --config=configs/icl_linear.py:smoke        # seconds
    python run.py --config=configs/icl_linear.py:depth,train.steps=2000

Tokens combine with commas (``noise,smoke``, ``depth,paper``; one study token at most), and
``KEY=VALUE`` sets any key. ``paper``: d = 8, 40 pairs, 16 layers, hidden 512, 4 heads, batch 64,
Adam lr 1e-4, 500k steps, warm-up 1/5 then cosine.
"""

from experiments import common, icl_linear

STUDIES = ("noise", "depth", "lowrank")


def _study(name):
    def apply(c):
        if c.study in STUDIES and c.study != name:
            raise common.ConfigError(f"config arguments {c.study!r} and {name!r}: choose one "
                                     f"study token of: {', '.join(STUDIES)}")
        c.study = name
        c.lsa.enabled = False
    return apply


def _paper(c):
    c.data.update(dim=8, num_pairs=40)
    c.model.update(num_layers=16, hidden_size=512, num_heads=4)
    c.train.update(steps=500_000, learning_rate=1e-4, warmup_fraction=0.2, log_every=5000)
    c.eval.update(num_prompts=4000, probe_prompts=256)
    c.sweep.depths = (1, 2, 4, 8, 12, 16)
    c.sweep.lowrank = ("dense", "galore:8", "galore:32", "galore:128", "lowrank:8",
                       "lowrank:32", "lowrank:128", "lora:8", "lora:32", "lora:128")
    c.lowrank.update_proj_gap = 500


def _smoke(c):
    c.data.update(dim=2, num_pairs=4)
    c.model.update(num_layers=1, hidden_size=16, num_heads=2)
    c.train.update(steps=4, log_every=2)
    c.eval.update(num_prompts=16, tune_prompts=16, probe_prompts=4, step_grid=4)
    c.sweep.noise = ((0.0, 1.0), (0.5, 1.0))
    c.sweep.noise_lambdas = (0.0, 0.25)
    c.sweep.depths = (1, 2)
    c.sweep.lowrank = ("dense", "galore:1", "lowrank:1", "lora:1")
    c.lsa.update(steps=4, batch_size=8)


VARIANTS = {**{name: _study(name) for name in STUDIES}, "paper": _paper, "smoke": _smoke}


def get_config(arg=None):
    return common.apply_arg(icl_linear.defaults(), arg, VARIANTS)
