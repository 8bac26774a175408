"""Tests of lrx.analysis.spectra against closed forms and NumPy float64 re-derivations."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lrx.analysis import spectra


def _orthogonal(rng, n, p=None):
    q, r = np.linalg.qr(rng.standard_normal((n, p or n)))
    return q * np.sign(np.diag(r))


def _matrix_with_spectrum(rng, m, n, s):
    u = _orthogonal(rng, m, len(s))
    v = _orthogonal(rng, n, len(s))
    return (u * np.asarray(s)) @ v.T


# ----------------------------------------------------------------------------- singular values
def test_singular_values_exact_matches_numpy_on_a_stacked_batch():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 12, 7))
    got = spectra.singular_values(jnp.asarray(x, jnp.float32))
    want = np.linalg.svd(x, compute_uv=False)
    assert got.shape == (3, 7)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(spectra.singular_values(jnp.asarray(x[0]), 3), want[0, :3],
                               rtol=1e-5)


def test_randomized_top_k_matches_exact_on_decaying_spectrum():
    rng = np.random.default_rng(1)
    s = 0.7 ** np.arange(40)
    x = np.stack([_matrix_with_spectrum(rng, 80, 60, s), _matrix_with_spectrum(rng, 80, 60, 2 * s)])
    got = jax.jit(lambda a, key: spectra.singular_values(a, 8, method="randomized", key=key))(
        jnp.asarray(x, jnp.float32), jax.random.key(0))
    want = np.linalg.svd(x, compute_uv=False)[:, :8]
    assert got.shape == (2, 8)
    np.testing.assert_allclose(got, want, rtol=1e-3)


def test_randomized_svd_reconstructs_a_low_rank_matrix():
    rng = np.random.default_rng(2)
    x = _matrix_with_spectrum(rng, 50, 30, [5.0, 3.0, 2.0, 1.0])
    u, s, vt = spectra.randomized_svd(jnp.asarray(x, jnp.float32), 4, jax.random.key(1))
    np.testing.assert_allclose((u * s) @ vt, x, atol=1e-4)
    np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-5)


def test_singular_values_input_errors():
    with pytest.raises(ValueError, match="valid choices"):
        spectra.singular_values(jnp.ones((3, 3)), method="lanczos")
    with pytest.raises(ValueError, match="needs both k and key"):
        spectra.singular_values(jnp.ones((3, 3)), 2, method="randomized")
    with pytest.raises(ValueError, match="k must be in"):
        spectra.singular_values(jnp.ones((3, 3)), 4)
    with pytest.raises(ValueError, match="at least 2 axes"):
        spectra.singular_values(jnp.ones(3))


# ----------------------------------------------------------------------------- rank metrics
def test_effective_rank_closed_forms():
    s_identity = spectra.singular_values(jnp.eye(16))
    np.testing.assert_allclose(spectra.effective_rank(s_identity), 16.0, rtol=1e-4)
    rank_one = np.outer(np.arange(1.0, 9.0), np.linspace(-1, 1, 5))
    np.testing.assert_allclose(spectra.effective_rank(spectra.singular_values(
        jnp.asarray(rank_one, jnp.float32))), 1.0, atol=1e-4)


def test_effective_rank_matches_rankme_formula():
    rng = np.random.default_rng(3)
    s = np.abs(rng.standard_normal((4, 10)))
    p = s / s.sum(-1, keepdims=True) + 1e-7
    want = np.exp(-(p * np.log(p)).sum(-1))
    np.testing.assert_allclose(jax.jit(spectra.effective_rank)(jnp.asarray(s, jnp.float32)),
                               want, rtol=1e-5)


def test_stable_rank_closed_forms():
    rng = np.random.default_rng(4)
    q = _orthogonal(rng, 12)
    np.testing.assert_allclose(spectra.stable_rank(spectra.singular_values(
        jnp.asarray(q, jnp.float32))), 12.0, rtol=1e-5)
    rank_one = np.outer(rng.standard_normal(9), rng.standard_normal(6))
    np.testing.assert_allclose(spectra.stable_rank(spectra.singular_values(
        jnp.asarray(rank_one, jnp.float32))), 1.0, rtol=1e-4)
    x = rng.standard_normal((10, 7))
    want = np.linalg.norm(x, "fro") ** 2 / np.linalg.norm(x, 2) ** 2
    np.testing.assert_allclose(spectra.stable_rank(spectra.singular_values(
        jnp.asarray(x, jnp.float32))), want, rtol=1e-5)
    assert float(spectra.stable_rank(jnp.zeros(4))) == 0.0


def test_energy_and_rank_at_energy():
    s = jnp.asarray([1.0, 3.0, 2.0, 0.0])     # unsorted on purpose; energies 9, 4, 1, 0 of 14
    np.testing.assert_allclose(spectra.top_r_energy(s, 1), 9 / 14, rtol=1e-6)
    np.testing.assert_allclose(spectra.top_r_energy(s, 2), 13 / 14, rtol=1e-6)
    np.testing.assert_allclose(spectra.top_r_energy(s, 10), 1.0, rtol=1e-6)
    assert int(spectra.rank_at_energy(s, 0.5)) == 1
    assert int(spectra.rank_at_energy(s, 9 / 14)) == 1
    assert int(spectra.rank_at_energy(s, 0.9)) == 2
    assert int(spectra.rank_at_energy(s, 0.95)) == 3
    assert int(spectra.rank_at_energy(s, 1.0)) == 3
    batch = jnp.asarray([[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]])
    np.testing.assert_array_equal(spectra.rank_at_energy(batch, 0.6), [3, 1])
    np.testing.assert_allclose(jax.jit(spectra.top_r_energy, static_argnums=1)(batch, 2),
                               [0.5, 1.0])


def test_top_r_energy_is_what_a_rank_r_projector_keeps():
    rng = np.random.default_rng(5)
    g = rng.standard_normal((20, 12))
    u = np.linalg.svd(g)[0][:, :4]
    want = np.linalg.norm(u.T @ g) ** 2 / np.linalg.norm(g) ** 2
    got = spectra.top_r_energy(spectra.singular_values(jnp.asarray(g, jnp.float32)), 4)
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ----------------------------------------------------------------------------- subspaces
def test_principal_angles_between_known_subspaces():
    e = np.eye(4)
    a = e[:, :2]                                          # span(e1, e2)
    theta = 0.3
    b = np.stack([e[:, 0], math.cos(theta) * e[:, 1] + math.sin(theta) * e[:, 2]], axis=1)
    np.testing.assert_allclose(spectra.principal_angles(jnp.asarray(a), jnp.asarray(b)),
                               [0.0, theta], atol=2e-3)
    np.testing.assert_allclose(spectra.subspace_overlap(jnp.asarray(a), jnp.asarray(b)),
                               (1 + math.cos(theta) ** 2) / 2, rtol=1e-6)
    # Orthogonal subspaces, non-orthonormal bases of the same space.
    np.testing.assert_allclose(spectra.principal_angles(jnp.asarray(a), jnp.asarray(e[:, 2:])),
                               [math.pi / 2] * 2, atol=1e-6)
    scaled = jnp.asarray(a @ np.array([[2.0, 1.0], [0.0, 3.0]]))
    np.testing.assert_allclose(spectra.subspace_overlap(jnp.asarray(a), scaled), 1.0, rtol=1e-6)


def test_principal_angles_match_numpy_on_random_batch():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((3, 10, 3))
    b = rng.standard_normal((3, 10, 4))
    want = []
    for i in range(3):
        qa, qb = np.linalg.qr(a[i])[0], np.linalg.qr(b[i])[0]
        want.append(np.arccos(np.clip(np.linalg.svd(qa.T @ qb, compute_uv=False), 0, 1)))
    got = jax.jit(spectra.principal_angles)(jnp.asarray(a, jnp.float32),
                                            jnp.asarray(b, jnp.float32))
    np.testing.assert_allclose(got, np.array(want), atol=2e-3)
    with pytest.raises(ValueError, match="same space"):
        spectra.principal_angles(jnp.ones((4, 2)), jnp.ones((5, 2)))


# ----------------------------------------------------------------------------- WeLore
def _welore_reference(s, tau):
    s = np.asarray(s, np.float64)
    t = (s - s.min()) / (s.max() - s.min())
    return np.mean(t < tau)


def test_welore_rank_reduction_matches_definition():
    rng = np.random.default_rng(7)
    s = np.sort(np.abs(rng.standard_cauchy(50)))[::-1]
    for tau in (0.01, 0.1, 0.3):
        np.testing.assert_allclose(spectra.welore_rank_reduction(jnp.asarray(s, jnp.float32), tau),
                                   _welore_reference(s, tau), atol=1e-6)


def test_welore_threshold_hits_the_target_and_classifies_heavy_tails():
    rng = np.random.default_rng(8)
    heavy = 10.0 * 0.6 ** np.arange(32)                   # fast decay: most values in the tail
    flat = 1.0 + 0.1 * rng.random(32)                    # no heavy tail
    spectra_by_name = {"heavy": jnp.asarray(heavy, jnp.float32),
                       "flat": jnp.asarray(np.sort(flat)[::-1], jnp.float32),
                       "identity": jnp.ones(32)}
    result = spectra.welore_classify(spectra_by_name, 0.3, min_ratio=0.4)
    total = sum(r["rank"] - r["kept_rank"] for r in result.values())
    assert total == round(0.3 * 96)
    assert result["heavy"]["lrc"] and not result["flat"]["lrc"]
    assert result["identity"]["ratio"] == 0.0 and result["identity"]["kept_rank"] == 32
    tau = result["heavy"]["threshold"]
    for name in ("heavy", "flat"):
        np.testing.assert_allclose(result[name]["ratio"],
                                   _welore_reference(np.asarray(spectra_by_name[name]), tau))
    assert spectra.welore_threshold([heavy], 0.0) == 0.0
    with pytest.raises(ValueError, match="target_reduction"):
        spectra.welore_threshold([heavy], 1.0)


def test_welore_kept_ranks_and_the_uniform_baseline_by_hand():
    split = {"a": {"rank": 10, "kept_rank": 3, "lrc": True},
             "b": {"rank": 10, "kept_rank": 8, "lrc": False},   # N-LRC: kept at full rank
             "c": {"rank": 20, "kept_rank": 14, "lrc": True}}
    kept, fraction = spectra.welore_kept_ranks(split)
    assert kept == {"a": 3, "b": 10, "c": 14}
    assert fraction == pytest.approx((7 + 0 + 6) / 40, rel=1e-15)
    uniform = spectra.uniform_kept_ranks({"a": 10, "b": 10, "c": 20}, fraction)
    # 13/40 of 10 = 3.25 -> drop 3; of 20 = 6.5 -> drop round(6.5) = 6 (banker's rounding)
    assert uniform == {"a": 7, "b": 7, "c": 14}
    assert spectra.uniform_kept_ranks({"a": 5}, 0.0) == {"a": 5}
    assert spectra.uniform_kept_ranks({"a": 5}, 1.0) == {"a": 0}
    with pytest.raises(ValueError, match="fraction"):
        spectra.uniform_kept_ranks({"a": 5}, 1.5)
    with pytest.raises(ValueError, match="empty"):
        spectra.welore_kept_ranks({})


def test_welore_kept_ranks_follow_classify():
    heavy, flat = 10.0 * 0.6 ** np.arange(16), 1.0 + 0.01 * np.arange(16)[::-1]
    split = spectra.welore_classify({"heavy": heavy, "flat": flat}, 0.3, min_ratio=0.4)
    kept, fraction = spectra.welore_kept_ranks(split)
    assert split["heavy"]["lrc"] and not split["flat"]["lrc"]
    assert kept == {"heavy": split["heavy"]["kept_rank"], "flat": 16}
    assert fraction == pytest.approx((16 - kept["heavy"]) / 32)


# ----------------------------------------------------------------------------- intruders
def _intruder_reference(w0, w1, k, eps):
    u0 = np.linalg.svd(w0, full_matrices=False)[0]
    u1 = np.linalg.svd(w1, full_matrices=False)[0][:, :k]
    return np.abs(u1.T @ u0).max(axis=1) < eps


def test_planted_intruder_dimension_is_found():
    rng = np.random.default_rng(9)
    m, n = 64, 32
    s = np.linspace(3.0, 0.5, n)
    u = _orthogonal(rng, m, n)
    v = _orthogonal(rng, n)
    w0 = (u * s) @ v.T
    # A new direction outside span(U) with a large singular value: the top vector after tuning.
    new = rng.standard_normal(m)
    new -= u @ (u.T @ new)
    new /= np.linalg.norm(new)
    w1 = w0 + 5.0 * np.outer(new, v[:, 7])
    mask, count = spectra.intruder_dimensions(jnp.asarray(w0, jnp.float32),
                                              jnp.asarray(w1, jnp.float32), k=10, threshold=0.5)
    assert int(count) == 1 and bool(mask[0])
    np.testing.assert_array_equal(mask, _intruder_reference(w0, w1, 10, 0.5))
    # Flax (in, out) layout: the same vectors on the other side.
    mask_t, count_t = spectra.intruder_dimensions(jnp.asarray(w0.T, jnp.float32),
                                                  jnp.asarray(w1.T, jnp.float32), side="right")
    assert int(count_t) == 1 and bool(mask_t[0])


def test_no_intruders_when_tuned_matrix_reuses_the_singular_vectors():
    rng = np.random.default_rng(10)
    m, n = 48, 48
    u = _orthogonal(rng, m)
    v = _orthogonal(rng, n)
    s0 = np.linspace(4.0, 0.1, n)
    w0 = (u * s0) @ v.T
    # "Full fine-tuning-like" change: same singular vectors, re-weighted and re-ordered spectrum,
    # plus a small rotation inside the top-2 plane.
    s1 = s0.copy()
    s1[[0, 5, 9]] = s1[[9, 0, 5]] * 1.5
    c, sn = math.cos(0.2), math.sin(0.2)
    u1 = u.copy()
    u1[:, [0, 1]] = u[:, [0, 1]] @ np.array([[c, -sn], [sn, c]])
    w1 = (u1 * s1) @ v.T
    _, count = spectra.intruder_dimensions(jnp.asarray(w0, jnp.float32),
                                           jnp.asarray(w1, jnp.float32), k=10, threshold=0.5)
    assert int(count) == 0
    # The count is invariant to one orthogonal rotation applied to both matrices.
    q = _orthogonal(rng, m)
    new = rng.standard_normal(m)
    new /= np.linalg.norm(new)
    w2 = w0 + 10.0 * np.outer(new, v[:, 3])     # a random new top direction
    pairs = [(w0, w1), (w0, w2)]
    for a, b in pairs:
        plain = spectra.intruder_dimensions(jnp.asarray(a, jnp.float32),
                                            jnp.asarray(b, jnp.float32), threshold=0.5)[1]
        rotated = spectra.intruder_dimensions(jnp.asarray(q @ a, jnp.float32),
                                              jnp.asarray(q @ b, jnp.float32), threshold=0.5)[1]
        assert int(plain) == int(rotated)
        want = _intruder_reference(a, b, 10, 0.5).sum()
        assert int(plain) == want


def test_intruder_dimensions_batched_and_jitted():
    rng = np.random.default_rng(11)
    w0 = rng.standard_normal((3, 20, 10))
    w1 = w0 + 0.01 * rng.standard_normal((3, 20, 10))
    fn = jax.jit(lambda a, b: spectra.intruder_dimensions(a, b, k=4, threshold=0.5))
    mask, count = fn(jnp.asarray(w0, jnp.float32), jnp.asarray(w1, jnp.float32))
    assert mask.shape == (3, 4) and count.shape == (3,)
    np.testing.assert_array_equal(count, 0)
    with pytest.raises(ValueError, match="same shape"):
        spectra.intruder_dimensions(jnp.ones((4, 3)), jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="valid choices"):
        spectra.intruder_dimensions(jnp.ones((4, 3)), jnp.ones((4, 3)), k=2, side="up")


# ----------------------------------------------------------------------------- layer_metrics
def test_layer_metrics_keys_values_and_filter():
    rng = np.random.default_rng(12)
    dense = rng.standard_normal((8, 6))
    stacked = rng.standard_normal((2, 5, 4))
    tree = {"block": {"kernel": jnp.asarray(dense, jnp.float32), "norm": jnp.ones(6)},
            "layers": {"kernel": jnp.asarray(stacked, jnp.float32)}}
    out = spectra.layer_metrics(tree, ["stable_rank", "top_r_energy", "effective_rank"], rank=2)
    assert set(out) == {f"{p}/{m}" for p in ("block/kernel", "layers/kernel[0]",
                                             "layers/kernel[1]")
                        for m in ("stable_rank", "top_r_energy", "effective_rank")}
    assert all(isinstance(v, float) for v in out.values())
    s = np.linalg.svd(stacked[1], compute_uv=False)
    np.testing.assert_allclose(out["layers/kernel[1]/stable_rank"], (s ** 2).sum() / s[0] ** 2,
                               rtol=1e-5)
    np.testing.assert_allclose(out["layers/kernel[1]/top_r_energy"],
                               (s[:2] ** 2).sum() / (s ** 2).sum(), rtol=1e-5)
    only = spectra.layer_metrics(tree, ["nuclear_norm"], paths_regex=r"^block")
    np.testing.assert_allclose(only["block/kernel/nuclear_norm"],
                               np.linalg.svd(dense, compute_uv=False).sum(), rtol=1e-5)
    assert list(only) == ["block/kernel/nuclear_norm"]
    with pytest.raises(ValueError, match="valid choices"):
        spectra.layer_metrics(tree, ["entropy"])


def test_layer_metrics_randomized_and_under_jit():
    rng = np.random.default_rng(13)
    x = jnp.asarray(_matrix_with_spectrum(rng, 40, 30, 0.5 ** np.arange(30)), jnp.float32)
    exact = spectra.layer_metrics({"w": x}, ["spectral_norm"])
    approx = spectra.layer_metrics({"w": x}, ["spectral_norm"], method="randomized", k=4,
                                   key=jax.random.key(0))
    np.testing.assert_allclose(approx["w/spectral_norm"], exact["w/spectral_norm"], rtol=1e-4)
    jitted = jax.jit(lambda t: spectra.layer_metrics(t, ["stable_rank"]))({"w": x})
    np.testing.assert_allclose(jitted["w/stable_rank"],
                               spectra.layer_metrics({"w": x}, ["stable_rank"])["w/stable_rank"],
                               rtol=1e-5)


# ------------------------------------------------------------------------ subspace / truncation
def test_singular_subspace_sides_and_galore_std_rule():
    rng = np.random.default_rng(14)
    tall = rng.standard_normal((12, 5))
    u, _, vt = np.linalg.svd(tall, full_matrices=False)
    left = spectra.singular_subspace(jnp.asarray(tall, jnp.float32), 2, side="left")
    right = spectra.singular_subspace(jnp.asarray(tall, jnp.float32), 2, side="right")
    std = spectra.singular_subspace(jnp.asarray(tall, jnp.float32), 2)
    assert left.shape == (12, 2) and right.shape == (5, 2) and std.shape == (5, 2)
    np.testing.assert_allclose(np.abs(left.T @ u[:, :2]), np.eye(2), atol=1e-5)
    np.testing.assert_allclose(np.abs(right.T @ vt[:2].T), np.eye(2), atol=1e-5)
    wide = spectra.singular_subspace(jnp.asarray(tall.T, jnp.float32), 2)
    assert wide.shape == (5, 2)                            # the smaller side again
    np.testing.assert_allclose(spectra.subspace_overlap(std, wide, orthonormal=True), 1.0,
                               rtol=1e-5)


def test_singular_subspace_std_uses_the_optimizer_side_rule_square_included():
    """One side rule in lrx: 'std' picks the side lrx.optim.resolve_side picks, ties (square)
    going to the input (row) side, and equals the projector lrx's GaLore builds on that array."""
    import lrx.optim as lo

    rng = np.random.default_rng(21)
    sq = rng.standard_normal((6, 6))
    u, _, _ = np.linalg.svd(sq)
    assert lo.resolve_side(6, 6, "std") == "left"
    std = spectra.singular_subspace(jnp.asarray(sq, jnp.float32), 2)
    np.testing.assert_allclose(np.abs(np.asarray(std).T @ u[:, :2]), np.eye(2), atol=1e-5)
    opt = lo.scale_by_galore(2, update_proj_gap=1)
    params = {"w": jnp.zeros((6, 6))}
    _, state = opt.update({"w": jnp.asarray(sq, jnp.float32)}, opt.init(params), params)
    proj = lo.projectors(state)["w"]
    assert proj.right is None
    np.testing.assert_allclose(spectra.subspace_overlap(std, proj.left[0], orthonormal=True),
                               1.0, rtol=1e-5)
    assert spectra.randomized_svd is lo.subspace.randomized_svd      # one implementation


