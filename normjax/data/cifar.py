"""CIFAR-10 in host memory, from TFDS, with the decoded arrays cached.

:func:`load_cifar10` reads the TFDS ``cifar10`` dataset through
``tfds.data_source`` (array_record files, random access, no TensorFlow), decodes
its PNG images with Pillow, and keeps all of it in host memory as uint8: 50 000 +
10 000 images of 32x32x3, 184 MB. The decoded arrays are cached (``.npz`` files in
a user cache directory, never in the TFDS data directory, which may be
read-only), keyed by the dataset's files, so later loads read them back in well
under a second. The data directory is the argument (from the config), else
``$TFDS_DATA_DIR``, else TFDS's default (``~/tensorflow_datasets``). Nothing is
downloaded unless ``download=True``; a missing dataset raises
:class:`DataNotFoundError` saying where it looked and how to get the data.

:func:`standardize_images` maps pixels to per-channel standardized float32 on the
device. Augmentation is in :mod:`normjax.data.augment`, batch samplers in
:mod:`normjax.data.samplers`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import math
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from normjax.data.tfds_source import (
    DataNotFoundError,
    open_source,
    resolve_data_dir,
)

__all__ = [
    "Cifar10",
    "DataNotFoundError",
    "default_cache_dir",
    "load_cifar10",
    "resolve_data_dir",
    "standardize_images",
]

NAME = "cifar10"
IMAGE_SHAPE = (32, 32, 3)
# Records read and decoded at a time (bounds the memory of the raw records).
_CHUNK = 2500

PathLike = str | os.PathLike[str]


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


def default_cache_dir() -> pathlib.Path:
    """``$NORMJAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/normjax``, else
    ``~/.cache/normjax``."""
    explicit = os.environ.get("NORMJAX_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return pathlib.Path(base).expanduser() / "normjax"


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


def _decode(source: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` records: images (n, 32, 32, 3) uint8, labels (n,) int32."""
    from PIL import Image

    images = np.empty((n, *IMAGE_SHAPE), np.uint8)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, _CHUNK):
        stop = min(start + _CHUNK, n)
        for i, example in enumerate(source.__getitems__(range(start, stop))):
            with Image.open(io.BytesIO(example["image"])) as png:
                images[start + i] = np.asarray(png.convert("RGB"))
            labels[start + i] = example["label"]
    return images, labels


def _fingerprint(info: Any, split: str) -> str:
    """A key that changes when the split's files change: the dataset directory,
    version, and the name, size and modification time of each file."""
    directory = pathlib.Path(os.fspath(info.data_dir)).resolve()
    parts = [str(directory), str(info.version), split]
    for path in sorted(directory.glob(f"{NAME}-{split}.*")):
        status = path.stat()
        parts.append(f"{path.name}:{status.st_size}:{status.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _cached_split(
    source: Any, split: str, n: int, cache_dir: pathlib.Path | None
) -> tuple[np.ndarray, np.ndarray]:
    """The first ``n`` records of ``split``, from the cache when it holds them
    (the whole split, or exactly ``n`` records), else decoded and cached."""
    if cache_dir is None:
        return _decode(source, n)
    folder = cache_dir / NAME / str(source.dataset_info.version)
    key = _fingerprint(source.dataset_info, split)
    total = len(source)
    for count in dict.fromkeys((total, n)):  # the whole split first
        path = folder / f"{split}-{key}-n{count}.npz"
        if not path.exists():
            continue
        try:
            with np.load(path) as saved:
                images, labels = saved["images"], saved["labels"]
        except Exception:  # unreadable, for whatever reason: decode again
            continue
        if (
            images.shape == (count, *IMAGE_SHAPE)
            and images.dtype == np.uint8
            and labels.shape == (count,)
        ):
            # A subset is copied out, so the whole split is not kept alive.
            return (
                (images, labels)
                if n == count
                else (images[:n].copy(), labels[:n].copy())
            )
    images, labels = _decode(source, n)
    path = folder / f"{split}-{key}-n{n}.npz"
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp.npz")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(temporary, images=images, labels=labels)
        os.replace(temporary, path)  # atomic: readers never see half a file
    except OSError:  # a read-only cache: load from TFDS every time
        pass
    finally:
        temporary.unlink(missing_ok=True)
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
    cache_dir: PathLike | None = None,
    cache: bool = True,
) -> Cifar10:
    """Reads CIFAR-10 into host memory (uint8).

    Args:
      data_dir: TFDS data directory (the one that contains ``cifar10/``); None
        means ``$TFDS_DATA_DIR``, else TFDS's default (see
        :func:`resolve_data_dir`).
      train_subset, test_subset: keep only the first k records of a split (for
        tests and quick runs; only those are decoded). TFDS stores the records
        in a shuffled order, so they are a random sample, roughly
        class-balanced. ``mean``/``std`` are then those of the kept train images.
      download: if the dataset is absent, let TFDS download and prepare it
        (needs internet). Off by default, so that a missing dataset fails at
        once with a :class:`DataNotFoundError` instead of trying the network.
      cache_dir: where decoded arrays are cached (default
        :func:`default_cache_dir`).
      cache: False decodes from TFDS every time and writes nothing.

    Decoding the whole dataset takes about 15-25 s of one CPU core; a cached
    load well under a second.
    """
    resolved = resolve_data_dir(data_dir)
    folder: pathlib.Path | None = None
    if cache:
        chosen = default_cache_dir() if cache_dir in (None, "") else cache_dir
        folder = pathlib.Path(os.fspath(chosen)).expanduser()
    sources = {
        split: _data_source(resolved, split, download=download)
        for split in ("train", "test")
    }
    n_train = _subset_size(train_subset, len(sources["train"]), "train_subset")
    n_test = _subset_size(test_subset, len(sources["test"]), "test_subset")
    train_images, train_labels = _cached_split(
        sources["train"], "train", n_train, folder
    )
    test_images, test_labels = _cached_split(sources["test"], "test", n_test, folder)
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


@functools.partial(jax.jit, static_argnames=("dtype",))
def standardize_images(
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
