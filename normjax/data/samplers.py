"""Samplers: host-side NumPy index arrays, deterministic in their seed.

They take labels (or a count), never images, and return indices to gather with
``images[idx]``: for training ``(num_batches, batch_size)`` arrays —
:func:`epoch_permutation` / :func:`batch_indices` for ordinary training,
:func:`class_homogeneous_batches` and :func:`class_skewed_batches` for single-class
or class-skewed batches; for evaluation :class:`Batches` (indices plus a
validity mask) that cover a split exactly once — :func:`eval_batches`,
:func:`class_homogeneous_eval_batches`, :func:`class_skewed_eval_batches`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "Batches",
    "batch_indices",
    "class_homogeneous_batches",
    "class_homogeneous_eval_batches",
    "class_skewed_batches",
    "class_skewed_eval_batches",
    "epoch_permutation",
    "eval_batches",
]

# Distinct streams for the same user seed in different samplers.
_PERMUTATION, _HOMOGENEOUS, _SKEWED, _HOMOGENEOUS_EVAL, _SKEWED_EVAL = range(5)


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *stream])


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    """A permutation (n,) int32 of ``range(n)``, a function of (seed, epoch) only:
    a different order every epoch, the same on every host and every resume."""
    return _rng(seed, _PERMUTATION, epoch).permutation(n).astype(np.int32)


def batch_indices(
    seed: int, epoch: int, n: int, batch_size: int, *, drop_last: bool = True
) -> np.ndarray:
    """The epoch's shuffled batches, (num_batches, batch_size) int32.

    ``drop_last`` drops the final ``n % batch_size`` examples of the permutation
    (different ones every epoch); otherwise the last batch is completed with the first
    examples of the same permutation, so every example is seen at least once.
    """
    _check_batch_size(batch_size)
    perm = epoch_permutation(seed, epoch, n)
    num_batches = n // batch_size if drop_last else -(-n // batch_size)
    if num_batches == 0:
        raise ValueError(f"n={n} is smaller than batch_size={batch_size}.")
    return np.resize(perm, num_batches * batch_size).reshape(num_batches, batch_size)


class Batches(NamedTuple):
    """Index batches that together cover a set exactly once, for evaluation.

    Attributes:
      indices: (num_batches, batch_size) int32. Padding slots repeat indices of
        the same batch, so a padded batch keeps its class composition.
      mask: (num_batches, batch_size) bool, False on padding: each index appears
        exactly once with mask True. Pass it to normjax norms (padding gets no
        weight in batch statistics) and to the metric.
      batch_class: (num_batches,) int32, the class of a homogeneous batch, the
        majority class of a skewed one, -1 for a mixed one.
    """

    indices: np.ndarray
    mask: np.ndarray
    batch_class: np.ndarray


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}.")


def _stack_batches(
    groups: Sequence[np.ndarray], classes: Sequence[int], batch_size: int
) -> Batches:
    """Batches from groups of at most ``batch_size`` indices, padded cyclically."""
    indices = np.empty((len(groups), batch_size), np.int32)
    mask = np.zeros((len(groups), batch_size), bool)
    for i, group in enumerate(groups):
        indices[i] = np.resize(group, batch_size)
        mask[i, : len(group)] = True
    return Batches(indices, mask, np.asarray(classes, np.int32).reshape(-1))


def eval_batches(n: int, batch_size: int) -> Batches:
    """``range(n)`` in order, in batches; the last one padded (mask False)."""
    _check_batch_size(batch_size)
    groups = [np.arange(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    return _stack_batches(groups, [-1] * len(groups), batch_size)


def _class_indices(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}.")
    classes = np.unique(labels)
    return classes, [np.flatnonzero(labels == c) for c in classes]


class _ClassStream:
    """One class's indices drawn without replacement, reshuffled when exhausted."""

    def __init__(self, indices: np.ndarray, rng: np.random.Generator):
        self.indices, self.rng = indices, rng
        self.order, self.pos = rng.permutation(indices), 0

    def take(self, k: int) -> np.ndarray:
        """The next ``k`` indices; no repeats unless ``k`` exceeds the class."""
        parts: list[np.ndarray] = []
        while k > 0:
            if self.pos == len(self.order):
                order = self.rng.permutation(self.indices)
                if parts:  # this batch's indices go last in the new pass
                    seen = np.isin(order, np.concatenate(parts))
                    order = np.concatenate([order[~seen], order[seen]])
                self.order, self.pos = order, 0
            part = self.order[self.pos : self.pos + k]
            self.pos += len(part)
            k -= len(part)
            parts.append(part)
        return np.concatenate(parts) if parts else np.empty(0, np.int64)


