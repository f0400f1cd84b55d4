"""The CIFAR ResNets of He et al. 2016 (sec. 4.2), taking their norm by registry
name.

Every norm is ``normjax.make_norm(norm, **norm_kwargs)``, called as
``norm(x, use_running_average=not train)``; nothing else in the model knows which
norm it is. Apply as ``model.apply(variables, images_NxHxWxC, train=True,
mutable=['batch_stats'])`` in training and ``train=False`` in evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from normjax.models.common import image_mask, norm_layer
from normjax.models.layers import backend_layers

Array = jax.Array
ModuleDef = Callable[..., nn.Module]


# ---------------------------------------------------------------------- ResNet


def shortcut_option_a(x_NxHxWxC: Array, features: int, strides: int) -> Array:
    """He et al.'s parameter-free shortcut ("option A"): subsample by the stride
    and pad the new channels with zeros."""
    x = x_NxHxWxC[:, ::strides, ::strides]
    return jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, features - x.shape[-1])))


class BasicBlock(nn.Module):
    """conv3x3 -> norm -> ReLU -> conv3x3 -> norm, plus the shortcut, -> ReLU."""

    features: int
    strides: int = 1
    norm: str = "batch"
    norm_kwargs: Mapping[str, Any] | None = None
    zero_init_residual: bool = False
    conv: ModuleDef | None = None

    @nn.compact
    def __call__(
        self, x_NxHxWxC: Array, train: bool, mask_Nx1x1x1: Array | None = None
    ) -> Array:
        conv = _conv3x3(backend_layers(self.conv)[0], self.features)
        residual = conv(strides=self.strides, name="conv1")(x_NxHxWxC)
        residual = norm_layer(self.norm, self.norm_kwargs, name="norm1")(
            residual, use_running_average=not train, mask=mask_Nx1x1x1
        )
        residual = conv(name="conv2")(nn.relu(residual))
        residual = norm_layer(
            self.norm,
            self.norm_kwargs,
            zero_scale=self.zero_init_residual,
            name="norm2",
        )(residual, use_running_average=not train, mask=mask_Nx1x1x1)
        shortcut = shortcut_option_a(x_NxHxWxC, self.features, self.strides)
        return nn.relu(residual + shortcut)


def _conv3x3(conv: ModuleDef, features: int) -> Callable[..., nn.Module]:
    # Padding 1 on both sides (not 'SAME', which pads a stride-2 conv only after)
    # centres stride-2 windows on the pixels option A's shortcut keeps.
    def make(strides: int = 1, name: str | None = None) -> nn.Module:
        return conv(
            features,
            (3, 3),
            strides=strides,
            padding=((1, 1), (1, 1)),
            use_bias=False,
            kernel_init=nn.initializers.he_normal(),
            name=name,
        )

    return make


class ResNet(nn.Module):
    """CIFAR ResNet of He et al. 2016: depth 6n+2 (8, 20, 32, 56, 110).

    A 3x3 conv, three stages of n basic blocks with 16, 32, 64 channels (times
    ``width / 16``; stages 2 and 3 start with stride 2 and a zero-padded identity
    shortcut), global average pooling and a dense layer. ResNet-20 has 0.27M
    parameters. ``zero_init_residual`` starts each block's last norm scale at 0
    (every block the identity at initialization) for norms that have a scale.
    ``conv``: the convolution module (None: chosen by backend, see
    ``layers.backend_layers``).

    images_NxHxWxC -> logits_NxK.
    """

    depth: int = 20
    num_classes: int = 10
    width: int = 16
    norm: str = "batch"
    norm_kwargs: Mapping[str, Any] | None = None
    zero_init_residual: bool = False
    conv: ModuleDef | None = None

    @nn.compact
    def __call__(
        self, images_NxHxWxC: Array, train: bool, mask: Array | None = None
    ) -> Array:
        """Logits (N, num_classes). ``mask`` (N,) bool marks the valid images of a
        padded batch: padding gets no weight in any batch statistic."""
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(f"depth must be 6n+2 with n >= 1, got {self.depth}.")
        blocks_per_stage = (self.depth - 2) // 6
        conv = backend_layers(self.conv)[0]
        x = _conv3x3(conv, self.width)(name="stem_conv")(images_NxHxWxC)
        mask_Nx1x1x1 = image_mask(mask, images_NxHxWxC)
        x = norm_layer(self.norm, self.norm_kwargs, name="stem_norm")(
            x, use_running_average=not train, mask=mask_Nx1x1x1
        )
        x = nn.relu(x)
        for stage in range(3):
            for block in range(blocks_per_stage):
                x = BasicBlock(
                    self.width * 2**stage,
                    strides=2 if stage > 0 and block == 0 else 1,
                    norm=self.norm,
                    norm_kwargs=self.norm_kwargs,
                    zero_init_residual=self.zero_init_residual,
                    conv=conv,
                    name=f"stage{stage + 1}_block{block + 1}",
                )(x, train, mask_Nx1x1x1)
        x_NxC = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x_NxC)
