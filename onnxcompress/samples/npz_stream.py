""".npz files read one at a time: a training set larger than memory, split into files that
each fit. Every file is checked up front from its array headers alone (names, shapes, dtypes,
labels); the values are read, and checked finite, when an epoch reaches the file."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from onnxcompress.calibration import LABELS_KEY
from onnxcompress.errors import CompressError
from onnxcompress.input_checks import non_finite_count, require_input_arrays
from onnxcompress.samples.source import Samples, epoch_rng, shuffled_pieces


class NpzStream:
    """Samples in .npz files, each holding one array per model input (samples on axis 0,
    each sample of the input's shape without its batch dim) and optionally `labels`.

    An epoch visits the files in a seeded order and each file's samples in a seeded order;
    only the file being read is in memory."""

    def __init__(self, files: list[Path], dtypes: dict[str, np.dtype], shapes: dict[str, list]):
        if not files:
            raise CompressError("no .npz files given for the training set")
        self.files = list(files)
        self.names = list(dtypes)
        counts, labelled = [], []
        for path in self.files:
            count, has_labels = _checked_file(path, dtypes, shapes)
            counts.append(count)
            labelled.append(has_labels)
        if len(set(labelled)) > 1:
            with_labels = self.files[labelled.index(True)].name
            without = self.files[labelled.index(False)].name
            raise CompressError(
                f"{with_labels} holds '{LABELS_KEY}' and {without} does not: give labels in "
                "every training file or in none"
            )
        self.counts = counts
        self.count = sum(counts)
        self.labelled = labelled[0]
        self.description = f"{len(files)} .npz file(s) ({self.count} samples)"
        if self.count == 0:
            raise CompressError(f"{self.description}: the training set holds no samples")

    def epoch(self, number: int, seed: int, size: int) -> Iterator[Samples]:
        rng = epoch_rng(seed, number)
        order = rng.permutation(len(self.files)) if len(self.files) > 1 else [0]
        for index in order:
            if self.counts[index]:
                yield from shuffled_pieces(self.read(index), rng, size)

    def read(self, index: int) -> Samples:
        """The samples of file `index`, whole."""
        path = self.files[index]
        with np.load(path, allow_pickle=False) as archive:
            inputs = {name: archive[name] for name in self.names}
            labels = archive[LABELS_KEY].astype(np.int64) if self.labelled else None
        for name, value in inputs.items():
            bad = non_finite_count(value)
            if bad:
                raise CompressError(
                    f"{path}: array '{name}' holds {bad} NaN or infinite value(s); training "
                    "data must be finite numbers"
                )
        return Samples(inputs, labels)


def array_headers(path: Path) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every array of an .npz file, read from the headers only."""
    if not path.is_file():
        raise CompressError(f"{path}: no such file")
    headers = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if member.endswith(".npy"):
                    with archive.open(member) as stream:
                        headers[member[: -len(".npy")]] = _header(stream)
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CompressError(f"{path}: not a readable .npz file ({exc})") from exc
    return headers


def _header(stream) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    else:
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    return tuple(shape), dtype


def _checked_file(path: Path, dtypes: dict[str, np.dtype], shapes: dict[str, list]):
    """(samples, whether it holds labels) of one file, or one line saying what does not fit
    the model's inputs."""
    headers = array_headers(path)
    require_input_arrays(path, headers, dtypes)
    counts = {}
    for name, dtype in dtypes.items():
        shape, found = headers[name]
        if found != dtype:
            raise CompressError(f"{path}: input '{name}' takes {dtype}, the file has {found}")
        want = [int(d) for d in shapes[name][1:]]
        if len(shape) != len(want) + 1 or list(shape[1:]) != want:
            raise CompressError(
                f"{path}: array '{name}' has shape {list(shape)}, expected {['N', *want]} "
                "(the samples on the first axis)"
            )
        counts[name] = shape[0]
    if len(set(counts.values())) > 1:
        given = ", ".join(f"{name} {count}" for name, count in counts.items())
        raise CompressError(f"{path}: arrays give different sample counts: {given}")
    count = next(iter(counts.values()))
    if LABELS_KEY not in headers or LABELS_KEY in dtypes:
        return count, False
    shape, dtype = headers[LABELS_KEY]
    if len(shape) != 1 or not np.issubdtype(dtype, np.integer) or shape[0] != count:
        raise CompressError(f"{path}: '{LABELS_KEY}' must be a 1-D int array, one per sample")
    return count, True