def test_truncate_rank_is_the_eckart_young_approximation():
    rng = np.random.default_rng(15)
    x = rng.standard_normal((2, 9, 6))
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    want = np.stack([(u[i, :, :3] * s[i, :3]) @ vt[i, :3] for i in range(2)])
    got = jax.jit(spectra.truncate_rank)(jnp.asarray(x, jnp.float32), 3)
    np.testing.assert_allclose(got, want, atol=1e-5)
    per_matrix = spectra.truncate_rank(jnp.asarray(x, jnp.float32), jnp.asarray([0, 6]))
    np.testing.assert_allclose(per_matrix[0], 0.0, atol=1e-6)
    np.testing.assert_allclose(per_matrix[1], x[1], atol=1e-5)


def test_layer_metrics_grouped_equals_per_leaf():
    rng = np.random.default_rng(16)
    tree = {f"l{i}": {"a": jnp.asarray(rng.standard_normal((6, 4)), jnp.float32),
                      "b": jnp.asarray(rng.standard_normal((4, 9)), jnp.float32)}
            for i in range(3)}
    tree["stack"] = jnp.asarray(rng.standard_normal((2, 6, 4)), jnp.float32)
    grouped = spectra.layer_metrics(tree, ["effective_rank", "rank_at_energy"])
    single = spectra.layer_metrics(tree, ["effective_rank", "rank_at_energy"],
                                   group_by_shape=False)
    assert list(grouped) == list(single) and len(grouped) == 2 * 8
    np.testing.assert_allclose(list(grouped.values()), list(single.values()), rtol=1e-5)


