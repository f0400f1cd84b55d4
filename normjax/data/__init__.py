"""Datasets: CIFAR-10 (:mod:`normjax.data.cifar`), held in memory from TFDS files."""

from normjax.data import cifar

__all__ = ["cifar"]
