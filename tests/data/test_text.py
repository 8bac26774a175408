"""Byte-level corpus: determinism of batches, disjoint held-out plays, byte round trip."""

import numpy as np
import pytest

from lrx.data import text

VAL = ("macbeth", "twelfth-night", "richard-ii")


@pytest.fixture(scope="module")
def corpus():
    return text.load_shakespeare(VAL)


def test_all_38_plays_are_found():
    assert len(text.shakespeare_plays()) == 38


def test_same_seed_and_step_same_batch(corpus):
    a = text.sample_batch(corpus.train, 3, 17, 8, 64)
    b = text.sample_batch(corpus.train, 3, 17, 8, 64)
    c = text.sample_batch(corpus.train, 3, 18, 8, 64)
    d = text.sample_batch(corpus.train, 4, 17, 8, 64)
    assert a.shape == (8, 65) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)


def test_train_and_validation_plays_are_disjoint(corpus):
    assert set(corpus.val_docs) == set(VAL)
    assert not set(corpus.train_docs) & set(VAL)
    assert len(corpus.train_docs) == 35
    # a distinctive line of Macbeth is in the validation text only
    line = b"To-morrow, and to-morrow, and to-morrow"
    assert line in corpus.val.tobytes()
    assert line not in corpus.train.tobytes()


def test_byte_round_trip():
    s = "Shall I compare thee — to a summer’s day?"
    tokens = text.encode(s)
    assert tokens.max() < text.VOCAB_SIZE
    assert text.decode(tokens) == s


def test_eval_windows_are_deterministic_and_disjoint(corpus):
    w = text.eval_windows(corpus.val, 128, 16)
    np.testing.assert_array_equal(w, text.eval_windows(corpus.val, 128, 16))
    assert w.shape == (16, 129)


def test_unigram_entropy_closed_form():
    tokens = np.array([0, 1, 2, 3] * 10, np.uint8)
    assert text.unigram_entropy_bits(tokens) == pytest.approx(2.0)


def test_fingerprint_and_unknown_play(corpus):
    assert corpus.fingerprint == text.load_shakespeare(VAL).fingerprint
    with pytest.raises(ValueError, match="unknown play.*valid plays"):
        text.load_shakespeare(("macbth",))


def test_text_files_source(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 20)
    (tmp_path / "b.txt").write_text("held out " * 20)
    c = text.load_text_files(str(tmp_path / "*.txt"), str(tmp_path / "b.txt"))
    assert c.train.tobytes().startswith(b"hello") and c.val.tobytes().startswith(b"held")
    with pytest.raises(ValueError, match="matches no validation file"):
        text.load_text_files(str(tmp_path / "*.txt"), str(tmp_path / "nope*.txt"))


def test_text_files_too_short_or_shared_are_named(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello")
    (tmp_path / "b.txt").write_bytes(b"x" * 100)
    with pytest.raises(ValueError, match=r"training text \(1 file\(s\)\) holds 5 bytes, fewer than "
                       r"one window of data.seq_len \+ 1 = 33 bytes"):
        text.load_text_files(str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), min_bytes=33)
    with pytest.raises(ValueError, match=r"both name .*b.txt: validation files are held out"):
        text.load_text_files(str(tmp_path / "b.txt"), str(tmp_path / "b.txt"))
    assert text.text_files(str(tmp_path / "*.txt"), str(tmp_path / "a.txt")) == (
        [str(tmp_path / "b.txt")], [str(tmp_path / "a.txt")])
