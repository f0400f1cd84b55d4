"""normjax.data.cifar: loading real CIFAR-10 files (decoded by Pillow, checked
here against a PNG decoder written from the specification), the decoded-array
cache, and image standardization.

Tests that read the data find it through ``tfds_data.find`` (../shared/tfds,
$TFDS_DATA_DIR, a TFDS download) and skip with the reason otherwise.
"""

import hashlib
import os
import pathlib
import struct
import time
import zlib

import jax.numpy as jnp
import numpy as np
import pytest
import tfds_data

from normjax.data import cifar

DATA_DIR, _WHY = tfds_data.find("cifar10")
needs_data = tfds_data.needs("cifar10")

# sha256 of the first 100 train / test images as loaded, checked equal to Pillow's
# decoding of all 60 000 images when this test was written.
TRAIN_100_SHA256 = "7f5664c380b40e31c1b9e9dbbe17b4ac2fa1099e60faf4d53c996d4ac6f38af4"
TEST_100_SHA256 = "63147dbb65060d62abe70c7b5bf1cb17a1e45b49939084a4af1625653f3d4195"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@pytest.fixture(scope="module")
def small():
    return cifar.load_cifar10(DATA_DIR, train_subset=500, test_subset=200, cache=False)


@pytest.fixture(scope="module")
def full():
    start = time.perf_counter()
    data = cifar.load_cifar10(DATA_DIR)
    print(f"full CIFAR-10 load: {time.perf_counter() - start:.1f} s")
    return data


# ---------------------------------------------------------------------------------
# A PNG decoder written out here from the specification (every filter type): the
# reference that Pillow's decoding of the records is checked against.


