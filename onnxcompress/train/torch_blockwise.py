"""Block-wise distillation (BRECQ-style, Li et al. 2021): each block of the student
(`student_blocks`) learns, in graph order, to give the original's tensors at its outputs from
the student's own tensors at its inputs. Its best weights go into the student before the next
block's inputs are computed, so that later blocks make up for what earlier ones could not.

Only the blocks run in torch: the rest of the model may hold ops TorchGraph cannot run."""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from onnxcompress.passkit import Progress, ProgressTask
from onnxcompress.train.block_report import BlockReport, node_labels
from onnxcompress.train.model_tensors import ModelTensors, joined
from onnxcompress.train.schedule import Schedule
from onnxcompress.train.student_blocks import StudentBlock, block_model
from onnxcompress.train.tensors import stored_weights
from onnxcompress.train.torch_distill import (
    Fit,
    as_tensors,
    fit,
    held_out_loss,
    outputs_loss,
    row_batches,
    torch_settings,
    training_loss,
)
from onnxcompress.train.torch_graph import TorchGraph
from onnxcompress.train.write_back import write_back

# count -> (training rows, held-out rows) of a block's samples.
Split = Callable[[int], tuple[np.ndarray, np.ndarray]]
NOT_BY_SAMPLE = "its tensors do not hold the samples on their first axis"
# Blocks whose tensors stay known for the next ones: a residual block's second layer reads
# the output of the block two before it (its shortcut).
WINDOW = 2


@dataclass(frozen=True)
class BlockData:
    """What every block learns from: the original, the calibration batches (both models run
    on them in onnxruntime with `threads`), and how a block's samples are split."""

    teacher: onnx.ModelProto
    batches: list[dict[str, np.ndarray]]
    split: Split
    threads: int


@dataclass
class BlocksOutcome:
    """The student with every trained block written back, and a report per block."""

    model: onnx.ModelProto
    reports: list[BlockReport]
    steps: int
    seconds: float
    stopped_by: str | None


def train_blocks(
    student: onnx.ModelProto,
    blocks: list[StudentBlock],
    trainable: set[str],
    data: BlockData,
    schedule: Schedule,
    progress: Progress,
) -> BlocksOutcome:
    """Train `blocks` of `student` one after the other, each for its share of
    `schedule.steps` and of what is left of `schedule.time_limit` (a block that uses up its
    time keeps its best weights and the next one starts). Ctrl-C, or no time left, ends
    the block it stops and skips the blocks after it."""
    started = time.perf_counter()
    tensors = Tensors(
        ModelTensors(student, data.batches, data.threads),
        ModelTensors(data.teacher, data.batches, data.threads),
    )
    reports, stops = [], []
    shares = step_shares(schedule.steps, len(blocks))
    with torch_settings(schedule), progress("distill blocks", sum(shares)) as task:
        for index, (block, share) in enumerate(zip(blocks, shares, strict=True)):
            report = BlockReport(block.name, node_labels(student, block), [])
            reports.append(report)
            limit = _time_left(schedule.time_limit, started, len(blocks) - index)
            if limit is not None and limit <= 0:
                stops.append("time limit")
            if "interrupted" in stops or (limit is not None and limit <= 0):
                report.reason = f"not reached: stopped ({stops[-1]}) before it"
                continue
            block_schedule = dataclasses.replace(schedule, steps=share, time_limit=limit)
            stop = _train_block(block, trainable, tensors, data, block_schedule, task, report)
            stops += [stop] if stop else []
            tensors.forget_all_but(block)
    steps = sum(report.steps for report in reports)
    seconds = round(time.perf_counter() - started, 2)
    # Ctrl-C first: it also ends what would follow the blocks.
    stopped_by = "interrupted" if "interrupted" in stops else next(iter(stops), None)
    return BlocksOutcome(tensors.student.model, reports, steps, seconds, stopped_by)


@dataclass
class Tensors:
    """The student's and the original's tensors, kept for the blocks that follow: those of
    the last `WINDOW` blocks (their inputs and outputs)."""

    student: ModelTensors
    teacher: ModelTensors
    recent: deque = field(default_factory=lambda: deque(maxlen=WINDOW))

    def forget_all_but(self, block: StudentBlock) -> None:
        self.recent.append({*block.inputs, *block.outputs})
        kept = set().union(*self.recent)
        self.student.keep(kept)
        self.teacher.keep(kept)


def step_shares(total: int, count: int) -> list[int]:
    """`total` steps dealt out to `count` blocks as evenly as they go, at least one each."""
    base, extra = divmod(total, count)
    return [max(1, base + (index < extra)) for index in range(count)]


def _time_left(limit: float | None, started: float, blocks_left: int) -> float | None:
    """An even share of the seconds left among the blocks left."""
    if limit is None:
        return None
    return (limit - (time.perf_counter() - started)) / blocks_left


