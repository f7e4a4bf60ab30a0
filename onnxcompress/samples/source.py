"""Training samples read lazily, an epoch at a time: the protocol a pass trains through, the
in-memory source, and batches of one fixed size drawn epoch after epoch from any source."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import NamedTuple, Protocol

import numpy as np

from onnxcompress.errors import CompressError


class Samples(NamedTuple):
    """Some samples: each input's array (samples on axis 0) and their labels (or None)."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None


class SampleSource(Protocol):
    """Training samples, read an epoch at a time, never all at once unless they are already
    in memory. `epoch(number, seed, size)` yields every sample once, in an order fixed by
    `(seed, number)`, in pieces of at most `size` samples."""

    count: int  # samples in an epoch
    labelled: bool  # every piece carries labels
    description: str  # in words, for the report: "2 .npz files (20000 samples)"

    def epoch(self, number: int, seed: int, size: int) -> Iterator[Samples]: ...


def epoch_rng(seed: int, number: int) -> np.random.Generator:
    """The generator that orders epoch `number` of a run seeded `seed`."""
    return np.random.default_rng([seed, number])


def shuffled_pieces(samples: Samples, rng: np.random.Generator, size: int) -> Iterator[Samples]:
    """`samples` in a random order drawn from `rng`, in pieces of at most `size`; each piece
    takes its rows in increasing order (contiguous reads)."""
    order = rng.permutation(rows(samples))
    for begin in range(0, len(order), size):
        yield take(samples, np.sort(order[begin : begin + size]))


class ArraySource:
    """Samples already in memory: one array per input, samples on axis 0."""

    def __init__(
        self, inputs: dict[str, np.ndarray], labels: np.ndarray | None = None, description=""
    ):
        counts = {len(value) for value in inputs.values()}
        if len(counts) != 1 or (labels is not None and len(labels) not in counts):
            lengths = ", ".join(f"{name} {len(value)}" for name, value in inputs.items())
            held = "" if labels is None else f", labels {len(labels)}"
            raise CompressError(f"training samples of different counts: {lengths}{held}")
        self.samples = Samples(inputs, labels)
        self.count = counts.pop()
        self.labelled = labels is not None
        self.description = description or f"{self.count} samples in memory"
        if self.count == 0:
            raise CompressError("the training set holds no samples")

    def epoch(self, number: int, seed: int, size: int) -> Iterator[Samples]:
        return shuffled_pieces(self.samples, epoch_rng(seed, number), size)


def steady_batches(source: SampleSource, size: int, seed: int) -> Iterator[Samples]:
    """Batches of exactly `size` samples (at most `source.count`), endlessly: epoch 0, 1, ...
    of `source`, a batch that straddles two epochs taking the end of one and the start of the
    next. Holds at most one piece and one batch besides what the source holds."""
    size = min(size, source.count)
    waiting: Samples | None = None  # fewer than `size` samples carried to the next piece
    for number in itertools.count():
        given = 0
        for piece in source.epoch(number, seed, size):
            given += rows(piece)
            waiting = piece if waiting is None else joined(waiting, piece)
            while rows(waiting) >= size:
                yield take(waiting, slice(0, size))
                waiting = take(waiting, slice(size, None))
            if rows(waiting) == 0:
                waiting = None
        if given != source.count:
            raise CompressError(
                f"{source.description}: epoch {number} gave {given} samples, not {source.count}"
            )


def rows(samples: Samples) -> int:
    return len(next(iter(samples.inputs.values())))


def take(samples: Samples, index) -> Samples:
    """The samples at `index` (an index array or a slice) of every input and the labels."""
    labels = None if samples.labels is None else samples.labels[index]
    return Samples({name: value[index] for name, value in samples.inputs.items()}, labels)


def joined(first: Samples, second: Samples) -> Samples:
    inputs = {
        name: np.concatenate([value, second.inputs[name]]) for name, value in first.inputs.items()
    }
    labels = None
    if first.labels is not None and second.labels is not None:
        labels = np.concatenate([first.labels, second.labels])
    return Samples(inputs, labels)


class WatchedSource:
    """A source that remembers whether anything read it (`read`): the run warns when a
    training set was given and no pass trained on it."""

    def __init__(self, source: SampleSource):
        self.source = source
        self.count, self.labelled = source.count, source.labelled
        self.description = source.description
        self.read = False

    def epoch(self, number: int, seed: int, size: int) -> Iterator[Samples]:
        self.read = True
        return self.source.epoch(number, seed, size)
