"""S4 long-range study: S4 (DPLR-LegS) vs S4D-LegS vs random diagonal on the adding problem and
sequential digits (experiments/s4.py).

    python run.py --config=configs/s4.py                 # defaults, <= 15 min on 2 CPU cores
    python run.py --config=configs/s4.py:smoke           # seconds
    python run.py --config=configs/s4.py:long            # adding L=4096 (3000 steps), digits L=1024
    python run.py --config=configs/s4.py:all_inits       # + S4D-Lin and S4D-Inv
    python run.py --config=configs/s4.py:adding512       # adding L=512, 8000 steps, 3 seeds
    python run.py --config=configs/s4.py:adding.length=2048
"""

from experiments import common, s4


def _smoke(c):
    c.tasks = ("adding",)
    c.models = ("s4-legs", "s4d-legs")
    c.model.update(d_model=8, n_layers=1, d_state=16)
    c.adding.update(length=64, steps=2, batch_size=4, eval_size=16, log_every=2)
    c.digits.update(upsample=1, steps=2, batch_size=4, log_every=2)


def _long(c):
    c.adding.length = 4096
    c.adding.steps = 3000
    c.digits.upsample = 4
    c.model.chunk_size = 512


def _all_inits(c):
    c.models = ("s4-legs", "s4d-legs", "s4d-lin", "s4d-inv", "s4d-random")


def _adding512(c):
    # the long-range comparison of the README: 3 seeds per model, one vmapped program each
    c.tasks = ("adding",)
    c.adding.update(length=512, steps=8000, log_every=250)
    c.seeds = 3


VARIANTS = {"smoke": _smoke, "long": _long, "all_inits": _all_inits, "adding512": _adding512}


def get_config(arg=None):
    return common.apply_arg(s4.defaults(), arg, VARIANTS)
