"""Distillation as a pass runs it (`distill`, `rdprune.retrain_steps`): the refusals that need
no torch, the calibration samples split into training and held-out rows, the teacher run in
onnxruntime, and torch_distill's training loop, which loads torch only when `distil` runs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxcompress import runtime
from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassContext
from onnxcompress.train.coverage import UnsupportedOps, supported
from onnxcompress.train.schedule import DEFAULT_HOLDOUT, Schedule

INSTALL = "pip install 'onnxcompress[train]'"


@dataclass
class Distilled:
    """What `distil` did: torch_distill's Outcome (its `model` None when nothing beat the
    start), and the samples it trained on and held out."""

    outcome: Any
    train_samples: int
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
) -> Distilled:
    """Train the `trainable` weights of `student` to reproduce `teacher`'s outputs (and the
    `features` tensors both compute) on the run's calibration samples, a seeded `holdout`
    share of them choosing the weights; with `labels` and labelled data, a cross-entropy too."""
    torch_distill = training_module(who)
    features = features or []
    samples, sample_labels = stacked_samples(context, who)
    train_rows, held_rows = split_rows(sample_count(samples), holdout, schedule.seed, who)
    train = {name: value[train_rows] for name, value in samples.items()}
    held = {name: value[held_rows] for name, value in samples.items()}
    outputs = [out.name for out in student.graph.output]
    teacher_run = _teacher(teacher, outputs + features, context.threads)
    held_targets = _targets(teacher_run, held, schedule.batch_size)[: len(outputs)]
    use_labels = labels and sample_labels is not None
    outcome = torch_distill.train_student(
        student,
        runtime.expose_outputs(student, features),
        trainable,
        teacher_run,
        train,
        (held, held_targets),
        schedule,
        context.progress,
        sample_labels[train_rows] if use_labels else None,
    )
    return Distilled(outcome, len(train_rows), len(held_rows), use_labels)


def stacked_samples(
    context: PassContext, who: str
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Every calibration sample, each input's batches joined on its first axis, and the
    labels (None without them or without labels the same length)."""
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


def split_rows(count: int, holdout: float, seed: int, who: str) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, held-out rows): a seeded `holdout` share held out, at least one row
    each side."""
    if count < 2:
        raise CompressError(f"{who}: needs at least 2 calibration samples, got {count}")
    held = min(count - 1, max(1, round(count * holdout)))
    order = np.random.default_rng(seed).permutation(count)
    return np.sort(order[held:]), np.sort(order[:held])


def _teacher(teacher: onnx.ModelProto, names: list[str], threads: int):
    """The teacher as a function: a batch -> its tensors `names`, from onnxruntime."""
    session = runtime.make_session(
        runtime.expose_outputs(teacher, names), threads=threads, optimize=True
    )

    def run(batch: dict[str, np.ndarray]) -> list[np.ndarray]:
        return runtime.run_session(session, batch, names)

    return run


def _targets(teacher_run, samples: dict[str, np.ndarray], size: int) -> list[np.ndarray]:
    count = sample_count(samples)
    parts = [
        teacher_run({name: value[begin : begin + size] for name, value in samples.items()})
        for begin in range(0, count, size)
    ]
    return [np.concatenate(column) for column in zip(*parts, strict=True)]