def test_a_layer_metrics_hook_leaves_training_unchanged(tmp_path):
    """The spectra hook only reads the state: training with it gives bit-identical parameters."""
    import optax

    from lrx.train import loop, sharding

    rng = np.random.default_rng(17)
    data = rng.standard_normal((8, 6)).astype(np.float32)
    target = rng.standard_normal((8, 3)).astype(np.float32)

    def loss_fn(p, fz, batch, key):  # noqa: ARG001
        x, y = batch[:, :6], batch[:, 6:]
        return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2), {}

    params = {"w1": jnp.asarray(rng.standard_normal((6, 5)), jnp.float32),
              "w2": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)}
    optimizer = optax.adam(1e-2)
    logged = []

    def hook(step, state, batch):
        out = spectra.layer_metrics(state.params, ["effective_rank", "stable_rank"])
        logged.append(out)
        return state, out

    finals = []
    for name, hooks in (("off", ()), ("on", (hook,))):
        state = loop.create_state(jax.tree_util.tree_map(jnp.array, params), optimizer, seed=0)
        result = loop.train(workdir=str(tmp_path / name), state=state, loss_fn=loss_fn,
                            optimizer=optimizer,
                            batch_fn=lambda step: np.concatenate([data, target], axis=1),
                            total_steps=4, mesh=sharding.make_mesh(0, 1), log_every=2,
                            hooks=hooks, progress=False, tensorboard=False)
        finals.append(jax.device_get(result["state"].params))
    assert len(logged) == 4 and "w1/effective_rank" in logged[0]
    for a, b in zip(jax.tree_util.tree_leaves(finals[0]), jax.tree_util.tree_leaves(finals[1])):
        np.testing.assert_array_equal(a, b)


