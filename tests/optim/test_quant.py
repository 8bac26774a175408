"""lrx.optim.quant: the dynamic map against a NumPy float64 re-derivation from the paper's
definition, quantization error bounds, 8-bit Adam against float32 Adam, a tiny LLaMA with 8-bit
AdamW against float32 AdamW."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lrx.optim import quant


def reference_map(signed: bool) -> np.ndarray:
    """arXiv 2110.02861 App. F, 8 bits, 7 exponent bits: decade 10^-e (e = 6..0) splits [0.1, 1]
    into 2^(6-e) (signed) or 2^(7-e) (unsigned) equal bins, one value per bin centre; plus 0
    and 1; the signed map mirrors every non-zero bin value."""
    vals = [0.0, 1.0]
    for e in range(6, -1, -1):
        bins = 2 ** (6 - e) if signed else 2 ** (7 - e)
        width = 0.9 / bins
        centres = [0.1 + width * (k + 0.5) for k in range(bins)]
        for c in centres:
            vals.append(c * 10.0 ** (-e))
            if signed:
                vals.append(-c * 10.0 ** (-e))
    return np.sort(np.array(vals, np.float64))


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_matches_float64_rederivation(signed):
    ref = reference_map(signed)
    got = quant.dynamic_map(signed)
    assert got.shape == (256,) and ref.shape == (256,)
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=1e-6, atol=1e-12)
    assert np.all(np.diff(got) >= 0) and got[-1] == 1.0 and 0.0 in got
    assert (got.min() < -0.99) if signed else (got.min() == 0.0)


@pytest.mark.parametrize("signed,block", [(True, 64), (False, 64), (True, 2048)])
def test_quantize_is_nearest_map_entry_and_error_bounded(signed, block):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 53)) * np.exp(rng.uniform(-6, 2, (37, 53)))
    if not signed:
        x = np.abs(x)
    q = quant.quantize(jnp.asarray(x, jnp.float32), signed=signed, block_size=block)
    deq = np.asarray(quant.dequantize(q), np.float64)
    assert deq.shape == x.shape
    table = reference_map(signed)
    flat = np.pad(x.ravel(), (0, (-x.size) % block)).reshape(-1, block)
    absmax = np.abs(flat).max(-1)
    np.testing.assert_allclose(np.asarray(q.absmax), absmax, rtol=1e-6)
    normed = flat / absmax[:, None]
    # Nearest entry by brute force in float64; the bound is half the local gap of the map.
    nearest = table[np.argmin(np.abs(normed[..., None] - table), axis=-1)]
    expect = (nearest * absmax[:, None]).ravel()[: x.size].reshape(x.shape)
    err = np.abs(deq - x)
    bound = np.abs(expect - x) * (1 + 1e-5) + 1e-6 * np.abs(x) + 1e-30
    assert np.all(err <= bound)
    # Worst case in map units: half of the largest gap (0.05 at the top of the top decade).
    gaps = np.diff(table)
    assert np.all(err <= (gaps.max() / 2 + 1e-6) * absmax.max())
    # The map holds +1 (not -1): a block's largest positive value, when it is the absmax, is exact.
    i = np.argmax(x)
    if x.flat[i] == np.abs(x).max():
        assert np.isclose(deq.flat[i], x.flat[i], rtol=1e-6)


def test_zero_block_and_bad_input():
    q = quant.quantize(jnp.zeros((10,)), block_size=4)
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q)), np.zeros(10))
    with pytest.raises(ValueError, match="block_size"):
        quant.quantize(jnp.zeros(3), block_size=0)
    with pytest.raises(ValueError, match="moment_dtype='int4'.*'8bit'"):
        quant.scale_by_adam_8bit(moment_dtype="int4")


def test_store_load_and_state_bytes():
    x = jax.random.normal(jax.random.key(0), (64, 128))
    for dtype, nbytes in [("float32", 4 * x.size), ("bfloat16", 2 * x.size),
                          ("8bit", x.size + 4 * (x.size // 2048))]:
        s = quant.store(x, dtype)
        assert quant.state_bytes(s) == nbytes
        assert quant.load(s).dtype == jnp.float32
    small = quant.store(jnp.ones((10,)), "8bit")       # < min_size: stays float32
    assert small.dtype == jnp.float32
    # vmap over a leading axis (per-layer states) keeps a batch axis on codes and absmax.
    stacked = jax.vmap(lambda a: quant.store(a, "8bit", block_size=256, min_size=0))(
        x.reshape(4, 16, 128))
    assert stacked.codes.shape == (4, 8, 256) and stacked.absmax.shape == (4, 8)
    back = quant.load(stacked)
    assert back.shape == (4, 16, 128)
    np.testing.assert_allclose(np.asarray(back).reshape(64, 128), np.asarray(x), atol=0.06 *
                               float(jnp.abs(x).max()))


def _regression(seed=0, n=256, d=64):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d)) / np.sqrt(d)
    w_true = rng.standard_normal((d, 32))
    y = a @ w_true + 0.01 * rng.standard_normal((n, 32))
    return jnp.asarray(a, jnp.float32), jnp.asarray(y, jnp.float32)


def test_adam_8bit_tracks_float32_adam():
    """Least squares, 300 steps, lr 1e-2: at every 50th step the 8-bit run's loss differs from the
    float32 run's by at most 0.5% of the initial loss (the loss falls 45x, so late differences
    are a few % relative) and the final weights by at most 3% (relative Frobenius)."""
    a, y = _regression()
    loss = lambda w: jnp.mean((a @ w - y) ** 2)
    w0 = jnp.zeros((64, 32))

    def run(opt):
        state = opt.init(w0)

        def body(carry, _):
            w, s = carry
            g = jax.grad(loss)(w)
            u, s = opt.update(g, s, w)
            w = optax.apply_updates(w, u)
            return (w, s), loss(w)

        (w, _), losses = jax.lax.scan(body, (w0, state), None, length=300)
        return w, np.asarray(losses)

    w32, l32 = run(optax.adam(1e-2))
    w8, l8 = run(optax.chain(quant.scale_by_adam_8bit(block_size=256, min_size=0),
                             optax.scale(-1e-2)))
    assert quant.state_bytes(optax.chain(quant.scale_by_adam_8bit(block_size=256, min_size=0),
                                         optax.scale(-1e-2)).init(w0)) < 2.1 * w0.size + 8
    assert l32[-1] < 0.05 * l32[0]                       # the problem is actually solved
    np.testing.assert_allclose(l8[::50], l32[::50], rtol=0, atol=0.005 * l32[0])
    rel = float(jnp.linalg.norm(w8 - w32) / jnp.linalg.norm(w32))
    assert rel < 0.03, rel
    # bfloat16 moments: same interface, tighter than 8 bits.
    wb, lb = run(optax.chain(quant.scale_by_adam_8bit(moment_dtype="bfloat16"),
                             optax.scale(-1e-2)))
    np.testing.assert_allclose(lb[::50], l32[::50], rtol=0, atol=0.005 * l32[0])
    # float32 storage is exactly optax.scale_by_adam (eps outside the root, bias-corrected).
    wf, lf = run(optax.chain(quant.scale_by_adam_8bit(moment_dtype="float32"),
                             optax.scale(-1e-2)))
    np.testing.assert_allclose(np.asarray(wf), np.asarray(w32), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_tiny_llama_8bit_adamw_within_one_percent_of_float32():
    """A 2-layer LLaMA (hidden 64) on Shakespeare bytes, 150 steps of AdamW vs AdamW-8bit (every
    matrix has >= 4096 values, so embeddings, head and kernels have 8-bit states), and of GaLore
    (rank 16, refresh every 50 steps) with float32 Adam vs 8-bit Adam on the projected moments
    (min_size=0, blocks of 256: every moment 8-bit): final eval losses within 1%."""
    from lrx.data import text
    from lrx.models.llama import Llama, preset

    corpus = text.load_shakespeare(("macbeth",))
    cfg = preset("tiny", hidden_size=64, intermediate_size=176, num_heads=2, num_layers=2,
                 vocab_size=256, max_len=64)
    model = Llama(cfg)
    seq, batch, steps = 64, 16, 150
    params0 = model.init(jax.random.key(0), jnp.zeros((1, seq), jnp.int32))["params"]
    evals = jnp.asarray(text.eval_windows(corpus.val, seq, 32))

    def loss_fn(p, b):
        logits = model.apply({"params": p}, b[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, b[:, 1:]).mean()

    batches = jnp.asarray(np.stack([text.sample_batch(corpus.train, 0, i, batch, seq)
                                    for i in range(steps)]))

    def train(opt):
        @jax.jit
        def go(p):
            def body(carry, b):
                p, s = carry
                g = jax.grad(loss_fn)(p, b)
                u, s = opt.update(g, s, p)
                return (optax.apply_updates(p, u), s), None
            (p, _), _ = jax.lax.scan(body, (p, opt.init(p)), batches)
            return loss_fn(p, evals)
        return float(go(params0))

    schedule = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 15, steps, 3e-4)
    l32 = train(optax.adamw(schedule, eps=1e-8, weight_decay=0.0))
    l8 = train(quant.adamw_8bit(schedule, eps=1e-8, weight_decay=0.0))
    assert l32 < 3.0                                     # learned well beyond unigram (~3.3)
    assert abs(l8 - l32) <= 0.01 * l32, (l8, l32)
    import lrx.optim as lo

    kw = dict(rank=16, update_proj_gap=50, mask=lambda p: lo.path_mask(p, lo.ATTN_MLP))
    g32 = train(lo.galore(schedule, eps=1e-8, **kw))
    g8 = train(lo.galore(schedule, base_optimizer=quant.scale_by_adam_8bit(
        eps=1e-8, block_size=256, min_size=0), **kw))
    assert g32 < 3.1
    assert abs(g8 - g32) <= 0.01 * g32, (g8, g32)


def _np_quantize(x: np.ndarray, table: np.ndarray, block: int) -> np.ndarray:
    """Block-wise absmax + nearest map entry, dequantized (NumPy float64): the stored moment."""
    flat = np.ravel(x).astype(np.float64)
    n = -(-flat.size // block) * block
    blocks = np.pad(flat, (0, n - flat.size)).reshape(-1, block)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    normed = blocks / np.where(absmax > 0, absmax, 1.0)
    codes = np.abs(normed[..., None] - table[None, None, :]).argmin(-1)
    return (table[codes] * absmax).ravel()[:flat.size].reshape(x.shape)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_adam_8bit_chunks_match_float64_blockwise_adam(dtype):
    """Two 8-bit Adam steps on a (40, 33) leaf (21 blocks of 64, the last one padded) processed
    4 blocks at a time (5 full chunks and a remainder): the direction of step 2 matches a NumPy
    float64 re-derivation (moments of step 1 stored block-wise on the paper's map, step 2 from
    their dequantized values) and equals the one-chunk and one-block-per-chunk runs to float32
    rounding (XLA compiles each chunk shape on its own: 1-ulp differences)."""
    rng = np.random.default_rng(3)
    g1, g2 = (rng.standard_normal((40, 33)) * s for s in (1.0, 0.3))
    b1, b2, eps = 0.9, 0.999, 1e-8

    def run(chunk_blocks):
        opt = quant.scale_by_adam_8bit(b1, b2, eps, block_size=64, min_size=0,
                                       chunk_blocks=chunk_blocks)
        state = opt.init(jnp.zeros((40, 33), dtype))
        _, state = opt.update(jnp.asarray(g1, dtype), state)
        u, _ = opt.update(jnp.asarray(g2, dtype), state)
        return np.asarray(u.astype(jnp.float32))

    u = run(4)
    for other in (21, 1, 1000):
        np.testing.assert_allclose(run(other), u, rtol=1e-6, atol=1e-7)
    g1r, g2r = (np.asarray(jnp.asarray(g, dtype).astype(jnp.float32), np.float64) for g in (g1, g2))
    m1 = _np_quantize((1 - b1) * g1r, reference_map(True), 64)
    v1 = _np_quantize((1 - b2) * g1r ** 2, reference_map(False), 64)
    m2, v2 = b1 * m1 + (1 - b1) * g2r, b2 * v1 + (1 - b2) * g2r ** 2
    ref = (m2 / (1 - b1 ** 2)) / (np.sqrt(v2 / (1 - b2 ** 2)) + eps)
    close = np.isclose(u, ref, rtol=2e-2 if dtype == jnp.bfloat16 else 1e-4, atol=1e-6)
    assert close.mean() > 0.99, close.mean()      # rare float32-vs-float64 ties at a midpoint
