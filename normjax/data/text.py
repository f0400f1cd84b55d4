"""Text corpora and tokenizations for language models, measured in bits per byte.

Corpus. :func:`load_corpus` reads TFDS ``tiny_shakespeare`` (train and validation
splits, array_record, located like CIFAR-10: ``data_dir``, else
``$TFDS_DATA_DIR``, else TFDS's default) or any UTF-8 text file (the last
``validation_fraction`` of it is the validation split).

Tokenizations (:func:`make_tokenizer`), all exactly reversible:

* ``byte`` — the UTF-8 bytes, vocabulary 256;
* ``char`` — one token per Unicode character of the corpus (its alphabet, taken
  from both splits so that every text round-trips; no statistics beyond that);
* ``bpe`` — byte-level BPE trained on the training split only with the
  ``tokenizers`` library, to ``vocab_size`` tokens (at least the 256 bytes): the
  tokenizer that bakes corpus statistics into the input.

A tokenizer is saved as one JSON file (``save``/:func:`load_tokenizer`), so a
resumed run reuses the trained BPE instead of retraining it.

Measuring. Every token knows how many bytes of the original UTF-8 text it stands
for (``token_bytes``), so a loss in nats per token becomes bits per byte — one
scale for every tokenization. :func:`eval_windows` covers a split so that every
token after the first is predicted exactly once, with at least
``length - stride`` tokens of context after the first window.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from normjax.data.tfds_source import DataNotFoundError, open_source, resolve_data_dir

__all__ = [
    "TOKENIZERS",
    "Corpus",
    "DataNotFoundError",
    "Tokenizer",
    "bits_per_byte",
    "eval_windows",
    "load_corpus",
    "load_tokenizer",
    "make_tokenizer",
    "random_windows",
]

NAME = "tiny_shakespeare"
TOKENIZERS = ("byte", "char", "bpe")

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------
# Corpus


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A text corpus held in memory: ``train`` and ``validation`` strings and
    where they came from."""

    train: str
    validation: str
    source: str


def _read_tfds(data_dir: PathLike | None, download: bool) -> Corpus:
    resolved = resolve_data_dir(data_dir)
    texts = {}
    for split in ("train", "validation"):
        source = open_source(
            NAME,
            split,
            resolved,
            download=download,
            title="tiny_shakespeare",
            splits=("train", "validation", "test"),
        )
        texts[split] = "".join(
            bytes(source[i]["text"]).decode("utf-8") for i in range(len(source))
        )
    where = "TFDS default directory" if resolved is None else resolved
    return Corpus(texts["train"], texts["validation"], f"tfds:{NAME} ({where})")


def _read_file(path: PathLike, validation_fraction: float) -> Corpus:
    path = pathlib.Path(os.path.expanduser(os.fspath(path)))
    if not path.is_file():
        raise FileNotFoundError(
            f"text_file {os.fspath(path)!r} does not exist or is not a file; pass "
            "the path of a UTF-8 text file with --config.text_file=PATH, or leave "
            "it unset to use TFDS tiny_shakespeare."
        )
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"text_file {os.fspath(path)!r} is not valid UTF-8 ({e.reason} at byte "
            f"{e.start}); convert it, e.g. `iconv -f LATIN1 -t UTF-8`."
        ) from None
    if not text.strip():
        raise ValueError(
            f"text_file {os.fspath(path)!r} is empty (or only whitespace); give a "
            "file with text to train on."
        )
    if not 0.0 < validation_fraction < 1.0:
        raise ValueError(
            f"validation_fraction must be in (0, 1), got {validation_fraction}."
        )
    cut = int(round(len(text) * (1.0 - validation_fraction)))
    train, validation = text[:cut], text[cut:]
    if not train or not validation:
        raise ValueError(
            f"text_file {os.fspath(path)!r} has {len(text)} characters: too short "
            f"to split {validation_fraction:.0%} off for validation."
        )
    return Corpus(train, validation, f"file:{path}")


def load_corpus(
    data_dir: PathLike | None = None,
    *,
    text_file: PathLike | None = None,
    validation_fraction: float = 0.1,
    download: bool = False,
) -> Corpus:
    """The training and validation text.

    Args:
      data_dir: TFDS data directory holding ``tiny_shakespeare/`` (None:
        ``$TFDS_DATA_DIR``, else TFDS's default). Ignored with ``text_file``.
      text_file: a UTF-8 text file to use instead; its last
        ``validation_fraction`` (by characters) is the validation split.
      download: let TFDS download tiny_shakespeare if it is absent.

    Raises :class:`DataNotFoundError` (a ``FileNotFoundError``) when the data is
    missing, ``ValueError`` for an empty or non-UTF-8 file.
    """
    if text_file:
        return _read_file(text_file, validation_fraction)
    return _read_tfds(data_dir, download)


