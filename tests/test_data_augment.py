"""normjax.data.augment: crops and flips against NumPy written out here."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from normjax.data import augment


def _images(dtype=np.uint8, shape=(6, 8, 10, 3)):
    x = np.random.default_rng(0).integers(0, 256, shape)
    return jnp.asarray(x.astype(dtype))


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
    offsets, flips = augment.crop_flip_params(jax.random.key(1), x.shape[0], pad=3)
    got = augment.crop_flip(x, offsets, flips, pad=3, mode=mode)
    assert got.dtype == x.dtype and got.shape == x.shape
    want = numpy_crop_flip(
        np.asarray(x), np.asarray(offsets), np.asarray(flips), 3, mode
    )
    np.testing.assert_array_equal(got, want)


def test_crop_flip_params_ranges():
    offsets, flips = augment.crop_flip_params(jax.random.key(0), 4096, pad=4)
    assert offsets.shape == (4096, 2) and flips.shape == (4096,)
    assert int(offsets.min()) == 0 and int(offsets.max()) == 8
    assert 0.45 < float(flips.mean()) < 0.55
    _, no_flips = augment.crop_flip_params(jax.random.key(0), 64, flip=False)
    assert not no_flips.any()


def test_augment_deterministic_keeps_dtype_and_is_crop_flip():
    x = _images(shape=(16, 32, 32, 3))
    key = jax.random.key(7)
    y = augment.augment(key, x)
    assert y.dtype == jnp.uint8 and y.shape == x.shape
    np.testing.assert_array_equal(y, augment.augment(key, x))
    assert not np.array_equal(y, augment.augment(jax.random.key(8), x))
    offsets, flips = augment.crop_flip_params(key, 16)
    np.testing.assert_array_equal(y, augment.crop_flip(x, offsets, flips))
    y32 = jax.jit(augment.augment)(key, x.astype(jnp.float32))
    assert y32.dtype == jnp.float32
    np.testing.assert_array_equal(y32, y.astype(jnp.float32))
    identity = augment.augment(key, x, pad=0, flip=False)
    np.testing.assert_array_equal(identity, x)


def test_flipping_twice_is_identity():
    x = _images()
    centre = jnp.full((x.shape[0], 2), 4, jnp.int32)
    flips = jnp.ones((x.shape[0],), bool)
    once = augment.crop_flip(x, centre, flips)
    np.testing.assert_array_equal(once, x[:, :, ::-1])
    np.testing.assert_array_equal(augment.crop_flip(once, centre, flips), x)
