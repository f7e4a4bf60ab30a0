"""Samples a pass trains on, read lazily (`SampleSource`): arrays in memory, .npz files one at
a time, image folders a batch at a time; `training_source` builds the run's `--train-data`."""

from onnxcompress.samples.source import (
    ArraySource,
    Samples,
    SampleSource,
    WatchedSource,
    steady_batches,
)

__all__ = ["ArraySource", "SampleSource", "Samples", "WatchedSource", "steady_batches"]
