"""CIFAR-10 in memory: TFDS array_record loading, on-device augmentation, samplers.

Loading. :func:`load_cifar10` reads the TFDS ``cifar10`` dataset through
``tfds.data_source`` (array_record files, random access, no TensorFlow) and keeps
all of it in host memory as uint8: 50 000 + 10 000 images of 32x32x3, 184 MB. The
records hold PNG images; they are decoded here with ``zlib`` and a NumPy PNG
un-filter vectorized across images (TFDS's own decoder needs OpenCV or Pillow,
neither a dependency of normjax, and decodes one image at a time: about 2.5x
slower with Pillow). The data directory is the argument (from the config), else
``$TFDS_DATA_DIR``, else TFDS's default (``~/tensorflow_datasets``). Nothing is
downloaded unless ``download=True``; a missing dataset raises
:class:`DataNotFoundError` saying where it looked and how to get the data.

Transforms, on the device and jit-able, images channels-last ``(N, H, W, C)``:
:func:`augment` (pad + random crop, random horizontal flip; keeps the dtype) and
:func:`standardize` (uint8 or float pixels in [0, 255] -> per-channel standardized
float32).

Samplers, host-side NumPy, deterministic in their seed, returning index arrays
``(num_batches, batch_size)`` to gather with ``images[idx]``:
:func:`epoch_permutation` / :func:`batch_indices` for ordinary training,
:func:`class_homogeneous_batches` and :func:`class_skewed_batches` for training on
single-class or class-skewed batches, and for evaluation :class:`Batches` (indices
plus a validity mask) that cover a split exactly once: :func:`eval_batches`,
:func:`class_homogeneous_eval_batches`, :func:`class_skewed_eval_batches`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import struct
import zlib
from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from normjax.data.tfds_source import (
    DataNotFoundError,
    open_source,
    resolve_data_dir,
)

__all__ = [
    "Batches",
    "Cifar10",
    "DataNotFoundError",
    "augment",
    "batch_indices",
    "class_homogeneous_batches",
    "class_homogeneous_eval_batches",
    "class_skewed_batches",
    "class_skewed_eval_batches",
    "crop_flip",
    "crop_flip_params",
    "epoch_permutation",
    "eval_batches",
    "load_cifar10",
    "resolve_data_dir",
    "standardize",
]

NAME = "cifar10"
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
# Records read and decoded at a time (bounds the memory of the raw records; the
# un-filter is fastest on a few thousand images at once).
_CHUNK = 2500

PathLike = str | os.PathLike[str]


# --------------------------------------------------------------------------------
# Locating and loading


@dataclasses.dataclass(frozen=True, eq=False)
class Cifar10:
    """CIFAR-10 held in host memory.

    Attributes:
      train_images: (N, 32, 32, 3) uint8, channels-last.
      train_labels: (N,) int32 in [0, 10).
      test_images: (M, 32, 32, 3) uint8.
      test_labels: (M,) int32.
      mean: (3,) float32 per-channel mean of ``train_images`` in the [0, 1] scale
        (pixel / 255); for the full train set (0.4914, 0.4822, 0.4465).
      std: (3,) float32 per-channel standard deviation (population, over all
        train pixels) in the same scale; full train set (0.2470, 0.2435, 0.2616).
      class_names: the 10 names, index = label.
      data_dir: the directory the data was read from.
    """

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    class_names: tuple[str, ...]
    data_dir: str

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _data_source(data_dir: str | None, split: str, *, download: bool) -> Any:
    """The TFDS random-access source of ``split``; images left PNG-encoded."""
    import tensorflow_datasets as tfds

    return open_source(
        NAME,
        split,
        data_dir,
        download=download,
        title="CIFAR-10",
        splits=("train", "test"),
        decoders={"image": tfds.decode.SkipDecoding()},
    )


def _read_records_public(
    source: Any, start: int, stop: int
) -> tuple[list[bytes], np.ndarray]:
    """PNG bytes and labels of records [start, stop) through TFDS's public path."""
    examples = source.__getitems__(range(start, stop))
    pngs = [ex["image"] for ex in examples]
    labels = np.array([ex["label"] for ex in examples], dtype=np.int32)
    return pngs, labels


