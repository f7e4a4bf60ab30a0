"""`distill`: train the compressed model (the student) to reproduce the original (the teacher)
on the run's calibration samples, no labels needed, and put the trained weights back into the
same graph by initializer name. Run it last: `--passes fga,distill --data calib.npz`.

torch loads only when the pass runs (onnxcompress/train/torch_distill.py); the checks that
refuse a run come first and need no torch."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress.errors import CompressError
from onnxcompress.passkit import NodeRecord, PassContext, PassResult, comma_list, option
from onnxcompress.registry import register
from onnxcompress.train import default_trainable, supported
from onnxcompress.train.block_report import block_records, block_summary, merged_records
from onnxcompress.train.distillation import distil, require_data, training_module
from onnxcompress.train.samples import split_rows, training_and_held_out
from onnxcompress.train.schedule import DEFAULT_BATCH, DEFAULT_HOLDOUT, DEFAULT_LR, Schedule
from onnxcompress.train.student_blocks import convertible_blocks

LOSSES = ("logits", "features")
OUTPUT_LOSSES = ("mse", "kl")
TRAINABLE = ("all", "new")
BLOCKWISE = ("first", "only")
# blockwise=first: the blocks' share of `steps` and `time_limit`, the rest end to end
# (docs/decisions.md).
BLOCK_SHARE = 0.5
AUGMENTATIONS = ("flip", "shift")
DEVICES = ("auto", "cpu", "cuda")
# Default length: about 3 minutes for ResNet-20 at batch 64 on 2 cores (docs/decisions.md).
DEFAULT_STEPS = 300


@dataclass(frozen=True)
class DistillOptions:
    steps: int | None = option(
        None, f"optimizer steps (batches) to train (default {DEFAULT_STEPS}, or from epochs)"
    )
    epochs: float | None = option(
        None,
        "passes over the training samples instead of steps: steps = ceil(epochs x samples / "
        "batch_size); give steps or epochs, not both",
    )
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
    labels: bool = option(
        True, "add a cross-entropy on the labels when the training samples have them"
    )
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
        DEFAULT_HOLDOUT,
        "fraction of the calibration samples held out to choose the best weights; with "
        "--train-data, training reads the training set and of the calibration samples only "
        "these held-out ones are used",
    )
    device: str = option(
        "auto", "where torch trains: auto (CUDA when torch sees a GPU, else the CPU), cpu, cuda"
    )
    blockwise: str | None = option(
        None,
        "none: train end to end only; first: block by block (each rewritten layer up to its "
        "activation learns the original's tensor there from the student's own input, in graph "
        "order, BRECQ-style), then end to end; only: block by block only. A model with ops "
        "torch cannot run outside its rewritten layers trains block by block whatever this says",
    )

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "threads"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name, choices in (
            ("loss", LOSSES), ("output_loss", OUTPUT_LOSSES), ("trainable", TRAINABLE),
            ("device", DEVICES),
        ):  # fmt: skip
            if getattr(self, name) not in choices:
                value = getattr(self, name)
                raise ValueError(f"{name}={value!r}: expected one of {', '.join(choices)}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"time_limit must be > 0 seconds, got {self.time_limit}")
        unknown = sorted(set(comma_list(self.augment)) - set(AUGMENTATIONS))
        if unknown:
            raise ValueError(
                f"augment={unknown[0]!r}: expected some of {', '.join(AUGMENTATIONS)} or none"
            )
        if self.blockwise not in (None, *BLOCKWISE):
            raise ValueError(
                f"blockwise={self.blockwise!r}: expected none or one of {', '.join(BLOCKWISE)}"
            )
        if not 0 < self.holdout < 1:
            raise ValueError(f"holdout must be a fraction in (0, 1), got {self.holdout}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give steps or epochs, not both")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")


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
    missing = supported(model)
    training_module("distill")  # refuses without torch before any work
    blocks = convertible_blocks(model, teacher) if missing or options.blockwise else None
    trained = _trainable(model, teacher, options.trainable)
    seed = _seed(options, context)
    data = training_and_held_out(context, options.holdout, seed)
    steps = steps_for(options, data[0].count)
    if blocks is None:
        schedule = _schedule(options, context, seed, steps, options.time_limit)
        return _result(
            model, *_end_to_end(model, teacher, trained, options, context, data, schedule)
        )
    return _blockwise(model, teacher, blocks, trained, options, context, data, steps, missing)


def _end_to_end(model, teacher, trained, options, context, data, schedule):
    """(the training's outcome, what the summary says of it): the whole model trained to
    match the teacher's outputs (and features) on `data` (training source, held-out samples)
    as `schedule` says."""
    features = rewritten_outputs(model, teacher) if options.loss == "features" else []
    run = distil(
        model, teacher, trained, schedule, context, "distill",
        options.holdout, options.labels, features, data,
    )  # fmt: skip
    source, outcome = run.source, run.outcome
    batch = min(schedule.batch_size, source.count)
    facts = {
        "features": len(features),
        "train_samples": source.count,
        "training_data": source.description,
        "held_out_samples": run.held_out_samples,
        "epochs": round(outcome.steps * batch / source.count, 2),
        "device": schedule.device,
        "labels": run.labels,
        "held_zeros": outcome.held_zeros,
    }
    return outcome, facts


def _blockwise(model, teacher, blocks, trained, options, context, data, steps, missing):
    """`blocks` trained block by block (then end to end with `first`), or block by block
    only when torch cannot run the whole model; kept only if the model's held-out loss
    falls, when the outputs allow measuring it."""
    mode = "only" if missing else options.blockwise
    notes = [_partial_note(missing, options.blockwise)] if missing else []
    if not blocks:
        notes.append("no node differs from the original's: no block to train")
        return PassResult(model, False, summary={"blockwise": mode, "note": "; ".join(notes)})
    from onnxcompress.train import torch_blockwise as blockwise

    seed = _seed(options, context)
    block_data = blockwise.BlockData(
        teacher,
        list(context.calibration or []),
        functools.partial(split_rows, holdout=options.holdout, seed=seed),
        context.threads,
    )
    kl = options.output_loss == "kl"
    before = blockwise.output_loss(model, block_data, kl)
    phases = _phases(model, blocks, trained, (block_data, data), mode, options, context, steps)
    done, whole = phases
    current = (whole[0].model or done.model) if whole else done.model
    after = blockwise.output_loss(current, block_data, kl) if current is not model else before
    kept = current is not model and (before is None or after is None or after < before)
    end_to_end = (whole[0], _summary(whole[0], done.model, whole[1])) if whole else None
    summary = block_summary(mode, done, end_to_end, (before, after), kept, notes)
    records = block_records(model, blocks, done.reports, kept)
    if end_to_end:
        outcome, its_summary = end_to_end
        trained_whole = kept and outcome.model is not None
        ends = _records(model, set(outcome.trained_tensors), trained_whole, its_summary)
        records = merged_records(records, ends)
    return PassResult(current if kept else model, kept, records, summary)


def _phases(model, blocks, trained, data, mode, options, context, steps):
    """(the block phase's BlocksOutcome, the end-to-end phase's (outcome, facts) or None):
    `only` gives the blocks every one of `steps`, `first` its `BLOCK_SHARE` of them and of
    the time limit, then trains end to end for the rest unless Ctrl-C stopped the blocks.
    `data` is (the blocks' calibration data, the end-to-end (training source, held-out))."""
    from onnxcompress.train.torch_blockwise import train_blocks

    block_data, whole_data = data
    seed = _seed(options, context)
    share = 1.0 if mode == "only" else BLOCK_SHARE
    block_steps = max(1, round(steps * share))
    limit = None if options.time_limit is None else options.time_limit * share
    schedule = _schedule(options, context, seed, block_steps, limit)
    done = train_blocks(model, blocks, trained, block_data, schedule, context.progress)
    left = None if options.time_limit is None else options.time_limit - done.seconds
    out_of_time = left is not None and left <= 0
    if mode == "only" or done.stopped_by == "interrupted" or steps <= block_steps or out_of_time:
        return done, None
    schedule = _schedule(options, context, seed, steps - block_steps, left)
    teacher = block_data.teacher
    return done, _end_to_end(done.model, teacher, trained, options, context, whole_data, schedule)


def _partial_note(missing: list[str], asked: str) -> str:
    how = "instead of end to end" if asked != "only" else "as asked"
    return (
        f"torch cannot run this model's {', '.join(missing)}: trained block by block "
        f"(blockwise=only) {how}; the rest of the model is left as the refit made it"
    )


def _schedule(options: DistillOptions, context: PassContext, seed: int, steps: int, limit):
    from onnxcompress.train.torch_distill import device_for

    return Schedule(
        steps,
        options.lr,
        options.batch_size,
        seed,
        options.threads or context.threads,
        limit,
        tuple(comma_list(options.augment)),
        options.output_loss == "kl",
        device_for(options.device),
    )


def _result(model: onnx.ModelProto, outcome, facts: dict) -> PassResult:
    summary = _summary(outcome, model, facts)
    records = _records(model, set(outcome.trained_tensors), outcome.model is not None, summary)
    if outcome.model is None:
        return PassResult(model=model, changed=False, records=records, summary=summary)
    return PassResult(model=outcome.model, changed=True, records=records, summary=summary)


def steps_for(options: DistillOptions, count: int) -> int:
    """Optimizer steps: `steps`, else `epochs` passes over `count` samples, else the default."""
    if options.epochs is None:
        return options.steps or DEFAULT_STEPS
    return max(1, math.ceil(options.epochs * count / min(options.batch_size, count)))


def _seed(options: DistillOptions, context: PassContext) -> int:
    return context.seed if options.seed is None else options.seed


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


def _summary(outcome, model: onnx.ModelProto, facts: dict) -> dict:
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
        **facts,
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
