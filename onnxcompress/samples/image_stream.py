"""Image files decoded a batch at a time: a training set of images of any number, of which
only the batch being read is in memory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from onnxcompress.errors import CompressError
from onnxcompress.images import Preprocess, decode_images
from onnxcompress.samples.source import Samples, epoch_rng


class ImageStream:
    """Images feeding the model's one input `name`, each read with `preprocess` when an
    epoch reaches it; `labels` (one per file) or None. An epoch takes the files in the order
    `ArraySource` would take the same images decoded up front, so both train alike."""

    def __init__(
        self,
        files: list[Path],
        name: str,
        shape: list[int],
        preprocess: Preprocess,
        labels: np.ndarray | None = None,
    ):
        if not files:
            raise CompressError("no image files given for the training set")
        self.files, self.name, self.shape = list(files), name, shape
        self.preprocess, self.labels = preprocess, labels
        self.count, self.labelled = len(self.files), labels is not None
        self.description = f"{self.count} image files"
        decode_images(self.files[:1], preprocess, shape)  # refuses a size or layout that fails

    def epoch(self, number: int, seed: int, size: int) -> Iterator[Samples]:
        order = epoch_rng(seed, number).permutation(self.count)
        for begin in range(0, self.count, size):
            rows = np.sort(order[begin : begin + size])
            images = decode_images([self.files[row] for row in rows], self.preprocess, self.shape)
            labels = None if self.labels is None else self.labels[rows]
            yield Samples({self.name: images}, labels)
