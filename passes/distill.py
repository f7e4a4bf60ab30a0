"""`distill`: train the compressed model (the student) to reproduce the original (the teacher)
on the run's calibration samples, no labels needed, and put the trained weights back into the
same graph by initializer name. Run it last: `--passes fga,distill --data calib.npz`.

torch loads only when the pass runs (onnxcompress/train/torch_distill.py); the checks that
refuse a run come first and need no torch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress.errors import CompressError
from onnxcompress.passkit import NodeRecord, PassContext, PassResult, comma_list, option
from onnxcompress.registry import register
from onnxcompress.train import default_trainable
from onnxcompress.train.distillation import distil, require_data, require_training
from onnxcompress.train.schedule import DEFAULT_BATCH, DEFAULT_HOLDOUT, DEFAULT_LR, Schedule

LOSSES = ("logits", "features")
OUTPUT_LOSSES = ("mse", "kl")
TRAINABLE = ("all", "new")
AUGMENTATIONS = ("flip", "shift")
# Default length: about 3 minutes for ResNet-20 at batch 64 on 2 cores (docs/decisions.md).
DEFAULT_STEPS = 300


@dataclass(frozen=True)
class DistillOptions:
    steps: int = option(DEFAULT_STEPS, "optimizer steps (batches) to train")
    lr: float = option(DEFAULT_LR, "AdamW learning rate (warm-up, then cosine decay to zero)")
    batch_size: int = option(DEFAULT_BATCH, "samples per step")
    loss: str = option(
        "logits",
        "logits: match the original's outputs (MSE relative to their scale); features: also "
        "match its tensors at the outputs of rewritten layers (names in both graphs)",
    )
    output_loss: str = option(
        "mse",
        "how the outputs are matched: mse (relative to their scale) | kl (softmax of a "
        "(batch, classes) output against the original's, Hinton's distillation at T=1; "
        "other outputs keep mse)",
    )
    trainable: str = option(
        "all",
        "all: every layer weight, bias and norm scale; new: only weights the original lacks "
        "(the factors a pass wrote)",
    )
    labels: bool = option(True, "add a cross-entropy on the labels when the data has them")
    seed: int | None = option(None, "seed of the shuffle and of torch (default: the run's)")
    time_limit: float | None = option(
        None, "seconds of training at most; stops there and keeps the best weights"
    )
    threads: int | None = option(
        None, "torch threads (default: the run's --threads); 1 trains faster on a busy CPU"
    )
    augment: str | None = option(
        None,
        "image inputs (4-D) only, comma-separated: flip (mirror left-right), shift (up to 4 "
        "pixels); none by default, as not every image may be mirrored",
    )
    holdout: float = option(
        DEFAULT_HOLDOUT, "fraction of the calibration samples held out to choose the best weights"
    )

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss={self.loss!r}: expected one of {', '.join(LOSSES)}")
        if self.output_loss not in OUTPUT_LOSSES:
            raise ValueError(
                f"output_loss={self.output_loss!r}: expected one of {', '.join(OUTPUT_LOSSES)}"
            )
        if self.trainable not in TRAINABLE:
            raise ValueError(
                f"trainable={self.trainable!r}: expected one of {', '.join(TRAINABLE)}"
            )
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds, got {self.time_limit}")
        unknown = sorted(set(comma_list(self.augment)) - set(AUGMENTATIONS))
        if unknown:
            raise ValueError(
                f"augment={unknown[0]!r}: expected some of {', '.join(AUGMENTATIONS)} or none"
            )
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must be a fraction in (0, 1), got {self.holdout}")


@register(
    "distill",
    DistillOptions,
    "train the compressed model to match the original on the calibration data (run it last)",
    lossy=True,
)
def distill(model: onnx.ModelProto, options: DistillOptions, context: PassContext) -> PassResult:
    teacher = context.original
    require_data(context, "distill")
    if teacher is None:
        raise CompressError("distill: the context names no original model to learn from")
    if _same_graph(model, teacher):
        note = "the model is the original: nothing to recover (run distill after a pass)"
        return PassResult(model=model, changed=False, summary={"note": note})
    require_training(model, context, "distill")
    trained = _trainable(model, teacher, options.trainable)
    features = rewritten_outputs(model, teacher) if options.loss == "features" else []
    schedule = Schedule(
        options.steps,
        options.lr,
        options.batch_size,
        context.seed if options.seed is None else options.seed,
        options.threads or context.threads,
        options.time_limit,
        tuple(comma_list(options.augment)),
        options.output_loss == "kl",
    )
    run = distil(
        model, teacher, trained, schedule, context, "distill",
        options.holdout, options.labels, features,
    )  # fmt: skip
    outcome = run.outcome
    summary = _summary(outcome, model, features, run)
    records = _records(model, set(outcome.trained_tensors), outcome.model is not None, summary)
    if outcome.model is None:
        return PassResult(model=model, changed=False, records=records, summary=summary)
    return PassResult(model=outcome.model, changed=True, records=records, summary=summary)


def _same_graph(model: onnx.ModelProto, teacher: onnx.ModelProto) -> bool:
    return model is teacher or model.graph.SerializeToString() == teacher.graph.SerializeToString()


def _trainable(model: onnx.ModelProto, teacher: onnx.ModelProto, which: str) -> set[str]:
    names = default_trainable(model)
    if which == "new":
        names -= {init.name for init in teacher.graph.initializer}
        names -= {node.output[0] for node in teacher.graph.node if node.op_type == "Constant"}
    if not names:
        raise CompressError(f"distill: trainable={which} leaves no weight of the model to train")
    return names


def rewritten_outputs(model: onnx.ModelProto, teacher: onnx.ModelProto) -> list[str]:
    """Tensors both graphs compute, written in the model by a node the teacher does not have
    (the last node of a rewritten layer): where the two can be compared inside the network."""
    theirs = {out: node.SerializeToString() for node in teacher.graph.node for out in node.output}
    graph_outputs = {out.name for out in model.graph.output}
    found = []
    for node in model.graph.node:
        for name in node.output:
            if name in theirs and name not in graph_outputs:
                if node.SerializeToString() != theirs[name]:
                    found.append(name)
    return found


def _summary(outcome, model, features, run) -> dict:
    weights = {init.name: init for init in model.graph.initializer}
    trained_bytes = sum(
        weights[name].ByteSize() for name in outcome.trained_tensors if name in weights
    )
    kept = outcome.model is not None
    summary = {
        "steps": outcome.steps,
        "seconds": outcome.seconds,
        "held_out_loss_before": round(outcome.start_loss, 6),
        "held_out_loss_after": round(outcome.best_loss if kept else outcome.start_loss, 6),
        "best_step": outcome.best_step,
        "trained_tensors": len(outcome.trained_tensors),
        "trained_params": outcome.trained_params,
        "trained_bytes": trained_bytes,
        "features": len(features),
        "train_samples": run.train_samples,
        "held_out_samples": run.held_out_samples,
        "labels": run.labels,
        "held_zeros": outcome.held_zeros,
        "stopped_by": outcome.stopped_by,
    }
    notes = []
    if outcome.stopped_by:
        notes.append(f"stopped ({outcome.stopped_by}) after {outcome.steps} steps; best kept")
    if not kept:
        notes.append("training never beat the start on held-out samples: model unchanged")
    if notes:
        summary["note"] = "; ".join(notes)
    return summary


def _records(model: onnx.ModelProto, trained: set[str], kept: bool, summary: dict):
    """One record per node whose weights trained: rewritten, or skipped when none were kept."""
    sizes = {init.name: int(np.prod(init.dims)) for init in model.graph.initializer}
    records = []
    for node in model.graph.node:
        mine = sorted(name for name in node.input if name in trained)
        if not mine:
            continue
        params = sum(sizes.get(name, 0) for name in mine)
        label = node.name or node.output[0]
        if kept:
            details = {"weights": mine}
            records.append(
                NodeRecord(label, node.op_type, "rewritten", params_before=params,
                           params_after=params, details=details)
            )  # fmt: skip
        else:
            reason = f"held-out loss never fell below {summary['held_out_loss_before']:.4g}"
            records.append(NodeRecord(label, node.op_type, "skipped", reason))
    return records