def _class_cycle(rng: np.random.Generator, num_classes: int, n: int) -> np.ndarray:
    """(n,) class positions: rounds of all classes, each round in a new order."""
    rounds = -(-n // num_classes)
    return np.concatenate([rng.permutation(num_classes) for _ in range(rounds)])[:n]


def class_homogeneous_batches(
    labels: np.ndarray, batch_size: int, *, seed: int, num_batches: int | None = None
) -> np.ndarray:
    """Training batches of a single class each, (num_batches, batch_size) int32.

    Classes take turns: every round of ``num_classes`` batches has one batch
    of each class, in a fresh random order. Within a class, examples are drawn
    without replacement and reshuffled once all were drawn (a class smaller than
    ``batch_size`` repeats examples within a batch). Rare classes are thus drawn
    as often as common ones. ``num_batches`` defaults to ``len(labels) //
    batch_size`` (one epoch's worth).
    """
    _check_batch_size(batch_size)
    classes, members = _class_indices(labels)
    num_batches = len(labels) // batch_size if num_batches is None else num_batches
    rng = _rng(seed, _HOMOGENEOUS)
    streams = [_ClassStream(m, rng) for m in members]
    order = _class_cycle(rng, len(classes), num_batches)
    out = np.empty((num_batches, batch_size), np.int32)
    for i, c in enumerate(order):
        out[i] = streams[c].take(batch_size)
    return out


def _skew_split(fraction: float, batch_size: int) -> tuple[int, int]:
    """(majority, minority) counts of a skewed batch."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}.")
    _check_batch_size(batch_size)
    k = max(1, round(fraction * batch_size))
    return k, batch_size - k


def class_skewed_batches(
    labels: np.ndarray,
    batch_size: int,
    *,
    fraction: float = 0.75,
    seed: int,
    num_batches: int | None = None,
) -> np.ndarray:
    """Training batches dominated by one class, (num_batches, batch_size) int32.

    Each batch holds ``k = round(fraction * batch_size)`` examples of its
    majority class (drawn as in :func:`class_homogeneous_batches`: classes take
    turns, without replacement within a class) and ``batch_size - k`` drawn
    uniformly without replacement from the examples of all other classes, in a
    random order within the batch. ``num_batches`` defaults to
    ``len(labels) // batch_size``.
    """
    k, m = _skew_split(fraction, batch_size)
    classes, members = _class_indices(labels)
    if len(classes) < 2 and m:
        raise ValueError("skewed batches need at least two classes.")
    num_batches = len(labels) // batch_size if num_batches is None else num_batches
    rng = _rng(seed, _SKEWED)
    streams = [_ClassStream(members_c, rng) for members_c in members]
    others = [
        np.concatenate([mb for j, mb in enumerate(members) if j != c])
        for c in range(len(classes))
    ]
    order = _class_cycle(rng, len(classes), num_batches)
    out = np.empty((num_batches, batch_size), np.int32)
    for i, c in enumerate(order):
        minority = rng.choice(others[c], m, replace=m > len(others[c]))
        out[i] = rng.permutation(np.concatenate([streams[c].take(k), minority]))
    return out


def class_homogeneous_eval_batches(
    labels: np.ndarray, batch_size: int, *, seed: int | None = None
) -> Batches:
    """Single-class batches covering every example exactly once.

    Each class's examples (in index order, or shuffled if ``seed`` is given) are
    cut into batches of ``batch_size``; the class's last batch is padded with its
    own examples (mask False). Batches are ordered by class; ``batch_class`` is
    the class. The CIFAR-10 test set (1000 per class) with ``batch_size=100``
    gives 100 full batches.
    """
    _check_batch_size(batch_size)
    classes, members = _class_indices(labels)
    rng = None if seed is None else _rng(seed, _HOMOGENEOUS_EVAL)
    groups, batch_class = [], []
    for c, members_c in zip(classes, members, strict=True):
        if rng is not None:
            members_c = rng.permutation(members_c)
        for s in range(0, len(members_c), batch_size):
            groups.append(members_c[s : s + batch_size])
            batch_class.append(c)
    return _stack_batches(groups, batch_class, batch_size)


def _apportion(
    total: int, weights: np.ndarray, caps: np.ndarray, lower: np.ndarray | None = None
) -> np.ndarray:
    """Integers ``lower <= take <= caps`` summing to ``min(total, caps.sum())``,
    what is above ``lower`` spread in proportion to ``weights`` (largest
    remainders). A ``lower`` summing to more than that is scaled down instead."""
    caps = np.asarray(caps, np.int64)
    total = min(int(total), int(caps.sum()))
    take = np.zeros(len(caps), np.int64) if lower is None else np.minimum(lower, caps)
    if take.sum() > total:
        return _apportion(total, take.astype(np.float64), take)
    while take.sum() < total:
        room = caps - take
        w = np.where(room > 0, weights, 0.0).astype(np.float64)
        if w.sum() <= 0:
            w = (room > 0).astype(np.float64)
        left = total - int(take.sum())
        share = left * w / w.sum()
        step = np.minimum(np.floor(share).astype(np.int64), room)
        if step.sum() == 0:  # hand out the largest remainders one by one
            step = np.zeros_like(take)
            step[np.argsort(-(share - np.floor(share)), kind="stable")[:left]] = 1
            step = np.minimum(step, room)
        take += step
    return take


def class_skewed_eval_batches(
    labels: np.ndarray, batch_size: int, *, fraction: float = 0.75, seed: int = 0
) -> Batches:
    """Class-skewed batches covering every example exactly once.

    There are ``ceil(n / batch_size)`` batches, given to the classes as majority
    class in proportion to their sizes (CIFAR-10 test, ``batch_size=100``: 10
    per class). Each holds ``k = round(fraction * batch_size)`` examples of its
    majority class and ``batch_size - k`` of the other classes, spread evenly
    over them (on the CIFAR-10 test set with ``batch_size=100``, 2 to 4 of each
    other class), all in a random order. For
    class-balanced labels with class sizes a multiple of ``batch_size`` (the
    CIFAR-10 test set with 50, 100, 200, ...) every batch is full and exactly
    skewed; otherwise the last batches are padded (mask False), and for very
    imbalanced labels a few examples may end in extra batches with a weaker
    skew. An example is either in its batch's majority
    (``labels[indices] == batch_class[:, None]``) or in its minority, which
    lets an evaluation report the two accuracies apart. Deterministic in
    ``seed``.
    """
    k, m = _skew_split(fraction, batch_size)
    classes, members = _class_indices(labels)
    n, num_classes = len(labels), len(classes)
    if num_classes < 2 and m:
        raise ValueError("skewed batches need at least two classes.")
    rng = _rng(seed, _SKEWED_EVAL)
    pools = [rng.permutation(members_c) for members_c in members]
    sizes = np.array([len(p) for p in pools])
    num_batches = -(-n // batch_size)
    per_class = _apportion(num_batches, sizes.astype(np.float64), sizes // k)
    # Interleave the classes' batches evenly: class c's j-th batch at (j + 1/2) / b_c.
    batch_class = np.repeat(np.arange(num_classes), per_class)
    position = [(np.arange(b) + 0.5) / b for b in per_class if b]
    if position:
        batch_class = batch_class[np.argsort(np.concatenate(position), kind="stable")]
    batches: list[list[np.ndarray]] = []
    used = np.zeros(num_classes, np.int64)
    for c in batch_class:
        batches.append([pools[c][used[c] : used[c] + k]])
        used[c] += k
    # Minority: what each class has left, spread over the other classes' batches.
    # A class can only go to batches of another majority class, so each batch
    # takes at least what would no longer fit into the later such batches
    # (with that, everything fits whenever it can: Hall's condition).
    later = np.bincount(batch_class, minlength=num_classes)  # batches of class
    for i, c in enumerate(batch_class):
        later[c] -= 1
        left = sizes - used
        caps = left.copy()
        caps[c] = 0
        eligible_after = (len(batch_class) - i - 1) - later
        lower = np.clip(left - m * eligible_after, 0, None)
        lower[c] = 0
        # spread each class evenly over the batches that can still take it
        rate = left / (eligible_after + 1.0)
        take = _apportion(m, rate, caps, lower)
        for j in np.flatnonzero(take):
            batches[i].append(pools[j][used[j] : used[j] + take[j]])
            used[j] += take[j]
    # Left over (only for imbalanced labels): into free slots of batches with
    # another majority class, else into extra batches.
    leftover = np.concatenate([pools[j][used[j] :] for j in range(num_classes)])
    leftover_class = np.searchsorted(classes, np.asarray(labels)[leftover])
    extra = []
    for idx, c in zip(leftover, leftover_class, strict=True):
        for i, bc in enumerate(batch_class):
            if bc != c and sum(len(p) for p in batches[i]) < batch_size:
                batches[i].append(np.array([idx]))
                break
        else:
            extra.append(idx)
    groups = [rng.permutation(np.concatenate(parts)) for parts in batches]
    group_class = [int(classes[c]) for c in batch_class]
    for s in range(0, len(extra), batch_size):
        group = np.asarray(extra[s : s + batch_size])
        counts = np.bincount(np.searchsorted(classes, np.asarray(labels)[group]))
        groups.append(group)
        group_class.append(int(classes[np.argmax(counts)]))
    return _stack_batches(groups, group_class, batch_size)
