"""FastCNN: a small residual-free CIFAR net after airbench (Jordan 2024,
github.com/KellerJordan/cifar10-airbench) for CPU-sized runs, with its fixed
patch-whitening stem. Takes its norm by registry name, as every model here."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from normjax.models.common import image_mask, norm_layer
from normjax.models.layers import backend_layers

Array = jax.Array
ModuleDef = Callable[..., nn.Module]


def image_patches(images_NxHxWxC: Array, patch_size: int) -> Array:
    """All patch_size x patch_size patches (stride 1, VALID), flattened in the
    (row, column, channel) order of a conv kernel: patches_PxD, D = p*p*C."""
    n, h, w, c = images_NxHxWxC.shape
    p = patch_size
    taps = [
        images_NxHxWxC[:, i : i + h - p + 1, j : j + w - p + 1]
        for i in range(p)
        for j in range(p)
    ]
    return jnp.stack(taps, axis=3).reshape(-1, p * p * c)


def whitening_kernel(
    images_NxHxWxC: Array, patch_size: int = 2, eps: float = 5e-4
) -> tuple[Array, Array]:
    """Fixed conv filters that whiten the images' patches (airbench's stem).

    Eigen-decompose the covariance of all patch_size x patch_size patches,
    cov = V diag(lambda) V^T, and project a centred patch on each eigenvector
    scaled by 1/sqrt(lambda + eps), both signs (so that a GELU after it loses
    nothing): kernel (p, p, C, 2D), bias (2D,), D = p*p*C. The whitened patches
    have covariance diag(lambda / (lambda + eps)) ~ identity; ``eps`` damps the
    directions of least variance (airbench: 5e-4 on standardized images).
    """
    c = images_NxHxWxC.shape[-1]
    patches_PxD = image_patches(images_NxHxWxC.astype(jnp.float32), patch_size)
    mean_D = patches_PxD.mean(axis=0)
    centred_PxD = patches_PxD - mean_D
    cov_DxD = (
        jnp.matmul(centred_PxD.T, centred_PxD, precision=lax.Precision.HIGHEST)
        / patches_PxD.shape[0]
    )
    eigenvalues_D, eigenvectors_DxD = jnp.linalg.eigh(cov_DxD)
    filters_DxD = eigenvectors_DxD / jnp.sqrt(jnp.maximum(eigenvalues_D, 0.0) + eps)
    filters_DxD = filters_DxD[:, ::-1]  # largest variance first
    filters = jnp.concatenate([filters_DxD, -filters_DxD], axis=1)
    kernel = filters.reshape(patch_size, patch_size, c, -1)
    return kernel, -mean_D @ filters


class Whitening(nn.Module):
    """A conv (VALID) with fixed filters in ``constants/{kernel,bias}``, computed
    by ``whitening_kernel`` from the images the model is initialized with."""

    patch_size: int = 2
    eps: float = 5e-4

    @nn.compact
    def __call__(self, images_NxHxWxC: Array) -> Array:
        kernel: Array
        bias: Array
        if self.has_variable("constants", "kernel"):
            kernel = self.get_variable("constants", "kernel")
            bias = self.get_variable("constants", "bias")
        else:
            kernel, bias = whitening_kernel(images_NxHxWxC, self.patch_size, self.eps)
            self.put_variable("constants", "kernel", kernel)
            self.put_variable("constants", "bias", bias)
        y = lax.conv_general_dilated(
            images_NxHxWxC,
            kernel.astype(images_NxHxWxC.dtype),
            (1, 1),
            "VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        return y + bias.astype(y.dtype)


def init_whitening(
    variables: Mapping[str, Any], images_NxHxWxC: Array, eps: float = 5e-4
) -> dict[str, Any]:
    """``variables`` with every ``Whitening`` layer's ``constants/.../{kernel,
    bias}`` recomputed from ``images`` (airbench uses 5000 training images); the
    patch size is the stored kernel's. Pass the model's ``whitening_eps`` if it
    is not the default."""

    def refit(tree: Mapping[str, Any]) -> dict[str, Any]:
        if "kernel" in tree and "bias" in tree:
            kernel, bias = whitening_kernel(
                images_NxHxWxC, tree["kernel"].shape[0], eps
            )
            return {**tree, "kernel": kernel, "bias": bias}
        return {key: refit(value) for key, value in tree.items()}

    return {**variables, "constants": refit(variables["constants"])}


class FastCNN(nn.Module):
    """airbench-style CIFAR net for CPU-sized runs.

    Stem: a fixed 2x2 patch-whitening conv (``constants``), VALID, then GELU.
    Each stage: conv3x3 -> 2x2 max-pool -> norm -> GELU (pooling before the norm
    as airbench does: the norm and GELU then touch a quarter of the pixels).
    Head: global max over space, a dense layer without bias, logits times
    ``logit_scale`` (airbench's 1/9). 32x32 inputs: 31 -> 15 -> 7 -> 3 pixels.

    The whitening filters come from the images ``init`` is called with: pass real
    training images (a batch of 256 is enough), or refit them on more with
    ``init_whitening``. ``conv``, ``pool``: the convolution module and the 2x2
    max-pool (None: chosen by backend, see ``layers.backend_layers``).
    images_NxHxWxC -> logits_NxK.
    """

    widths: Sequence[int] = (32, 64, 128)
    num_classes: int = 10
    norm: str = "batch"
    norm_kwargs: Mapping[str, Any] | None = None
    logit_scale: float = 1 / 9
    whitening_eps: float = 5e-4
    conv: ModuleDef | None = None
    pool: Callable[[Array], Array] | None = None

    @nn.compact
    def __call__(
        self, images_NxHxWxC: Array, train: bool, mask: Array | None = None
    ) -> Array:
        """Logits (N, num_classes). ``mask`` (N,) bool marks the valid images of a
        padded batch: padding gets no weight in any batch statistic."""
        mask_Nx1x1x1 = image_mask(mask, images_NxHxWxC)
        conv, pool = backend_layers(self.conv, self.pool)
        x = nn.gelu(Whitening(eps=self.whitening_eps, name="whiten")(images_NxHxWxC))
        for stage, features in enumerate(self.widths, start=1):
            x = conv(features, (3, 3), use_bias=False, name=f"conv{stage}")(x)
            x = pool(x)
            x = norm_layer(self.norm, self.norm_kwargs, name=f"norm{stage}")(
                x, use_running_average=not train, mask=mask_Nx1x1x1
            )
            x = nn.gelu(x)
        x_NxC = x.max(axis=(1, 2))
        logits_NxK = nn.Dense(self.num_classes, use_bias=False, name="head")(x_NxC)
        return logits_NxK * self.logit_scale