def _train_block(block, trainable, tensors: Tensors, data, schedule, task, report):
    """Train `block` of the student `tensors` holds; write its weights back there if they
    beat its start. Returns why training stopped early, if it did."""
    started = time.perf_counter()
    student = tensors.student.model
    sub = block_model(student, block)
    weights = _own_weights(student, block, sub) & trainable
    report.weights = sorted(weights)
    found = _block_samples(block, tensors, data) if weights else "no trainable weight of its own"
    if isinstance(found, str):
        report.reason = found
        return None
    module = TorchGraph(sub, trainable=weights)
    report.reason = _other_shape(module, *found, block.outputs)
    if report.reason:
        return None
    done = _fit_block(module, *found, data.split, schedule, task)
    report.steps, report.loss_before, report.loss_after = (
        done.steps,
        done.start_loss,
        done.best_loss,
    )
    report.trained = done.best_step > 0
    if report.trained:
        tensors.student.changed(write_back(student, module), block.nodes)
    else:
        report.reason = f"held-out loss never fell below {done.start_loss:.4g}"
    report.seconds = round(time.perf_counter() - started, 2)
    return done.stopped_by


def _own_weights(student: onnx.ModelProto, block: StudentBlock, sub: onnx.ModelProto):
    """The block's weights that no node outside it reads: training a shared weight for one
    block would change what the others compute unseen."""
    inside = set(block.nodes)
    read_outside = {
        name
        for index, node in enumerate(student.graph.node)
        if index not in inside
        for name in node.input
    }
    return set(stored_weights(sub)) - read_outside


def _block_samples(block: StudentBlock, tensors: Tensors, data: BlockData):
    """(the student's tensors at the block's inputs, the original's at its outputs), one row
    per sample; or why the block cannot learn from them."""
    theirs = {name for node in data.teacher.graph.node for name in node.output}
    theirs |= {value.name for value in data.teacher.graph.input}
    missing = [name for name in block.outputs if name not in theirs]
    if missing:
        return f"the original computes no tensor {missing[0]}"
    if not block.inputs:
        return "it reads no tensor of the model"
    inputs = joined(tensors.student.get(block.inputs))
    targets = joined(tensors.teacher.get(block.outputs))
    if inputs is None or targets is None:
        return NOT_BY_SAMPLE
    if len(next(iter(inputs.values()))) != len(targets[block.outputs[0]]):
        return NOT_BY_SAMPLE
    return inputs, [targets[name] for name in block.outputs]


def _other_shape(module, inputs, targets, names) -> str:
    """Why the block's outputs cannot be compared with the original's ("" when they can): a
    shape that differs per sample (shape inference may not have known)."""
    with torch.no_grad():
        produced = module(**as_tensors({name: value[:1] for name, value in inputs.items()}))
    produced = produced if isinstance(produced, tuple) else (produced,)
    for name, ours, target in zip(names, produced, targets, strict=True):
        if tuple(ours.shape[1:]) != target.shape[1:]:
            ours_shape, theirs = list(ours.shape[1:]), list(target.shape[1:])
            return f"its output {name} is {ours_shape} a sample, the original's {theirs}"
    return ""


def _fit_block(
    module: TorchGraph,
    inputs: dict[str, np.ndarray],
    targets: list[np.ndarray],
    split: Split,
    schedule: Schedule,
    task: ProgressTask,
) -> Fit:
    """`fit` the block's module to give `targets` from `inputs` (normalised MSE, the mean
    over its outputs), its weights chosen on the held-out rows."""
    train_rows, held_rows = split(len(targets[0]))
    held = (
        {name: value[held_rows] for name, value in inputs.items()},
        [target[held_rows] for target in targets],
    )

    def step_loss(rows: np.ndarray) -> torch.Tensor:
        taken = train_rows[rows]  # rows of the training rows: no copy of every sample
        batch = as_tensors({name: value[taken] for name, value in inputs.items()})
        wanted = [torch.from_numpy(target[taken]) for target in targets]
        return training_loss(module(**batch), wanted, len(targets), None)

    def held_loss() -> float:
        return held_out_loss(module, held, len(targets), schedule.batch_size)

    return fit(module, step_loss, held_loss, schedule, row_batches(len(train_rows), schedule), task)


def output_loss(model: onnx.ModelProto, data: BlockData, kl: bool = False) -> float | None:
    """The held-out loss of `model`'s graph outputs against the original's, both run in
    onnxruntime (so for any model, also one torch cannot run); None when an output does not
    hold one row per sample."""
    names = tuple(out.name for out in model.graph.output)
    ours = joined(ModelTensors(model, data.batches, data.threads).get(names))
    theirs = joined(ModelTensors(data.teacher, data.batches, data.threads).get(names))
    if ours is None or theirs is None or len(ours[names[0]]) != len(theirs[names[0]]):
        return None
    _, held_rows = data.split(len(ours[names[0]]))
    produced = [ours[name][held_rows] for name in names]
    return outputs_loss(produced, [theirs[name][held_rows] for name in names], kl)
