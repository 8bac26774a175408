"""S4 long-range study: S4 (DPLR-LegS) vs S4D-LegS vs random diagonal on the adding problem and
sequential digits (experiments/s4.py).

    python run.py --config=configs/s4.py                 # defaults, <= 15 min on 2 CPU cores
    python run.py --config=configs/s4.py:smoke           # seconds
    python run.py --config=configs/s4.py:long       # adding L=4096 (3000 steps), digits L=1024
    python run.py --config=configs/s4.py:all_inits       # + S4D-Lin and S4D-Inv
    python run.py --config=configs/s4.py --config.adding.length=2048
"""

from experiments import s4

VARIANTS = ("smoke", "long", "all_inits")


def get_config(arg=None):
    c = s4.defaults()
    for token in [t for t in (arg or "").split(",") if t]:
        if token not in VARIANTS:
            raise ValueError(f"unknown variant {token!r} for configs/s4.py; valid: "
                             f"{', '.join(VARIANTS)}")
        if token == "smoke":
            c.tasks = ("adding",)
            c.models = ("s4-legs", "s4d-legs")
            c.model.update(d_model=8, n_layers=1, d_state=16)
            c.adding.update(length=64, steps=2, batch_size=4, eval_size=16, log_every=2)
            c.digits.update(upsample=1, steps=2, batch_size=4, log_every=2)
        elif token == "long":
            c.adding.length = 4096
            c.adding.steps = 3000
            c.digits.upsample = 4
            c.model.chunk_size = 512
        elif token == "all_inits":
            c.models = ("s4-legs", "s4d-legs", "s4d-lin", "s4d-inv", "s4d-random")
    return c