def _read_records(source: Any, start: int, stop: int) -> tuple[list[bytes], np.ndarray]:
    """PNG bytes and labels of records [start, stop).

    Parses the serialized ``tf.train.Example`` records itself (5x faster than
    TFDS's per-record deserialization); falls back to the public path when the
    TFDS internals it relies on are missing.
    """
    raw_source = getattr(source, "data_source", None)
    try:
        from tensorflow_datasets.proto import tf_example_pb2
    except ImportError:  # pragma: no cover - depends on the TFDS version
        raw_source = None
    if raw_source is None:  # pragma: no cover - depends on the TFDS version
        return _read_records_public(source, start, stop)
    records = raw_source.__getitems__(range(start, stop))
    pngs = []
    labels = np.empty(len(records), np.int32)
    for i, record in enumerate(records):
        feature = tf_example_pb2.Example.FromString(record).features.feature
        pngs.append(feature["image"].bytes_list.value[0])
        labels[i] = feature["label"].int64_list.value[0]
    return pngs, labels


def _load_split(source: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` records: images (n, 32, 32, 3) uint8 and labels (n,) int32."""
    images = np.empty((n, *IMAGE_SHAPE), np.uint8)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        pngs, labels[start:stop] = _read_records(source, start, stop)
        images[start:stop] = _decode_pngs(pngs, IMAGE_SHAPE)
    return images, labels


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and population std of uint8 images, in [0, 1] scale."""
    flat = images.reshape(-1, images.shape[-1])
    values = np.arange(256, dtype=np.float64) / 255.0
    mean, std = [], []
    for ch in range(flat.shape[-1]):
        counts = np.bincount(flat[:, ch], minlength=256).astype(np.float64)
        total = counts.sum()
        mu = (counts * values).sum() / total
        mean.append(mu)
        std.append(math.sqrt((counts * (values - mu) ** 2).sum() / total))
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def _subset_size(subset: int | None, total: int, name: str) -> int:
    if subset is None:
        return total
    if not 0 < subset <= total:
        raise ValueError(f"{name} must be in [1, {total}], got {subset}.")
    return int(subset)


def load_cifar10(
    data_dir: PathLike | None = None,
    *,
    train_subset: int | None = None,
    test_subset: int | None = None,
    download: bool = False,
) -> Cifar10:
    """Reads CIFAR-10 into host memory (uint8).

    Args:
      data_dir: TFDS data directory (the one that contains ``cifar10/``); None
        means ``$TFDS_DATA_DIR``, else TFDS's default (see
        :func:`resolve_data_dir`).
      train_subset, test_subset: keep only the first k records of a split (for
        tests and quick runs; only those are read). TFDS stores the records in a
        shuffled order, so they are a random sample, roughly class-balanced.
        ``mean``/``std`` are then those of the kept train images.
      download: if the dataset is absent, let TFDS download and prepare it
        (needs internet). Off by default, so that a missing dataset fails at
        once with a :class:`DataNotFoundError` instead of trying the network.

    The full dataset takes about 8 s of one CPU core (TFDS's own decoding with
    Pillow: about 2.5x longer).
    """
    resolved = resolve_data_dir(data_dir)
    sources = {
        split: _data_source(resolved, split, download=download)
        for split in ("train", "test")
    }
    n_train = _subset_size(train_subset, len(sources["train"]), "train_subset")
    n_test = _subset_size(test_subset, len(sources["test"]), "test_subset")
    train_images, train_labels = _load_split(sources["train"], n_train)
    test_images, test_labels = _load_split(sources["test"], n_test)
    mean, std = _channel_stats(train_images)
    info = sources["train"].dataset_info
    return Cifar10(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        mean=mean,
        std=std,
        class_names=tuple(info.features["label"].names),
        data_dir=os.fspath(info.data_dir),
    )


# --------------------------------------------------------------------------------
# PNG decoding (8-bit, non-interlaced, as TFDS writes image features)

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}  # colour type -> channels


def _png_scanlines(png: bytes, shape: tuple[int, int, int]) -> bytes:
    """The decompressed (still filtered) scanlines of one PNG of ``shape``."""
    if png[:8] != _PNG_SIGNATURE:
        raise ValueError("not a PNG image")
    pos, idat = 8, []
    while pos < len(png):
        (length,) = struct.unpack_from(">I", png, pos)
        kind = png[pos + 4 : pos + 8]
        if kind == b"IHDR":
            width, height, depth, color, _, _, interlace = struct.unpack_from(
                ">IIBBBBB", png, pos + 8
            )
            if depth != 8 or interlace or _PNG_CHANNELS.get(color) != shape[2]:
                raise ValueError(
                    f"unsupported PNG (bit depth {depth}, colour type {color}, "
                    f"interlace {interlace}); expected 8-bit, {shape[2]} channels"
                )
            if (height, width) != shape[:2]:
                raise ValueError(f"PNG of {height}x{width}, expected {shape[:2]}")
        elif kind == b"IDAT":
            idat.append(png[pos + 8 : pos + 8 + length])
        elif kind == b"IEND":
            break
        pos += 12 + length
    scanlines = zlib.decompress(b"".join(idat))
    if len(scanlines) != shape[0] * (1 + shape[1] * shape[2]):
        raise ValueError(f"corrupt PNG: {len(scanlines)} bytes of scanlines")
    return scanlines


@functools.cache
def _paeth_table() -> np.ndarray:
    """Paeth predictor as an offset from ``c``, indexed by ``(a - c, b - c)``.

    The predictor is ``a``, ``b`` or ``c`` according to ``|b - c|``,
    ``|a - c|`` and ``|a + b - 2c|``, so it depends on ``a`` and ``b`` only
    through ``t = a - c`` and ``d = b - c``: the table holds ``t``, ``d`` or 0,
    flat (511 * 511,) int32 at ``(t + 255) * 511 + d + 255``.
    """
    t = np.arange(-255, 256, dtype=np.int32)[:, None]
    d = np.arange(-255, 256, dtype=np.int32)[None, :]
    pa, pb, pc = np.abs(d), np.abs(t), np.abs(t + d)
    offset = np.where((pa <= pb) & (pa <= pc), t, np.where(pb <= pc, d, 0))
    return offset.astype(np.int32).ravel()


def _unfilter(filtered: np.ndarray, channels: int) -> np.ndarray:
    """(N, H, 1 + W * C) PNG scanlines (filter byte first) -> (N, H, W, C) uint8.

    Rows are reconstructed one after the other, each for all N images at once:
    filters None/Sub/Up are whole-row NumPy operations; Average and Paeth, whose
    pixels depend on their left neighbour, loop over the W pixels of the row.
    """
    n, height, row_bytes = filtered.shape
    width = (row_bytes - 1) // channels
    kinds = filtered[:, :, 0]
    if kinds.max(initial=0) > 4:
        raise ValueError(f"invalid PNG filter type {kinds.max()}")
    raw = filtered[:, :, 1:].reshape(n, height, width, channels)
    out = np.empty((n, height, width, channels), np.uint8)
    prev = np.zeros((n, width, channels), np.uint8)
    table = _paeth_table()
    for r in range(height):
        x, kind = raw[:, r], kinds[:, r]
        row = x.copy()
        sel = kind == 1  # Sub: running sum along the row, modulo 256
        row[sel] = np.cumsum(x[sel], axis=1, dtype=np.uint8)
        sel = kind == 2  # Up
        row[sel] = x[sel] + prev[sel]
        for filter_type in (3, 4):  # Average, Paeth
            idx = np.flatnonzero(kind == filter_type)
            if idx.size == 0:
                continue
            # (W, images * C): one contiguous slice per pixel position
            xs = x[idx].transpose(1, 0, 2).reshape(width, -1).astype(np.int32)
            b = prev[idx].transpose(1, 0, 2).reshape(width, -1).astype(np.int32)
            res = np.empty_like(xs)
            a = np.zeros(xs.shape[1], np.int32)
            if filter_type == 3:
                for j in range(width):
                    a = (xs[j] + ((a + b[j]) >> 1)) & 255
                    res[j] = a
            else:
                c = np.zeros_like(b)
                c[1:] = b[:-1]
                base = (b - c + 255) + 511 * (255 - c)  # index minus 511 * a
                cx = c + xs
                index = np.empty_like(a)
                for j in range(width):
                    np.multiply(a, 511, out=index)
                    index += base[j]
                    a = table.take(index)
                    a += cx[j]
                    a &= 255
                    res[j] = a
            row[idx] = res.reshape(width, idx.size, channels).transpose(1, 0, 2)
        out[:, r] = row
        prev = row
    return out


def _decode_pngs(pngs: Sequence[bytes], shape: tuple[int, int, int]) -> np.ndarray:
    """PNG images, all of ``shape`` (H, W, C), -> (N, H, W, C) uint8."""
    height, width, channels = shape
    scanlines = b"".join(_png_scanlines(png, shape) for png in pngs)
    filtered = np.frombuffer(scanlines, np.uint8)
    return _unfilter(
        filtered.reshape(len(pngs), height, 1 + width * channels), channels
    )


# --------------------------------------------------------------------------------
# On-device transforms


@functools.partial(jax.jit, static_argnames=("dtype",))
def standardize(
    images: jax.Array, mean: jax.Array, std: jax.Array, *, dtype: Any = jnp.float32
) -> jax.Array:
    """``(images / 255 - mean) / std`` per channel.

    Args:
      images: (..., C) pixels in [0, 255], uint8 or float.
      mean, std: (C,) in the [0, 1] scale (``Cifar10.mean``, ``Cifar10.std``).
      dtype: output dtype (float32).
    Returns:
      (..., C) of ``dtype``.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    scale = 1.0 / (255.0 * std)
    return (images.astype(jnp.float32) * scale - mean / std).astype(dtype)


@functools.partial(jax.jit, static_argnames=("batch_size", "pad", "flip"))
def crop_flip_params(
    key: jax.Array, batch_size: int, *, pad: int = 4, flip: bool = True
) -> tuple[jax.Array, jax.Array]:
    """Random crop offsets (B, 2) int32 in [0, 2 * pad] (row, column) and flips
    (B,) bool (all False if not ``flip``), for :func:`crop_flip`."""
    k_offset, k_flip = jax.random.split(key)
    offsets = jax.random.randint(k_offset, (batch_size, 2), 0, 2 * pad + 1, jnp.int32)
    if flip:
        flips = jax.random.bernoulli(k_flip, 0.5, (batch_size,))
    else:
        flips = jnp.zeros((batch_size,), bool)
    return offsets, flips


@functools.partial(jax.jit, static_argnames=("pad", "mode"))
def crop_flip(
    images: jax.Array,
    offsets: jax.Array,
    flips: jax.Array,
    *,
    pad: int = 4,
    mode: Literal["constant", "reflect"] = "constant",
) -> jax.Array:
    """Pads by ``pad`` pixels on each side, crops back to (H, W) at ``offsets``,
    then flips left-right where ``flips``.

    Example i is ``padded[i, r:r + H, c:c + W]`` with ``(r, c) = offsets[i]``
    (offset ``pad`` is the identity crop), reversed along W if ``flips[i]``.

    Args:
      images: (B, H, W, C), any dtype (kept).
      offsets: (B, 2) int in [0, 2 * pad].
      flips: (B,) bool.
      pad: padding width.
      mode: ``"constant"`` pads with zeros (black), as for CIFAR ResNets (He et
        al. 2016); ``"reflect"`` mirrors the border.
    """
    n, height, width, _ = images.shape
    padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    padded = jnp.pad(images, padding, mode=mode) if pad else images
    # One gather for crop and flip (8x faster on CPU than a vmap of dynamic_slice).
    rows = offsets[:, 0:1] + jnp.arange(height)
    cols = jnp.where(flips[:, None], jnp.arange(width)[::-1], jnp.arange(width))
    cols = cols + offsets[:, 1:2]
    return padded[jnp.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


@functools.partial(jax.jit, static_argnames=("pad", "flip", "mode"))
def augment(
    key: jax.Array,
    images: jax.Array,
    *,
    pad: int = 4,
    flip: bool = True,
    mode: Literal["constant", "reflect"] = "constant",
) -> jax.Array:
    """Standard CIFAR augmentation on the device: per example, a random crop
    after zero padding by ``pad`` (``mode="reflect"`` mirrors instead) and a
    random horizontal flip. (B, H, W, C) -> same shape and dtype; deterministic
    in ``key``. The same as ``crop_flip(images, *crop_flip_params(key, B))``.

    Augment the uint8 images, then :func:`standardize`: the padding is then
    black, as in the usual (torchvision) pipeline; on standardized images it
    would be the mean colour instead."""
    offsets, flips = crop_flip_params(key, images.shape[0], pad=pad, flip=flip)
    return crop_flip(images, offsets, flips, pad=pad, mode=mode)


# --------------------------------------------------------------------------------
# Samplers (host-side, deterministic in the seed)

# Distinct streams for the same user seed in different samplers.
_PERMUTATION, _HOMOGENEOUS, _SKEWED, _HOMOGENEOUS_EVAL, _SKEWED_EVAL = range(5)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *stream])


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """A permutation (n,) int32 of ``range(n)``, a function of (seed, epoch) only:
    a different order every epoch, the same on every host and every resume."""
    return _rng(seed, _PERMUTATION, epoch).permutation(n).astype(np.int32)


def batch_indices(
    seed: int, epoch: int, n: int, batch_size: int, *, drop_last: bool = True
) -> np.ndarray:
    """The epoch's shuffled batches, (num_batches, batch_size) int32.

    ``drop_last`` drops the final ``n % batch_size`` examples of the permutation
    (different ones every epoch); otherwise the last batch is completed with the first
    examples of the same permutation, so every example is seen at least once.
    """
    _check_batch_size(batch_size)
    perm = epoch_permutation(seed, epoch, n)
    num_batches = n // batch_size if drop_last else -(-n // batch_size)
    if num_batches == 0:
        raise ValueError(f"n={n} is smaller than batch_size={batch_size}.")
    return np.resize(perm, num_batches * batch_size).reshape(num_batches, batch_size)


class Batches(NamedTuple):
    """Index batches that together cover a set exactly once, for evaluation.

    Attributes:
      indices: (num_batches, batch_size) int32. Padding slots repeat indices of
        the same batch, so a padded batch keeps its class composition.
      mask: (num_batches, batch_size) bool, False on padding: each index appears
        exactly once with mask True. Pass it to normjax norms (padding gets no
        weight in batch statistics) and to the metric.
      batch_class: (num_batches,) int32, the class of a homogeneous batch, the
        majority class of a skewed one, -1 for a mixed one.
    """

    indices: np.ndarray
    mask: np.ndarray
    batch_class: np.ndarray


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")


def _stack_batches(
    groups: Sequence[np.ndarray], classes: Sequence[int], batch_size: int
) -> Batches:
    """Batches from groups of at most ``batch_size`` indices, padded cyclically."""
    indices = np.empty((len(groups), batch_size), np.int32)
    mask = np.zeros((len(groups), batch_size), bool)
    for i, group in enumerate(groups):
        indices[i] = np.resize(group, batch_size)
        mask[i, : len(group)] = True
    return Batches(indices, mask, np.asarray(classes, np.int32).reshape(-1))


def eval_batches(n: int, batch_size: int) -> Batches:
    """``range(n)`` in order, in batches; the last one padded (mask False)."""
    _check_batch_size(batch_size)
    groups = [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    return _stack_batches(groups, [-1] * len(groups), batch_size)


def _class_indices(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}.")
    classes = np.unique(labels)
    return classes, [np.flatnonzero(labels == c) for c in classes]


class _ClassStream:
    """One class's indices drawn without replacement, reshuffled when exhausted."""

    def __init__(self, indices: np.ndarray, rng: np.random.Generator):
        self.indices, self.rng = indices, rng
        self.order, self.pos = rng.permutation(indices), 0

    def take(self, k: int) -> np.ndarray:
        """The next ``k`` indices; no repeats unless ``k`` exceeds the class."""
        parts: list[np.ndarray] = []
        while k > 0:
            if self.pos == len(self.order):
                order = self.rng.permutation(self.indices)
                if parts:  # this batch's indices go last in the new pass
                    seen = np.isin(order, np.concatenate(parts))
                    order = np.concatenate([order[~seen], order[seen]])
                self.order, self.pos = order, 0
            part = self.order[self.pos : self.pos + k]
            self.pos += len(part)
            k -= len(part)
            parts.append(part)
        return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _class_cycle(rng: np.random.Generator, num_classes: int, n: int) -> np.ndarray:
    """(n,) class positions: rounds of all classes, each round in a new order."""
    rounds = -(-n // num_classes)
    return np.concatenate([rng.permutation(num_classes) for _ in range(rounds)])[:n]


def class_homogeneous_batches(
    labels: np.ndarray, batch_size: int, *, seed: int, num_batches: int | None = None
) -> np.ndarray:
    """Training batches of a single class each, (num_batches, batch_size) int32.

    Classes take turns: every round of ``num_classes`` batches has one batch
    of each class, in a fresh random order. Within a class, examples are drawn
    without replacement and reshuffled once all were drawn (a class smaller than
    ``batch_size`` repeats examples within a batch). Rare classes are thus drawn
    as often as common ones. ``num_batches`` defaults to ``len(labels) //
    batch_size`` (one epoch's worth).
    """
    _check_batch_size(batch_size)
    classes, members = _class_indices(labels)
    num_batches = len(labels) // batch_size if num_batches is None else num_batches
    rng = _rng(seed, _HOMOGENEOUS)
    streams = [_ClassStream(m, rng) for m in members]
    order = _class_cycle(rng, len(classes), num_batches)
    out = np.empty((num_batches, batch_size), np.int32)
    for i, c in enumerate(order):
        out[i] = streams[c].take(batch_size)
    return out


def _skew_split(fraction: float, batch_size: int) -> tuple[int, int]:
    """(majority, minority) counts of a skewed batch."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    _check_batch_size(batch_size)
    k = max(1, round(fraction * batch_size))
    return k, batch_size - k


def class_skewed_batches(
    labels: np.ndarray,
    batch_size: int,
    *,
    fraction: float = 0.75,
    seed: int,
    num_batches: int | None = None,
) -> np.ndarray:
    """Training batches dominated by one class, (num_batches, batch_size) int32.

    Each batch holds ``k = round(fraction * batch_size)`` examples of its
    majority class (drawn as in :func:`class_homogeneous_batches`: classes take
    turns, without replacement within a class) and ``batch_size - k`` drawn
    uniformly without replacement from the examples of all other classes, in a
    random order within the batch. ``num_batches`` defaults to
    ``len(labels) // batch_size``.
    """
    k, m = _skew_split(fraction, batch_size)
    classes, members = _class_indices(labels)
    if len(classes) < 2 and m:
        raise ValueError("skewed batches need at least two classes.")
    num_batches = len(labels) // batch_size if num_batches is None else num_batches
    rng = _rng(seed, _SKEWED)
    streams = [_ClassStream(members_c, rng) for members_c in members]
    others = [
        np.concatenate([mb for j, mb in enumerate(members) if j != c])
        for c in range(len(classes))
    ]
    order = _class_cycle(rng, len(classes), num_batches)
    out = np.empty((num_batches, batch_size), np.int32)
    for i, c in enumerate(order):
        minority = rng.choice(others[c], m, replace=m > len(others[c]))
        out[i] = rng.permutation(np.concatenate([streams[c].take(k), minority]))
    return out


def class_homogeneous_eval_batches(
    labels: np.ndarray, batch_size: int, *, seed: int | None = None
) -> Batches:
    """Single-class batches covering every example exactly once.

    Each class's examples (in index order, or shuffled if ``seed`` is given) are
    cut into batches of ``batch_size``; the class's last batch is padded with its
    own examples (mask False). Batches are ordered by class; ``batch_class`` is
    the class. The CIFAR-10 test set (1000 per class) with ``batch_size=100``
    gives 100 full batches.
    """
    _check_batch_size(batch_size)
    classes, members = _class_indices(labels)
    rng = None if seed is None else _rng(seed, _HOMOGENEOUS_EVAL)
    groups, batch_class = [], []
    for c, members_c in zip(classes, members, strict=True):
        if rng is not None:
            members_c = rng.permutation(members_c)
        for s in range(0, len(members_c), batch_size):
            groups.append(members_c[s : s + batch_size])
            batch_class.append(c)
    return _stack_batches(groups, batch_class, batch_size)


def _apportion(
    total: int, weights: np.ndarray, caps: np.ndarray, lower: np.ndarray | None = None
) -> np.ndarray:
    """Integers ``lower <= take <= caps`` summing to ``min(total, caps.sum())``,
    what is above ``lower`` spread in proportion to ``weights`` (largest
    remainders). A ``lower`` summing to more than that is scaled down instead."""
    caps = np.asarray(caps, np.int64)
    total = min(int(total), int(caps.sum()))
    take = np.zeros(len(caps), np.int64) if lower is None else np.minimum(lower, caps)
    if take.sum() > total:
        return _apportion(total, take.astype(np.float64), take)
    while take.sum() < total:
        room = caps - take
        w = np.where(room > 0, weights, 0.0).astype(np.float64)
        if w.sum() <= 0:
            w = (room > 0).astype(np.float64)
        left = total - int(take.sum())
        share = left * w / w.sum()
        step = np.minimum(np.floor(share).astype(np.int64), room)
        if step.sum() == 0:  # hand out the largest remainders one by one
            step = np.zeros_like(take)
            step[np.argsort(-(share - np.floor(share)), kind="stable")[:left]] = 1
            step = np.minimum(step, room)
        take += step
    return take


def class_skewed_eval_batches(
    labels: np.ndarray, batch_size: int, *, fraction: float = 0.75, seed: int = 0
) -> Batches:
    """Class-skewed batches covering every example exactly once.

    There are ``ceil(n / batch_size)`` batches, given to the classes as majority
    class in proportion to their sizes (CIFAR-10 test, ``batch_size=100``: 10
    per class). Each holds ``k = round(fraction * batch_size)`` examples of its
    majority class and ``batch_size - k`` of the other classes, spread evenly
    over them (on the CIFAR-10 test set with ``batch_size=100``, 2 to 4 of each
    other class), all in a random order. For
    class-balanced labels with class sizes a multiple of ``batch_size`` (the
    CIFAR-10 test set with 50, 100, 200, ...) every batch is full and exactly
    skewed; otherwise the last batches are padded (mask False), and for very
    imbalanced labels a few examples may end in extra batches with a weaker
    skew. An example is either in its batch's majority
    (``labels[indices] == batch_class[:, None]``) or in its minority, which
    lets an evaluation report the two accuracies apart. Deterministic in
    ``seed``.
    """
    k, m = _skew_split(fraction, batch_size)
    classes, members = _class_indices(labels)
    n, num_classes = len(labels), len(classes)
    if num_classes < 2 and m:
        raise ValueError("skewed batches need at least two classes.")
    rng = _rng(seed, _SKEWED_EVAL)
    pools = [rng.permutation(members_c) for members_c in members]
    sizes = np.array([len(p) for p in pools])
    num_batches = -(-n // batch_size)
    per_class = _apportion(num_batches, sizes.astype(np.float64), sizes // k)
    # Interleave the classes' batches evenly: class c's j-th batch at (j + 1/2) / b_c.
    batch_class = np.repeat(np.arange(num_classes), per_class)
    position = [(np.arange(b) + 0.5) / b for b in per_class if b]
    if position:
        batch_class = batch_class[np.argsort(np.concatenate(position), kind="stable")]
    batches: list[list[np.ndarray]] = []
    used = np.zeros(num_classes, np.int64)
    for c in batch_class:
        batches.append([pools[c][used[c] : used[c] + k]])
        used[c] += k
    # Minority: what each class has left, spread over the other classes' batches.
    # A class can only go to batches of another majority class, so each batch
    # takes at least what would no longer fit into the later such batches
    # (with that, everything fits whenever it can: Hall's condition).
    later = np.bincount(batch_class, minlength=num_classes)  # batches of class
    for i, c in enumerate(batch_class):
        later[c] -= 1
        left = sizes - used
        caps = left.copy()
        caps[c] = 0
        eligible_after = (len(batch_class) - i - 1) - later
        lower = np.clip(left - m * eligible_after, 0, None)
        lower[c] = 0
        # spread each class evenly over the batches that can still take it
        rate = left / (eligible_after + 1.0)
        take = _apportion(m, rate, caps, lower)
        for j in np.flatnonzero(take):
            batches[i].append(pools[j][used[j] : used[j] + take[j]])
            used[j] += take[j]
    # Left over (only for imbalanced labels): into free slots of batches with
    # another majority class, else into extra batches.
    leftover = np.concatenate([pools[j][used[j] :] for j in range(num_classes)])
    leftover_class = np.searchsorted(classes, np.asarray(labels)[leftover])
    extra = []
    for idx, c in zip(leftover, leftover_class, strict=True):
        for i, bc in enumerate(batch_class):
            if bc != c and sum(len(p) for p in batches[i]) < batch_size:
                batches[i].append(np.array([idx]))
                break
        else:
            extra.append(idx)
    groups = [rng.permutation(np.concatenate(parts)) for parts in batches]
    group_class = [int(classes[c]) for c in batch_class]
    for s in range(0, len(extra), batch_size):
        group = np.asarray(extra[s : s + batch_size])
        counts = np.bincount(np.searchsorted(classes, np.asarray(labels)[group]))
        groups.append(group)
        group_class.append(int(classes[np.argmax(counts)]))
    return _stack_batches(groups, group_class, batch_size)
