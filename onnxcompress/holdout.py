"""Held-out samples: which calibration samples the passes may fit on and which only validate,
and whether the run's fidelity figures validate anything at all."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

import numpy as np

from onnxcompress.calibration import Calibration
from onnxcompress.errors import CompressError

Batch = dict[str, np.ndarray]

NOT_VALIDATED = "not validated: no held-out samples"
# Within the samples the passes fit on, one in this many is held out of a layer's fit to choose
# among its fits (low_rank_refit, relu_refit): enough rows to rank a handful of fits, most rows
# left to fit them.
CHECK_EVERY = 5


def row_samples(first_sample: int, samples: int, rows: int) -> np.ndarray:
    """The calibration sample of each row of a batch whose rows go sample by sample, as many
    per sample, the batch's first sample counted `first_sample` over the whole run."""
    return first_sample + np.arange(rows) // max(rows // max(samples, 1), 1)


def checking(sample_of_row: np.ndarray) -> np.ndarray:
    """Which rows belong to the samples held out to choose a layer's fit."""
    return sample_of_row % CHECK_EVERY == CHECK_EVERY - 1


def split_holdout(calibration: Calibration, holdout: float) -> tuple[Calibration, Calibration]:
    """(samples the passes may fit on, samples validation measures on).

    With user data, the last `holdout` fraction of the samples (at least one, at most all
    but one) is kept out of the passes, so that refitted models are not validated on what
    they were fitted to. Batches are cut between samples when the model's batch is dynamic
    and `calibration.axes` says how samples stack; else whole batches are held out. Random
    inputs are not split (passes do not fit on them); without room, both are `calibration`.
    """
    if not 0 <= holdout < 1:
        raise CompressError(f"--holdout {holdout}: expected a fraction in [0, 1)")
    if calibration.source.startswith("random") or holdout == 0:
        return calibration, calibration
    rows = [_rows(batch, calibration.axes) for batch in calibration.batches]
    whole_batches = calibration.axes is None or calibration.fixed_batch
    cut = _fit_count(rows, holdout, whole_batches)
    if cut == 0:
        return calibration, calibration
    head, tail = _split_at(calibration.batches, rows, cut, calibration.axes)
    labels = calibration.labels
    fit = dataclasses.replace(
        calibration,
        batches=head,
        labels=None if labels is None else labels[:cut],
        source=f"{calibration.source}, first {cut} samples",
    )
    evaluation = dataclasses.replace(
        calibration,
        batches=tail,
        labels=None if labels is None else labels[cut:],
        source=f"{calibration.source}, {sum(rows) - cut} held-out samples",
    )
    return fit, evaluation


def _fit_count(rows: list[int], holdout: float, whole_batches: bool) -> int:
    """Samples the passes get, before the held-out ones (0: nothing can be held out)."""
    if whole_batches:
        held = _held_count(len(rows), holdout)
        return sum(rows[: len(rows) - held]) if held else 0
    held = _held_count(sum(rows), holdout)
    return sum(rows) - held if held else 0


def _held_count(total: int, holdout: float) -> int:
    """Items held out: round(total · holdout), at least 1 and at most total - 1 (0 if < 2)."""
    return min(total - 1, max(1, round(total * holdout))) if total >= 2 else 0


def _rows(batch: Batch, axes: dict[str, int | None] | None) -> int:
    """Samples in a batch: the commonest length on the inputs' sample axes (arrays given
    once for every batch can differ); without axes, the first input's leading length."""
    if axes is None:
        return len(next(iter(batch.values())))
    lengths = [
        batch[name].shape[axis]
        for name, axis in axes.items()
        if axis is not None and name in batch and batch[name].ndim > axis
    ]
    if not lengths:
        return 1
    counts = Counter(lengths)
    return max(counts, key=lambda length: (counts[length], length))


def _split_at(
    batches: list[Batch], rows: list[int], cut: int, axes: dict[str, int | None] | None
) -> tuple[list[Batch], list[Batch]]:
    """The batches before sample `cut` and from it on, cutting the batch it falls in."""
    head: list[Batch] = []
    tail: list[Batch] = []
    start = 0
    for batch, count in zip(batches, rows, strict=True):
        if start + count <= cut:
            head.append(batch)
        elif start >= cut:
            tail.append(batch)
        else:
            head.append(_slice(batch, axes, count, 0, cut - start))
            tail.append(_slice(batch, axes, count, cut - start, count))
        start += count
    return head, tail


def _slice(batch: Batch, axes, count: int, start: int, stop: int) -> Batch:
    """Samples start..stop of a batch; arrays given once for every batch stay whole."""
    part = {}
    for name, value in batch.items():
        axis = (axes or {}).get(name)
        if axis is None or value.ndim <= axis or value.shape[axis] != count:
            part[name] = value
        else:
            index = (slice(None),) * axis + (slice(start, stop),)
            part[name] = np.ascontiguousarray(value[index])
    return part


class ReadWatch(list):
    """The batches handed to the passes, noting whether any pass read them: iterating,
    indexing or pickling (for a worker) counts; asking whether there is data does not."""

    read = False

    def __iter__(self):
        self.read = True
        return super().__iter__()

    def __getitem__(self, index):
        self.read = True
        return super().__getitem__(index)

    def __reduce__(self):
        self.read = True
        return list, (list(super().__iter__()),)


def validation_entry(
    fidelity: dict[str, Any], fit: Calibration, evaluation: Calibration, passes_read: bool
) -> dict[str, Any]:
    """The report's validation: the figures with `validated` and what they were measured on.

    Figures measured on the very samples the passes read prove nothing: they move to
    `fit_samples`, and the entry says NOT_VALIDATED with no worst error to compare.
    """
    samples = fidelity["samples"]
    if evaluation.source.startswith("random"):
        basis = "random inputs (the passes fit on no data; real inputs may differ)"
    elif evaluation is not fit:
        basis = "held-out samples the passes did not see"
    elif not passes_read:
        basis = "samples the passes did not read (no held-out samples)"
    else:
        counted = "the only sample" if samples == 1 else f"all {samples} samples"
        detail = (
            f"the passes fit on {counted}, so none is left to validate on; give more samples "
            "or a --holdout above 0"
        )
        return _unvalidated(fidelity, detail)
    return {**fidelity, "validated": True, "status": f"validated on {basis}"}


def _unvalidated(fidelity: dict[str, Any], detail: str) -> dict[str, Any]:
    return {
        "validated": False,
        "status": NOT_VALIDATED,
        "detail": detail,
        "outputs": {},
        "worst_rel_l2": None,
        "samples": 0,
        "source": fidelity["source"],
        # The error on the samples the passes fit on: a fit figure, not a validation.
        "fit_samples": {key: fidelity[key] for key in ("outputs", "worst_rel_l2", "samples")},
    }
