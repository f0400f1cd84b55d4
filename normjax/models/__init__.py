"""CIFAR models that take their norm by registry name, and fast CPU layers."""

from normjax.models.layers import Conv, conv2d, max_pool_2x2
from normjax.models.resnet import (
    BasicBlock,
    FastCNN,
    ResNet,
    Whitening,
    init_whitening,
    whitening_kernel,
)

__all__ = [
    "BasicBlock",
    "Conv",
    "FastCNN",
    "ResNet",
    "Whitening",
    "conv2d",
    "init_whitening",
    "max_pool_2x2",
    "whitening_kernel",
]
