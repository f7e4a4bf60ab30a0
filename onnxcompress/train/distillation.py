"""Distillation as a pass runs it (`distill`, `rdprune.retrain_steps`, `prune.retrain_steps`):
the refusals that need no torch, the training source and held-out samples, the teacher run in
onnxruntime, and torch_distill's training loop, which loads torch only when `distil` runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxcompress import runtime
from onnxcompress.errors import CompressError
from onnxcompress.graph import dim_values, runtime_inputs
from onnxcompress.passkit import PassContext
from onnxcompress.samples import SampleSource
from onnxcompress.train.coverage import UnsupportedOps, supported
from onnxcompress.train.samples import (
    held_count,
    held_out_labels,
    pieces,
    training_and_held_out,
)
from onnxcompress.train.schedule import DEFAULT_HOLDOUT, Schedule

INSTALL = "pip install 'onnxcompress[train]'"


@dataclass
class Distilled:
    """What `distil` did: torch_distill's Outcome (its `model` None when nothing beat the
    start), what it trained on, how many samples chose the weights, and whether labels
    added a cross-entropy."""

    outcome: Any
    source: SampleSource
    held_out_samples: int
    labels: bool


def require_training(model: onnx.ModelProto, context: PassContext, who: str) -> None:
    """One-line CompressError, naming `who`, unless the run has calibration data, torch is
    installed and TorchGraph can run every op of `model`."""
    require_data(context, who)
    training_module(who)
    missing = supported(model)
    if missing:
        raise CompressError(f"{who}: {UnsupportedOps(missing)}")


def require_data(context: PassContext, who: str) -> None:
    if not context.calibration:
        raise CompressError(
            f"{who}: needs calibration data (--data or --images): it trains on your samples"
        )


def training_module(who: str):
    """onnxcompress.train.torch_distill, or one line saying how to install torch."""
    try:
        from onnxcompress.train import torch_distill
    except ImportError as exc:
        raise CompressError(f"{who}: needs torch ({exc}); install it: {INSTALL}") from exc
    return torch_distill


def distil(
    student: onnx.ModelProto,
    teacher: onnx.ModelProto,
    trainable: set[str],
    schedule: Schedule,
    context: PassContext,
    who: str,
    holdout: float = DEFAULT_HOLDOUT,
    labels: bool = True,
    features: list[str] | None = None,
    data: tuple[SampleSource, Any] | None = None,
) -> Distilled:
    """Train the `trainable` weights of `student` to reproduce `teacher`'s outputs (and the
    `features` tensors both compute) on the run's training set, else its calibration
    samples; a seeded `holdout` share of the calibration samples chooses the weights (`data`:
    that (training source, held-out samples) pair when the caller has it). With `labels` and
    labelled training samples, a cross-entropy too."""
    torch_distill = training_module(who)
    features = features or []
    source, held = data or training_and_held_out(context, holdout, schedule.seed, who)
    outputs = [out.name for out in student.graph.output]
    teacher_run = _teacher(teacher, outputs + features, context.threads)
    held_targets = _targets(teacher_run, held, schedule.batch_size)[: len(outputs)]
    use_labels = labels and source.labelled
    # Labels train a cross-entropy: the weights are chosen by it too where held-out labels exist.
    held_labels = held_out_labels(context, holdout, schedule.seed) if use_labels else None
    outcome = torch_distill.train_student(
        student,
        runtime.expose_outputs(student, features),
        trainable,
        teacher_run,
        source,
        (held, held_targets),
        schedule,
        context.progress,
        use_labels,
        held_labels,
    )
    return Distilled(outcome, source, held_count(held), use_labels)


def _teacher(teacher: onnx.ModelProto, names: list[str], threads: int):
    """The teacher as a function: a batch -> its tensors `names`, from onnxruntime; a model
    whose inputs fix the batch (SqueezeNet's 1) runs the training batch that many at a time."""
    session = runtime.make_session(
        runtime.expose_outputs(teacher, names), threads=threads, optimize=True
    )
    fixed = _fixed_batch(teacher)

    def run(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        rows = len(next(iter(batch.values())))
        if fixed is None or rows <= fixed:
            return runtime.run_session(session, batch, names)
        parts = [
            runtime.run_session(
                session,
                {name: value[begin : begin + fixed] for name, value in batch.items()},
                names,
            )
            for begin in range(0, rows, fixed)
        ]
        return [np.concatenate(column) for column in zip(*parts, strict=True)]

    return run


def _fixed_batch(model: onnx.ModelProto) -> int | None:
    """The batch size the model's inputs fix on their first axis, or None when it is free."""
    firsts = {dim_values(value)[0] for value in runtime_inputs(model) if dim_values(value)}
    fixed = [first for first in firsts if isinstance(first, int) and first > 0]
    return min(fixed) if fixed else None


def _targets(teacher_run, samples, size: int) -> list[np.ndarray]:
    parts = [teacher_run(piece) for piece in pieces(samples, size)]
    return [np.concatenate(column) for column in zip(*parts, strict=True)]
