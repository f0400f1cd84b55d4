"""normjax.data.cifar: loading real CIFAR-10 files, PNG decoding, augmentation,
samplers.

Tests that read the data find it through ``tfds_data.find`` (../shared/tfds,
$TFDS_DATA_DIR, a TFDS download) and skip with the reason otherwise.
"""

import hashlib
import os
import pathlib
import struct
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tfds_data

from normjax.data import cifar

DATA_DIR, _WHY = tfds_data.find("cifar10")
needs_data = pytest.mark.skipif(DATA_DIR is None, reason=_WHY)

# sha256 of the first 100 train / test images as loaded, checked equal to Pillow's
# decoding of all 60 000 images when this test was written.
TRAIN_100_SHA256 = "7f5664c380b40e31c1b9e9dbbe17b4ac2fa1099e60faf4d53c996d4ac6f38af4"
TEST_100_SHA256 = "63147dbb65060d62abe70c7b5bf1cb17a1e45b49939084a4af1625653f3d4195"
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


@pytest.fixture(scope="module")
def small():
    return cifar.load_cifar10(DATA_DIR, train_subset=500, test_subset=200)


@pytest.fixture(scope="module")
def full():
    start = time.perf_counter()
    data = cifar.load_cifar10(DATA_DIR)
    print(f"full CIFAR-10 load: {time.perf_counter() - start:.1f} s")
    return data


# ---------------------------------------------------------------------------------
# PNG references written out here: a scalar decoder and an encoder using every
# filter type, straight from the PNG specification.


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


