"""CIFAR-style augmentation on the device, jit-able, images channels-last
``(N, H, W, C)``: :func:`augment` (pad + random crop, random horizontal flip;
keeps the dtype), built from :func:`crop_flip_params` and :func:`crop_flip`."""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp

__all__ = ["augment", "crop_flip", "crop_flip_params"]


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

    Augment the uint8 images, then ``cifar.standardize_images``: the padding is then
    black, as in the usual (torchvision) pipeline; on standardized images it
    would be the mean colour instead."""
    offsets, flips = crop_flip_params(key, images.shape[0], pad=pad, flip=flip)
    return crop_flip(images, offsets, flips, pad=pad, mode=mode)