# --------------------------------------------------------------------------------
# Tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the alphabet
    of the ``tokenizers`` ByteLevel pre-tokenizer)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes), strict=True))


class Tokenizer:
    """A reversible tokenization: ``encode(text) -> int32 ids``,
    ``decode(ids) -> text``, ``vocab_size``, and ``token_bytes`` (int64, the
    UTF-8 length of each token id's text)."""

    kind: str
    vocab_size: int
    token_bytes: np.ndarray

    def encode(self, text: str) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids: Any) -> str:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: PathLike) -> None:
        """Writes the tokenizer as JSON (atomically: a killed run leaves either
        the old file or the new one)."""
        path = pathlib.Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"kind": self.kind, **self._state()}) + "\n")
        tmp.replace(path)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes: 256 tokens, one byte each."""

    kind = "byte"

    def __init__(self) -> None:
        self.vocab_size = 256
        self.token_bytes = np.ones(256, np.int64)

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

    def decode(self, ids: Any) -> str:
        data = np.asarray(ids, np.int64)
        if data.size and (data.min() < 0 or data.max() > 255):
            raise ValueError("byte token ids must be in [0, 256).")
        return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def _state(self) -> dict[str, Any]:
        return {}


class CharTokenizer(Tokenizer):
    """One token per character of a fixed alphabet (sorted)."""

    kind = "char"

    def __init__(self, alphabet: str) -> None:
        chars = sorted(set(alphabet))
        if not chars:
            raise ValueError("a character tokenizer needs a non-empty alphabet.")
        self.chars = "".join(chars)
        self.vocab_size = len(chars)
        self._codepoints = np.array([ord(c) for c in chars], np.int64)
        self.token_bytes = np.array([len(c.encode("utf-8")) for c in chars], np.int64)

    def encode(self, text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le"), np.uint32).astype(np.int64)
        ids = np.searchsorted(self._codepoints, points)
        ids = np.minimum(ids, self.vocab_size - 1)
        bad = self._codepoints[ids] != points
        if np.any(bad):
            missing = sorted({chr(p) for p in points[bad]})[:10]
            raise ValueError(
                f"characters {missing!r} are not in this char tokenizer's alphabet "
                "(built from the corpus it was made for)."
            )
        return ids.astype(np.int32)

    def decode(self, ids: Any) -> str:
        return "".join(self.chars[i] for i in np.asarray(ids, np.int64).ravel())

    def _state(self) -> dict[str, Any]:
        return {"chars": self.chars}


class BpeTokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) from the ``tokenizers`` library."""

    kind = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        self.token_bytes = np.zeros(self.vocab_size, np.int64)
        for token, i in tokenizer.get_vocab().items():
            self.token_bytes[i] = sum(1 for c in token if c in byte_of)

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BpeTokenizer:
        """Trains on ``text`` to ``vocab_size`` tokens (>= 256), deterministically."""
        from tokenizers import Tokenizer as HfTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 256:
            raise ValueError(
                f"bpe vocab_size={vocab_size} is below the 256 byte tokens every "
                "byte-level BPE starts from; use at least 256 (e.g. 512 or 1024)."
            )
        tokenizer = HfTokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        lines = text.splitlines(keepends=True)
        chunks = ["".join(lines[i : i + 1000]) for i in range(0, len(lines), 1000)]
        tokenizer.train_from_iterator(chunks, trainer=trainer)
        return cls(tokenizer)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text).ids, np.int32)

    def decode(self, ids: Any) -> str:
        return self.tokenizer.decode([int(i) for i in np.asarray(ids).ravel()])

    def _state(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer.to_str()}


def load_tokenizer(path: PathLike) -> Tokenizer:
    """A tokenizer written by ``Tokenizer.save``."""
    state = json.loads(pathlib.Path(path).read_text())
    kind = state.get("kind")
    if kind == "byte":
        return ByteTokenizer()
    if kind == "char":
        return CharTokenizer(state["chars"])
    if kind == "bpe":
        from tokenizers import Tokenizer as HfTokenizer

        return BpeTokenizer(HfTokenizer.from_str(state["tokenizer"]))
    raise ValueError(f"{path}: unknown tokenizer kind {kind!r}.")


def make_tokenizer(
    kind: str,
    corpus: Corpus,
    *,
    vocab_size: int = 1024,
    path: PathLike | None = None,
) -> Tokenizer:
    """The tokenizer ``kind`` ('byte', 'char' or 'bpe') for ``corpus``.

    With ``path``: an existing file there is loaded and reused (it must be of the
    same kind and, for BPE, vocabulary size), otherwise the new tokenizer is
    saved there. BPE trains on ``corpus.train`` only.
    """
    if kind not in TOKENIZERS:
        raise ValueError(
            f"unknown tokenizer {kind!r}; use one of {', '.join(TOKENIZERS)}."
        )
    if path is not None and pathlib.Path(path).exists():
        tokenizer = load_tokenizer(path)
        if tokenizer.kind != kind or (
            kind == "bpe" and tokenizer.vocab_size != vocab_size
        ):
            raise ValueError(
                f"{path} holds a {tokenizer.kind} tokenizer with vocabulary "
                f"{tokenizer.vocab_size}, but the config asks for {kind}"
                f"{f' with vocabulary {vocab_size}' if kind == 'bpe' else ''}; use "
                "a fresh workdir or the config that made it."
            )
        return tokenizer
    if kind == "byte":
        tokenizer = ByteTokenizer()
    elif kind == "char":
        tokenizer = CharTokenizer(corpus.train + corpus.validation)
    else:
        tokenizer = BpeTokenizer.train(corpus.train, vocab_size)
    if path is not None:
        tokenizer.save(path)
    return tokenizer


