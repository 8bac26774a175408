"""Seeded S4 and in-context-regression studies: the per-seed aggregation (mean and sample std,
checked against NumPy) and the config checks of ``seeds``. Training K seeds as one program is
tested in tests/train/test_scan.py (each replica equals the run done alone)."""

import numpy as np
import pytest

from experiments import common, icl_linear, s4


def test_icl_mean_rows_averages_floats_with_sample_std_and_keeps_labels():
    rows = [{"variant": "lora:4", "rank": 4, "spd_ols": v, "closest": c}
            for v, c in ((0.1, "ols"), (0.4, "gd1"), (0.7, "ols"))]
    row = icl_linear.mean_rows(rows)
    assert row["variant"] == "lora:4" and row["rank"] == 4 and row["seeds"] == 3
    np.testing.assert_allclose(row["spd_ols"], 0.4)
    np.testing.assert_allclose(row["spd_ols_std"], np.std([0.1, 0.4, 0.7], ddof=1))
    assert "seeds" not in icl_linear.mean_rows(rows[:1])  # one seed: the row as it was


def test_s4_aggregate_counts_solved_seeds_per_model():
    rows = [dict(task="adding", model="s4d-legs", length=512, steps=10, seconds=1.0,
                 train_loss=t, test_mse=m) for t, m in ((0.01, 0.004), (0.02, 0.03))]
    rows.append(dict(task="adding", model="s4d-random", length=512, steps=10, seconds=2.0,
                     train_loss=0.16, test_mse=0.17))
    legs, rand = s4._aggregate(rows)
    assert legs["seeds"] == 2 and legs["solved_seeds"] == 1 and rand["solved_seeds"] == 0
    np.testing.assert_allclose(legs["test_mse"], 0.017)
    np.testing.assert_allclose(legs["test_mse_std"], np.std([0.004, 0.03], ddof=1))
    assert rand["test_mse_std"] == 0.0


def test_seeds_are_checked():
    c = s4.defaults()
    c.seeds = 0
    with pytest.raises(common.ConfigError, match="seeds"):
        s4.validate(c)
    c = icl_linear.defaults()
    c.seeds = 3  # the fig1 study trains one model
    with pytest.raises(common.ConfigError, match="noise, depth and lowrank"):
        icl_linear.validate(c)
    c.study = "lowrank"
    icl_linear.validate(c)