def reference_png_encode(image: np.ndarray, kinds) -> bytes:
    height, width, bpp = image.shape
    flat = image.reshape(height, width * bpp).astype(int)
    data = b""
    for r, kind in enumerate(kinds):
        prev = flat[r - 1] if r else np.zeros(width * bpp, int)
        line = [kind]
        for i in range(width * bpp):
            a = flat[r, i - bpp] if i >= bpp else 0
            c = prev[i - bpp] if i >= bpp else 0
            line.append((flat[r, i] - _predict(kind, a, prev[i], c)) & 255)
        data += bytes(line)

    def chunk(kind, body):
        crc = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    color = {1: 0, 2: 4, 3: 2, 4: 6}[bpp]
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color, 0, 0, 0)
    z = zlib.compress(data)
    half = len(z) // 2  # two IDAT chunks, as the format allows
    return (
        cifar._PNG_SIGNATURE
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", z[:half])
        + chunk(b"IDAT", z[half:])
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("shape", [(9, 7, 3), (5, 4, 1), (6, 3, 4)])
def test_png_decoder_matches_reference_for_every_filter(shape):
    rng = np.random.default_rng(shape[0])
    images = rng.integers(0, 256, (12, *shape), dtype=np.uint8)
    images[0] = 255  # wrap-around extremes
    images[1] = 0
    pngs = [
        reference_png_encode(img, rng.integers(0, 5, shape[0]).tolist())
        for img in images
    ]
    for png, img in zip(pngs, images, strict=True):
        np.testing.assert_array_equal(reference_png_decode(png), img)
    np.testing.assert_array_equal(cifar._decode_pngs(pngs, shape), images)


def test_png_decoder_rejects_unsupported():
    png = reference_png_encode(np.zeros((4, 4, 3), np.uint8), [0] * 4)
    with pytest.raises(ValueError, match="expected"):
        cifar._decode_pngs([png], (4, 4, 1))
    sixteen_bit = png[:24] + b"\x10" + png[25:]  # bit depth 16
    with pytest.raises(ValueError, match="unsupported PNG"):
        cifar._decode_pngs([sixteen_bit], (4, 4, 3))


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
    # the fast record parser agrees with TFDS's public deserialization
    source = cifar._data_source(DATA_DIR, "test", download=False)
    fast = cifar._read_records(source, 0, 64)
    public = cifar._read_records_public(source, 0, 64)
    assert fast[0] == public[0]
    np.testing.assert_array_equal(fast[1], public[1])


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
    z = cifar.standardize(full.test_images[:2000], full.mean, full.std)
    assert z.dtype == jnp.float32
    np.testing.assert_allclose(z.mean((0, 1, 2)), 0, atol=0.05)
    np.testing.assert_allclose(z.std((0, 1, 2)), 1, atol=0.05)


# ---------------------------------------------------------------------------------
# On-device transforms


def _images(dtype=np.uint8, shape=(6, 8, 10, 3)):
    x = np.random.default_rng(0).integers(0, 256, shape)
    return jnp.asarray(x.astype(dtype))


def test_standardize_matches_numpy():
    x = _images()
    mean, std = np.array([0.5, 0.4, 0.3]), np.array([0.2, 0.25, 0.3])
    want = (np.asarray(x) / 255.0 - mean) / std
    for images in (x, x.astype(jnp.float32)):
        got = cifar.standardize(images, mean, std)
        assert got.dtype == jnp.float32 and got.shape == x.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert cifar.standardize(x, mean, std, dtype=jnp.bfloat16).dtype == jnp.bfloat16


def numpy_crop_flip(images, offsets, flips, pad, mode):
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    height, width = images.shape[1:3]
    out = []
    for image, (r, c), flip in zip(padded, offsets, flips, strict=True):
        crop = image[r : r + height, c : c + width]
        out.append(crop[:, ::-1] if flip else crop)
    return np.stack(out)


@pytest.mark.parametrize("mode", ["constant", "reflect"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_crop_flip_matches_numpy(mode, dtype):
    x = _images(dtype)
    offsets, flips = cifar.crop_flip_params(jax.random.key(1), x.shape[0], pad=3)
    got = cifar.crop_flip(x, offsets, flips, pad=3, mode=mode)
    assert got.dtype == x.dtype and got.shape == x.shape
    want = numpy_crop_flip(
        np.asarray(x), np.asarray(offsets), np.asarray(flips), 3, mode
    )
    np.testing.assert_array_equal(got, want)


def test_crop_flip_params_ranges():
    offsets, flips = cifar.crop_flip_params(jax.random.key(0), 4096, pad=4)
    assert offsets.shape == (4096, 2) and flips.shape == (4096,)
    assert int(offsets.min()) == 0 and int(offsets.max()) == 8
    assert 0.45 < float(flips.mean()) < 0.55
    _, no_flips = cifar.crop_flip_params(jax.random.key(0), 64, flip=False)
    assert not no_flips.any()


def test_augment_deterministic_keeps_dtype_and_is_crop_flip():
    x = _images(shape=(16, 32, 32, 3))
    key = jax.random.key(7)
    y = cifar.augment(key, x)
    assert y.dtype == jnp.uint8 and y.shape == x.shape
    np.testing.assert_array_equal(y, cifar.augment(key, x))
    assert not np.array_equal(y, cifar.augment(jax.random.key(8), x))
    offsets, flips = cifar.crop_flip_params(key, 16)
    np.testing.assert_array_equal(y, cifar.crop_flip(x, offsets, flips))
    y32 = jax.jit(cifar.augment)(key, x.astype(jnp.float32))
    assert y32.dtype == jnp.float32
    np.testing.assert_array_equal(y32, y.astype(jnp.float32))
    identity = cifar.augment(key, x, pad=0, flip=False)
    np.testing.assert_array_equal(identity, x)


def test_flipping_twice_is_identity():
    x = _images()
    centre = jnp.full((x.shape[0], 2), 4, jnp.int32)
    flips = jnp.ones((x.shape[0],), bool)
    once = cifar.crop_flip(x, centre, flips)
    np.testing.assert_array_equal(once, x[:, :, ::-1])
    np.testing.assert_array_equal(cifar.crop_flip(once, centre, flips), x)


# ---------------------------------------------------------------------------------
# Samplers


def _balanced_labels(per_class=100, classes=10, seed=0):
    labels = np.repeat(np.arange(classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def test_epoch_permutation_and_batches():
    p = cifar.epoch_permutation(0, 0, 1000)
    np.testing.assert_array_equal(np.sort(p), np.arange(1000))
    np.testing.assert_array_equal(p, cifar.epoch_permutation(0, 0, 1000))
    assert not np.array_equal(p, cifar.epoch_permutation(0, 1, 1000))
    assert not np.array_equal(p, cifar.epoch_permutation(1, 0, 1000))
    b = cifar.batch_indices(0, 3, 1000, 64)
    assert b.shape == (15, 64) and b.dtype == np.int32
    np.testing.assert_array_equal(b.ravel(), cifar.epoch_permutation(0, 3, 1000)[:960])
    b = cifar.batch_indices(0, 3, 1000, 64, drop_last=False)
    assert b.shape == (16, 64)
    np.testing.assert_array_equal(np.unique(b), np.arange(1000))


def test_class_homogeneous_batches():
    labels = _balanced_labels()
    b = cifar.class_homogeneous_batches(labels, 25, seed=0, num_batches=80)
    assert b.shape == (80, 25)
    batch_class = labels[b[:, 0]]
    assert (labels[b] == batch_class[:, None]).all()
    for r in range(8):  # every round of 10 batches has each class once
        np.testing.assert_array_equal(
            np.sort(batch_class[10 * r : 10 * r + 10]), range(10)
        )
    # without replacement within a class: a class's first 4 batches are its 100
    for c in range(10):
        first = b[batch_class == c][:4].ravel()
        assert len(np.unique(first)) == 100
    np.testing.assert_array_equal(
        b, cifar.class_homogeneous_batches(labels, 25, seed=0, num_batches=80)
    )
    assert not np.array_equal(
        b, cifar.class_homogeneous_batches(labels, 25, seed=1, num_batches=80)
    )
    assert cifar.class_homogeneous_batches(labels, 32, seed=0).shape == (31, 32)


@pytest.mark.parametrize("fraction", [0.5, 0.75, 0.9])
def test_class_skewed_batches(fraction):
    labels = _balanced_labels()
    b = cifar.class_skewed_batches(labels, 40, fraction=fraction, seed=0)
    assert b.shape == (25, 40)
    k = round(fraction * 40)
    counts = np.stack([np.bincount(labels[row], minlength=10) for row in b])
    assert (counts.max(1) == k).all()
    assert (np.sort(counts, 1)[:, -2] < k).all()  # one majority class
    for row in b:
        assert len(np.unique(row)) == 40
    np.testing.assert_array_equal(
        b, cifar.class_skewed_batches(labels, 40, fraction=fraction, seed=0)
    )


def _assert_covers_once(batches, n):
    assert batches.indices.shape == batches.mask.shape
    assert batches.batch_class.shape == (batches.indices.shape[0],)
    np.testing.assert_array_equal(np.sort(batches.indices[batches.mask]), np.arange(n))
    assert batches.mask.any(1).all()  # no empty batch


def test_eval_batches_cover_once():
    b = cifar.eval_batches(1000, 64)
    _assert_covers_once(b, 1000)
    assert b.indices.shape == (16, 64) and b.mask.sum() == 1000
    assert b.mask[:-1].all() and (b.batch_class == -1).all()


@pytest.mark.parametrize("seed", [None, 3])
def test_class_homogeneous_eval_batches(seed):
    labels = _balanced_labels()
    b = cifar.class_homogeneous_eval_batches(labels, 30, seed=seed)
    _assert_covers_once(b, len(labels))
    assert b.indices.shape == (40, 30)  # 4 per class, the 4th padded
    assert (labels[b.indices] == b.batch_class[:, None]).all()  # padding too
    full = cifar.class_homogeneous_eval_batches(labels, 50, seed=seed)
    assert full.mask.all() and full.indices.shape == (20, 50)


@pytest.mark.parametrize("batch_size,fraction", [(100, 0.75), (50, 0.9), (200, 0.5)])
def test_class_skewed_eval_batches_on_a_cifar_like_test_set(batch_size, fraction):
    labels = _balanced_labels(per_class=1000)
    b = cifar.class_skewed_eval_batches(labels, batch_size, fraction=fraction, seed=0)
    _assert_covers_once(b, len(labels))
    assert b.mask.all() and b.indices.shape == (10000 // batch_size, batch_size)
    np.testing.assert_array_equal(
        np.bincount(b.batch_class), [len(b.indices) // 10] * 10
    )
    k = round(fraction * batch_size)
    majority = labels[b.indices] == b.batch_class[:, None]
    assert (majority.sum(1) == k).all()
    minority = np.stack([np.bincount(labels[r], minlength=10) for r in b.indices])
    minority[np.arange(len(b.indices)), b.batch_class] = 0
    assert minority.max() - minority[minority > 0].min() <= 2  # spread evenly
    again = cifar.class_skewed_eval_batches(labels, batch_size, fraction=fraction)
    np.testing.assert_array_equal(b.indices, again.indices)


def test_class_skewed_eval_batches_cover_any_labels():
    rng = np.random.default_rng(0)
    for _ in range(25):
        classes = int(rng.integers(2, 12))
        p = rng.dirichlet(np.full(classes, rng.choice([0.3, 1.0, 10.0])))
        labels = rng.choice(classes, int(rng.integers(2, 300)), p=p)
        if len(np.unique(labels)) < 2:
            continue
        batch_size = int(rng.integers(1, 40))
        fraction = float(rng.uniform(0.05, 1.0))
        b = cifar.class_skewed_eval_batches(labels, batch_size, fraction=fraction)
        _assert_covers_once(b, len(labels))
        assert np.isin(b.batch_class, labels).all()


def test_sampler_argument_errors():
    labels = _balanced_labels()
    with pytest.raises(ValueError, match="fraction"):
        cifar.class_skewed_batches(labels, 10, fraction=1.5, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        cifar.eval_batches(10, 0)
    with pytest.raises(ValueError, match="two classes"):
        cifar.class_skewed_eval_batches(np.zeros(10, int), 5)
