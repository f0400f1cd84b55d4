"""Models that take their norm by registry name — CIFAR convnets (ResNet,
FastCNN) and a GPT-style decoder — and fast CPU layers."""

from normjax.models.common import image_mask, norm_layer
from normjax.models.fastcnn import FastCNN, Whitening, init_whitening, whitening_kernel
from normjax.models.layers import (
    Conv,
    WeightNormConv,
    backend_layers,
    conv2d,
    max_pool_2x2,
    weight_normed,
)
from normjax.models.resnet import BasicBlock, ResNet
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
    "backend_layers",
    "weight_normed",
    "WeightNormConv",
    "conv2d",
    "image_mask",
    "init_whitening",
    "max_pool_2x2",
    "norm_layer",
    "whitening_kernel",
]
