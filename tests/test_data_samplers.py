"""normjax.data.samplers: training and evaluation batches from labels."""

import numpy as np
import pytest

from normjax.data import samplers


def _balanced_labels(per_class=100, classes=10, seed=0):
    labels = np.repeat(np.arange(classes), per_class)
    return np.random.default_rng(seed).permutation(labels)


def test_epoch_permutation_and_batches():
    p = samplers.epoch_permutation(0, 0, 1000)
    np.testing.assert_array_equal(np.sort(p), np.arange(1000))
    np.testing.assert_array_equal(p, samplers.epoch_permutation(0, 0, 1000))
    assert not np.array_equal(p, samplers.epoch_permutation(0, 1, 1000))
    assert not np.array_equal(p, samplers.epoch_permutation(1, 0, 1000))
    b = samplers.batch_indices(0, 3, 1000, 64)
    assert b.shape == (15, 64) and b.dtype == np.int32
    np.testing.assert_array_equal(
        b.ravel(), samplers.epoch_permutation(0, 3, 1000)[:960]
    )
    b = samplers.batch_indices(0, 3, 1000, 64, drop_last=False)
    assert b.shape == (16, 64)
    np.testing.assert_array_equal(np.unique(b), np.arange(1000))


def test_class_homogeneous_batches():
    labels = _balanced_labels()
    b = samplers.class_homogeneous_batches(labels, 25, seed=0, num_batches=80)
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
        b, samplers.class_homogeneous_batches(labels, 25, seed=0, num_batches=80)
    )
    assert not np.array_equal(
        b, samplers.class_homogeneous_batches(labels, 25, seed=1, num_batches=80)
    )
    assert samplers.class_homogeneous_batches(labels, 32, seed=0).shape == (31, 32)


@pytest.mark.parametrize("fraction", [0.5, 0.75, 0.9])
def test_class_skewed_batches(fraction):
    labels = _balanced_labels()
    b = samplers.class_skewed_batches(labels, 40, fraction=fraction, seed=0)
    assert b.shape == (25, 40)
    k = round(fraction * 40)
    counts = np.stack([np.bincount(labels[row], minlength=10) for row in b])
    assert (counts.max(1) == k).all()
    assert (np.sort(counts, 1)[:, -2] < k).all()  # one majority class
    for row in b:
        assert len(np.unique(row)) == 40
    np.testing.assert_array_equal(
        b, samplers.class_skewed_batches(labels, 40, fraction=fraction, seed=0)
    )


def _assert_covers_once(batches, n):
    assert batches.indices.shape == batches.mask.shape
    assert batches.batch_class.shape == (batches.indices.shape[0],)
    np.testing.assert_array_equal(np.sort(batches.indices[batches.mask]), np.arange(n))
    assert batches.mask.any(1).all()  # no empty batch


def test_eval_batches_cover_once():
    b = samplers.eval_batches(1000, 64)
    _assert_covers_once(b, 1000)
    assert b.indices.shape == (16, 64) and b.mask.sum() == 1000
    assert b.mask[:-1].all() and (b.batch_class == -1).all()


@pytest.mark.parametrize("seed", [None, 3])
def test_class_homogeneous_eval_batches(seed):
    labels = _balanced_labels()
    b = samplers.class_homogeneous_eval_batches(labels, 30, seed=seed)
    _assert_covers_once(b, len(labels))
    assert b.indices.shape == (40, 30)  # 4 per class, the 4th padded
    assert (labels[b.indices] == b.batch_class[:, None]).all()  # padding too
    full = samplers.class_homogeneous_eval_batches(labels, 50, seed=seed)
    assert full.mask.all() and full.indices.shape == (20, 50)


@pytest.mark.parametrize("batch_size,fraction", [(100, 0.75), (50, 0.9), (200, 0.5)])
def test_class_skewed_eval_batches_on_a_cifar_like_test_set(batch_size, fraction):
    labels = _balanced_labels(per_class=1000)
    b = samplers.class_skewed_eval_batches(
        labels, batch_size, fraction=fraction, seed=0
    )
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
    again = samplers.class_skewed_eval_batches(labels, batch_size, fraction=fraction)
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
        b = samplers.class_skewed_eval_batches(labels, batch_size, fraction=fraction)
        _assert_covers_once(b, len(labels))
        assert np.isin(b.batch_class, labels).all()


def test_sampler_argument_errors():
    labels = _balanced_labels()
    with pytest.raises(ValueError, match="fraction"):
        samplers.class_skewed_batches(labels, 10, fraction=1.5, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        samplers.eval_batches(10, 0)
    with pytest.raises(ValueError, match="two classes"):
        samplers.class_skewed_eval_batches(np.zeros(10, int), 5)
