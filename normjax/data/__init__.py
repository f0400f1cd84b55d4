"""Datasets from TFDS held in memory (:mod:`~normjax.data.cifar`,
:mod:`~normjax.data.text`), batch samplers (:mod:`~normjax.data.samplers`) and
on-device augmentation (:mod:`~normjax.data.augment`)."""

from normjax.data import augment, cifar, samplers

__all__ = ["augment", "cifar", "samplers"]
