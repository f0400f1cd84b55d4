"""Models that take their norm by registry name (CIFAR convnets, a GPT-style
decoder), and fast CPU layers."""

from normjax.models.common import norm_layer
from normjax.models.layers import Conv, conv2d, max_pool_2x2
from normjax.models.resnet import (
    BasicBlock,
    FastCNN,
    ResNet,
    Whitening,
    init_whitening,
    whitening_kernel,
)
from normjax.models.transformer import Block, CausalSelfAttention, Transformer

__all__ = [
    "BasicBlock",
    "Block",
    "CausalSelfAttention",
    "Conv",
    "FastCNN",
    "ResNet",
    "Transformer",
    "Whitening",
    "conv2d",
    "init_whitening",
    "max_pool_2x2",
    "norm_layer",
    "whitening_kernel",
]
