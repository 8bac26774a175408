"""Large-step logistic regression vs. the perceptron (Tyurin, arXiv 2412.08424): Thm 3.2's limit,
Thm 4.1's two-point example, the perceptron bounds, the worst-case dataset and Table 1, and the
Fig. 1 analogue on two digits of scikit-learn's bundled 8x8 digits. CPU, about a minute.

    python run.py --config=configs/perceptron.py
    python run.py --config=configs/perceptron.py:smoke          # a few seconds
    python run.py --config=configs/perceptron.py:float32        # the same study in float32
    python run.py --config=configs/perceptron.py:smoke,num_steps=100

Variant tokens (comma-separated): smoke, float32; ``KEY=VALUE`` sets any key.
"""

from experiments import common, perceptron


def _smoke(config):
    config.num_steps = 300
    config.synthetic.n = 200
    config.limit_gammas = (1e2, 1e4, 1e6)
    config.worst_case.n = 100
    config.worst_case.sizes = (10, 30)
    config.worst_case.num_steps = 200
    config.classical_max_epochs = 200
    config.budget.steps = (10, 20, 40)
    config.budget.scales = (1.0,)


def _float32(config):
    config.dtype = "float32"


VARIANTS = {"smoke": _smoke, "float32": _float32}


def get_config(arg=None):
    return common.apply_arg(perceptron.defaults(), arg, VARIANTS)