# --------------------------------------------------------------------------------
# Windows and the measure


def random_windows(
    ids: np.ndarray, seed: int, step: int, batch_size: int, length: int
) -> np.ndarray:
    """(batch_size, length + 1) int32 windows at uniformly random offsets; a pure
    function of (seed, step), so a resumed run sees the same batches. Inputs
    are ``w[:, :-1]``, targets ``w[:, 1:]``."""
    n = len(ids)
    if n < length + 1:
        raise ValueError(
            f"the training split has {n} tokens, fewer than context length "
            f"{length} + 1; use a shorter max_len or more text."
        )
    rng = np.random.default_rng([seed, step])
    starts = rng.integers(0, n - length, size=batch_size)
    return ids[starts[:, None] + np.arange(length + 1)].astype(np.int32)


def eval_windows(
    ids: np.ndarray,
    length: int,
    stride: int,
    batch_size: int,
    *,
    isolated: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
    """Batches covering ``ids`` so that every token after the first is a scored
    target exactly once.

    Window k reads ``ids[k*stride : k*stride + length]`` and predicts the next
    token at each position; it scores the targets the earlier windows did not
    (all of them in the first window, the last ``stride`` after), so every
    prediction but the first ``length - stride`` has at least
    ``length - stride`` tokens of context. Yields dicts of (batch_size, length)
    arrays: ``inputs``, ``targets`` (int32), ``mask`` (bool: the input position
    exists and has a target) and ``weights`` (bool: scored here). Batches are
    padded with empty windows (mask all False).

    Args:
      isolated: for evaluation with the batch's own statistics. By default
        windows sit in text order, so consecutive windows share a batch — and a
        window's targets are the next window's inputs: statistics pooled over
        the batch see them. With ``isolated``, window k goes to batch
        ``k mod num_batches``, with ``num_batches`` large enough that any two
        windows of a batch start more than ``2 * length`` tokens apart: no
        window overlaps another of its batch or lies within ``length`` tokens
        of it, so no scored token appears anywhere else in its batch. (Then
        batches may hold fewer windows than ``batch_size``; the rest is
        padding.)
    """
    if not 0 < stride <= length:
        raise ValueError(f"stride must be in [1, length={length}], got {stride}.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    n = len(ids)
    if n < 2:
        raise ValueError("the evaluation split needs at least 2 tokens.")
    starts = [0]
    while starts[-1] + length < n - 1:
        starts.append(starts[-1] + stride)
    all_starts = np.asarray(starts)
    num_windows = len(all_starts)
    if isolated:
        num_batches = max(-(-num_windows // batch_size), (2 * length) // stride + 1)
        num_batches = min(num_batches, num_windows)
        chunks = [all_starts[b::num_batches] for b in range(num_batches)]
    else:
        chunks = [
            all_starts[b : b + batch_size] for b in range(0, num_windows, batch_size)
        ]
    positions = np.arange(length)
    for chunk in chunks:
        index = chunk[:, None] + positions  # input positions
        mask = index + 1 < n
        first = np.where(chunk == 0, 0, length - stride)
        weights = mask & (positions[None, :] >= first[:, None])
        pad = batch_size - len(chunk)
        safe = np.minimum(index, n - 2)
        batch = {
            "inputs": ids[safe].astype(np.int32),
            "targets": ids[safe + 1].astype(np.int32),
            "mask": mask,
            "weights": weights,
        }
        if pad:
            batch = {
                k: np.concatenate([v, np.zeros((pad, length), v.dtype)])
                for k, v in batch.items()
            }
        yield batch


def position_buckets(length: int) -> list[tuple[int, int]]:
    """Position ranges [lo, hi) for loss by position: the first 8 positions, up
    to L/4, up to L/2, the rest (ranges that would be empty are dropped)."""
    edges = [0]
    for edge in (8, length // 4, length // 2, length):
        edge = min(edge, length)
        if edge > edges[-1]:
            edges.append(edge)
    return list(zip(edges[:-1], edges[1:], strict=True))


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    """Nats summed over tokens -> bits per byte of the text they encode."""
    return total_nats / math.log(2.0) / total_bytes