def _paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _predict(kind, a, b, c):
    return [0, a, b, (a + b) // 2, _paeth(a, b, c)][kind]


def reference_png_decode(png: bytes) -> np.ndarray:
    pos, idat = 8, b""
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind = png[pos + 4 : pos + 8]
        if kind == b"IHDR":
            width, height, _, color = struct.unpack(">IIBB", png[pos + 8 : pos + 18])
        elif kind == b"IDAT":
            idat += png[pos + 8 : pos + 8 + length]
        pos += 12 + length
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    data, stride = zlib.decompress(idat), width * bpp
    prev, rows = [0] * stride, []
    for r in range(height):
        kind = data[r * (stride + 1)]
        line = list(data[r * (stride + 1) + 1 : (r + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            c = prev[i - bpp] if i >= bpp else 0
            line[i] = (line[i] + _predict(kind, a, prev[i], c)) & 255
        rows.append(line)
        prev = line
    return np.array(rows, np.uint8).reshape(height, width, bpp)


# ---------------------------------------------------------------------------------
# Locating and loading


def test_resolve_data_dir(monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", "/from/env")
    assert cifar.resolve_data_dir("/from/config") == "/from/config"
    assert cifar.resolve_data_dir(None) == "/from/env"
    assert cifar.resolve_data_dir("") == "/from/env"
    monkeypatch.setenv("TFDS_DATA_DIR", "")
    assert cifar.resolve_data_dir(None) is None
    monkeypatch.delenv("TFDS_DATA_DIR")
    assert cifar.resolve_data_dir(None) is None
    assert cifar.resolve_data_dir(pathlib.Path("~/d")) == os.path.expanduser("~/d")


def test_missing_dataset_fails_fast_and_says_where_and_how(tmp_path, monkeypatch):
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
    start = time.perf_counter()
    with pytest.raises(cifar.DataNotFoundError) as info:
        cifar.load_cifar10(tmp_path)
    assert time.perf_counter() - start < 10
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    for needle in (str(tmp_path), "TFDS_DATA_DIR", "--config.data_dir", "download"):
        assert needle in message
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing downloaded


@needs_data
def test_passing_the_dataset_folder_itself_gets_a_hint(tmp_path):
    with pytest.raises(cifar.DataNotFoundError, match="dataset folder itself"):
        cifar.load_cifar10(os.path.join(DATA_DIR, "cifar10"))


@needs_data
def test_subset_shapes_dtypes_and_content(small):
    assert small.train_images.shape == (500, 32, 32, 3)
    assert small.test_images.shape == (200, 32, 32, 3)
    assert small.train_images.dtype == small.test_images.dtype == np.uint8
    assert small.train_labels.shape == (500,) and small.test_labels.shape == (200,)
    assert small.train_labels.dtype == small.test_labels.dtype == np.int32
    for labels in (small.train_labels, small.test_labels):
        assert labels.min() >= 0 and labels.max() < 10
        assert len(np.unique(labels)) == 10  # the records are in shuffled order
    assert small.num_classes == 10 and small.class_names[0] == "airplane"
    assert small.mean.shape == small.std.shape == (3,)
    assert small.mean.dtype == small.std.dtype == np.float32
    digest = hashlib.sha256(small.train_images[:100].tobytes()).hexdigest()
    assert digest == TRAIN_100_SHA256
    assert hashlib.sha256(small.test_images[:100].tobytes()).hexdigest() == (
        TEST_100_SHA256
    )
    # mean/std are those of the images loaded, in [0, 1] scale
    x = small.train_images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(small.mean, x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(small.std, x.std(0), rtol=1e-5)


@needs_data
def test_records_equal_tfds_data_source(small):
    import tensorflow_datasets as tfds

    raw = tfds.data_source(
        "cifar10",
        data_dir=DATA_DIR,
        split="train",
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    for i in (0, 1, 250, 499):
        record = raw[i]
        assert record["label"] == small.train_labels[i]
        np.testing.assert_array_equal(
            reference_png_decode(record["image"]), small.train_images[i]
        )


@needs_data
def test_records_equal_tfds_decoded_images(small):
    try:
        import cv2  # noqa: F401
    except ImportError:
        pytest.importorskip(
            "PIL", reason="TFDS decodes images only with OpenCV or Pillow"
        )
    import tensorflow_datasets as tfds

    source = tfds.data_source("cifar10", data_dir=DATA_DIR, split="test")
    for i in (0, 7, 199):
        np.testing.assert_array_equal(source[i]["image"], small.test_images[i])
        assert source[i]["label"] == small.test_labels[i]


@needs_data
def test_full_dataset_counts_and_statistics(full):
    assert full.train_images.shape == (50000, 32, 32, 3)
    assert full.test_images.shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(full.train_labels), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(full.test_labels), [1000] * 10)
    np.testing.assert_allclose(full.mean, CIFAR_MEAN, atol=1e-4)
    np.testing.assert_allclose(full.std, CIFAR_STD, atol=1e-4)
    z = cifar.standardize_images(full.test_images[:2000], full.mean, full.std)
    assert z.dtype == jnp.float32
    np.testing.assert_allclose(z.mean((0, 1, 2)), 0, atol=0.05)
    np.testing.assert_allclose(z.std((0, 1, 2)), 1, atol=0.05)


# ---------------------------------------------------------------------------------
# The decoded-array cache


@needs_data
def test_a_second_load_reads_the_cache_not_the_images(small, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = cifar.load_cifar10(
        DATA_DIR, train_subset=500, test_subset=200, cache_dir=cache
    )
    files = sorted(p.name for p in cache.rglob("*.npz"))
    assert len(files) == 2 and all(".tmp" not in name for name in files)
    data_files = {p: p.stat().st_mtime_ns for p in pathlib.Path(DATA_DIR).rglob("*")}

    def no_decoding(*args, **kwargs):
        raise AssertionError("a cached split must not be decoded again")

    monkeypatch.setattr(cifar, "_decode", no_decoding)
    again = cifar.load_cifar10(
        DATA_DIR, train_subset=500, test_subset=200, cache_dir=cache
    )
    for got, want in zip(
        (again.train_images, again.train_labels, again.test_images, again.test_labels),
        (small.train_images, small.train_labels, small.test_images, small.test_labels),
        strict=True,
    ):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(first.train_images, small.train_images)
    # nothing was written into the (possibly read-only) TFDS data directory
    after = {p: p.stat().st_mtime_ns for p in pathlib.Path(DATA_DIR).rglob("*")}
    assert after == data_files


@needs_data
def test_an_unreadable_cache_file_is_decoded_again(small, tmp_path):
    cache = tmp_path / "cache"
    cifar.load_cifar10(DATA_DIR, train_subset=500, test_subset=200, cache_dir=cache)
    for path in cache.rglob("*.npz"):
        path.write_bytes(b"not an npz file")
    again = cifar.load_cifar10(
        DATA_DIR, train_subset=500, test_subset=200, cache_dir=cache
    )
    np.testing.assert_array_equal(again.train_images, small.train_images)
    np.testing.assert_array_equal(again.test_labels, small.test_labels)


@needs_data
def test_no_cache_writes_nothing_and_the_default_is_outside_data_dir(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("NORMJAX_CACHE_DIR", str(tmp_path / "env"))
    assert cifar.default_cache_dir() == tmp_path / "env"
    cifar.load_cifar10(DATA_DIR, train_subset=8, test_subset=8, cache=False)
    assert not (tmp_path / "env").exists()
    monkeypatch.delenv("NORMJAX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cifar.default_cache_dir() == tmp_path / "xdg" / "normjax"


# ---------------------------------------------------------------------------------
# On-device transforms


def _images(dtype=np.uint8, shape=(6, 8, 10, 3)):
    x = np.random.default_rng(0).integers(0, 256, shape)
    return jnp.asarray(x.astype(dtype))


def test_standardize_images_matches_numpy():
    x = _images()
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
    want = (np.asarray(x) / 255.0 - mean) / std
    for images in (x, x.astype(jnp.float32)):
        got = cifar.standardize_images(images, mean, std)
        assert got.dtype == jnp.float32 and got.shape == x.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert (
        cifar.standardize_images(x, mean, std, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    )