def test_intruder_counts_sum_the_rule_over_matrices_and_thresholds():
    rng = np.random.default_rng(11)
    sims = {"a": rng.random((3, 5)), "b": rng.random(4)}   # batched and plain matrices
    got = spectra.intruder_counts(sims, (0.2, 0.5, 1.0))
    for eps in (0.2, 0.5, 1.0):
        assert got[eps] == int((sims["a"] < eps).sum() + (sims["b"] < eps).sum())
    assert spectra.intruder_counts(list(sims.values()), (0.5,)) == {0.5: got[0.5]}
    # the mask is the same rule intruder_dimensions applies
    w0, w1 = rng.standard_normal((12, 8)), rng.standard_normal((12, 8))
    sim = spectra.max_cosine_similarity(jnp.asarray(w0, jnp.float32),
                                        jnp.asarray(w1, jnp.float32), k=6)
    mask, count = spectra.intruder_dimensions(jnp.asarray(w0, jnp.float32),
                                              jnp.asarray(w1, jnp.float32), k=6, threshold=0.6)
    np.testing.assert_array_equal(spectra.intruder_mask(sim, 0.6), mask)
    np.testing.assert_array_equal(mask, _intruder_reference(w0, w1, 6, 0.6))
    assert spectra.intruder_counts([sim], (0.6,)) == {0.6: int(count)}
    with pytest.raises(ValueError, match="epsilon"):
        spectra.intruder_mask(sim, 0.0)
