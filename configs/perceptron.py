"""Large-step logistic regression vs. the perceptron (Tyurin, arXiv 2412.08424): Thm 3.2's limit,
Thm 4.1's two-point example, the perceptron bounds, the worst-case dataset and Table 1, and the
Fig. 1 analogue on two digits of scikit-learn's bundled 8x8 digits. CPU, about a minute.

    python run.py --config=configs/perceptron.py
    python run.py --config=configs/perceptron.py:smoke          # a few seconds
    python run.py --config=configs/perceptron.py:float32        # the same study in float32

Variant tokens (comma-separated): smoke, float32.
"""

import ml_collections

VARIANTS = ("smoke", "float32")


def get_config(arg=None):
    config = ml_collections.ConfigDict()
    config.experiment = "perceptron"
    config.dtype = "float64"  # the limit studies need float64; 'float32' also runs
    # Fig. 1 analogue and the digits / synthetic rows of Table 1: the paper's step-size grid.
    config.gammas = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
    config.num_steps = 4000
    config.digits = ml_collections.ConfigDict({"positive": 1, "negative": 8})
    config.synthetic = ml_collections.ConfigDict(
        {"n": 1000, "d": 10, "mu": 0.01, "radius": 1.0, "spread": 0.02, "seed": 0})
    # Thm 3.2: theta_t / gamma -> Batch Perceptron iterates (over the same horizons).
    config.limit_gammas = (1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8)
    # Thm 4.1: the two-point example.
    config.two_point_gammas = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6)
    # Thm 5.1 / Table 1: the worst-case dataset.
    config.worst_case = ml_collections.ConfigDict({
        "n": 1000,
        "sizes": (10, 30, 100, 300, 1000, 3000),
        "normalized_gammas": (100.0, 10.0, 1.0, 0.1),
        "gammas": (0.1, 1.0, 10.0, 100.0, 1e3, 1e6),
        "num_steps": 2000,
    })
    config.classical_max_epochs = 2000
    # Wu, Bartlett, Telgarsky & Yu (COLT 2024): gamma = c * T for a budget of T steps (digits).
    config.budget = ml_collections.ConfigDict({
        "steps": (100, 200, 400, 800, 1600, 3200),
        "scales": (0.01, 0.1, 1.0),
        "baseline_gamma": 1.0,
    })

    tokens = [t for t in (arg or "").split(",") if t]
    for token in tokens:
        if token not in VARIANTS:
            raise ValueError(f"unknown config token {token!r}; valid tokens: {', '.join(VARIANTS)}")
        if token == "smoke":
            config.num_steps = 300
            config.synthetic.n = 200
            config.limit_gammas = (1e2, 1e4, 1e6)
            config.worst_case.n = 100
            config.worst_case.sizes = (10, 30)
            config.worst_case.num_steps = 200
            config.classical_max_epochs = 200
            config.budget.steps = (10, 20, 40)
            config.budget.scales = (1.0,)
        if token == "float32":
            config.dtype = "float32"
    return config
