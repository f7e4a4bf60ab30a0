"""The samples `distill` trains on: the run's calibration batches joined sample by sample,
and a seeded split into training rows and held-out rows that choose the weights."""

from __future__ import annotations

import numpy as np

from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassContext
from onnxcompress.samples import ArraySource, SampleSource


def stacked_samples(
    context: PassContext, who: str = "distill"
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Every calibration sample, each input's batches joined on its first axis, and the
    labels (None without them or without `labels=true` data the same length)."""
    batches = list(context.calibration or [])
    names = list(batches[0])
    for batch in batches:
        if set(batch) != set(names) or len({len(batch[name]) for name in names}) != 1:
            raise CompressError(
                f"{who}: every input must hold the batch's samples on its first axis"
            )
    samples = {name: np.concatenate([batch[name] for batch in batches]) for name in names}
    labels = context.labels
    if labels is not None and len(labels) != len(samples[names[0]]):
        labels = None
    return samples, labels


def sample_count(samples: dict[str, np.ndarray]) -> int:
    return len(next(iter(samples.values())))


def split_rows(
    count: int, holdout: float, seed: int, who: str = "distill"
) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows): a seeded `holdout` share held out, at least one row
    each side."""
    if count < 2:
        raise CompressError(f"{who}: needs at least 2 calibration samples, got {count}")
    held = min(count - 1, max(1, round(count * holdout)))
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[held:]), np.sort(order[:held])


def training_and_held_out(
    context: PassContext, holdout: float, seed: int, who: str = "distill"
) -> tuple[SampleSource, dict[str, np.ndarray] | list[dict[str, np.ndarray]]]:
    """(what to train on, the held-out samples that choose the weights): the run's training
    set when it has one, else the calibration samples not held out. Calibration batches of
    different shapes (sentences padded per batch) cannot be joined: with a training set, a
    seeded `holdout` share of whole batches is held out; without one, refused."""
    batches = list(context.calibration or [])
    if not _one_shape(batches):
        if context.training is None:
            raise CompressError(
                f"{who}: the calibration batches differ in shape past the batch axis (e.g. "
                "sentences padded per batch); give --train-data of one shape to train on"
            )
        _, held_batches = split_rows(len(batches), holdout, seed, who)
        return context.training, [batches[index] for index in held_batches]
    samples, labels = stacked_samples(context, who)
    train_rows, held_rows = split_rows(sample_count(samples), holdout, seed, who)
    held = {name: value[held_rows] for name, value in samples.items()}
    if context.training is not None:
        return context.training, held
    train = {name: value[train_rows] for name, value in samples.items()}
    kept = None if labels is None else labels[train_rows]
    return ArraySource(train, kept, f"{len(train_rows)} calibration samples"), held


def held_out_labels(context: PassContext, holdout: float, seed: int) -> np.ndarray | None:
    """The labels of the held-out calibration samples `training_and_held_out` chooses (the
    same seeded split), or None when the calibration has none or is held out by batch."""
    batches = list(context.calibration or [])
    labels = context.labels
    if labels is None or not batches or not _one_shape(batches):
        return None
    count = sum(sample_count(batch) for batch in batches)
    if len(labels) != count:
        return None
    return labels[split_rows(count, holdout, seed)[1]]


def _one_shape(batches: list[dict[str, np.ndarray]]) -> bool:
    """Whether every batch's inputs have the same shape past the batch axis."""
    shapes = {
        tuple((name, np.shape(value)[1:]) for name, value in sorted(b.items())) for b in batches
    }
    return len(shapes) <= 1


def pieces(samples, size: int) -> list[dict[str, np.ndarray]]:
    """Samples as batches of at most `size`: held-out batches as they are, or joined
    samples cut in order."""
    if isinstance(samples, list):
        return samples
    count = sample_count(samples)
    return [
        {name: value[begin : begin + size] for name, value in samples.items()}
        for begin in range(0, count, size)
    ]


def held_count(samples) -> int:
    """How many held-out samples: in joined arrays, or over held-out batches."""
    if isinstance(samples, list):
        return sum(sample_count(batch) for batch in samples)
    return sample_count(samples)
