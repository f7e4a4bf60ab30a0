"""The training loop of `distill`: a student TorchGraph learns to reproduce a teacher's outputs
(and chosen intermediate tensors) on calibration samples; the weights with the lowest
held-out loss win, and only if they beat the start.

The teacher is a plain function from a batch of numpy inputs to numpy targets, so this module
needs neither the teacher's graph nor onnxruntime."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from onnxcompress.passkit import Progress
from onnxcompress.train.schedule import Schedule
from onnxcompress.train.torch_graph import TorchGraph
from onnxcompress.train.write_back import write_back

Samples = dict[str, np.ndarray]
# teacher(batch) -> one target per student output (graph outputs first, then features).
Teacher = Callable[[Samples], list[np.ndarray]]

# Held-out evaluations over a run: often enough to catch the best weights, rarely enough
# that evaluating costs little next to training.
EVALUATIONS = 20
# Share of the steps over which the learning rate rises linearly before its cosine decay.
WARMUP = 0.05
# Keeps the normalised MSE finite for a target that is all zeros.
EPSILON = 1e-12


@dataclass
class Outcome:
    """What a run of `train_student` did; `model` is None when nothing beat the start."""

    model: onnx.ModelProto | None
    steps: int
    seconds: float
    start_loss: float
    best_loss: float
    best_step: int
    stopped_by: str | None  # "time limit", "interrupted" or None
    trained_tensors: list[str] = field(default_factory=list)
    trained_params: int = 0
    held_zeros: int = 0  # exact zeros of the trained tensors, kept zero throughout


def train_student(
    student: onnx.ModelProto,
    exposed: onnx.ModelProto,
    trainable: set[str],
    teacher: Teacher,
    train: Samples,
    held: tuple[Samples, list[np.ndarray]],
    schedule: Schedule,
    progress: Progress,
    labels: np.ndarray | None = None,
) -> Outcome:
    """Train the `trainable` weights of `exposed` (the student with its feature tensors made
    graph outputs) to match `teacher` on the `train` samples; write the best weights into
    `student`. `held` is (held-out samples, the teacher's targets for its graph outputs);
    `labels` (one per train sample) add a cross-entropy on the first output."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(schedule.threads)
    torch.manual_seed(schedule.seed)
    try:
        return _train(student, exposed, trainable, teacher, train, held, schedule, progress, labels)
    finally:
        torch.set_num_threads(previous_threads)


def _train(student, exposed, trainable, teacher, train, held, schedule, progress, labels):
    started = time.perf_counter()
    module = TorchGraph(exposed, trainable=trainable)
    outputs = len(student.graph.output)
    parameters = [p for p in module.parameters() if p.requires_grad]
    zeros = zero_masks(parameters)
    optimizer = torch.optim.AdamW(parameters, lr=schedule.lr, weight_decay=0.0)
    lr_at = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(schedule.steps))
    batches = _batch_order(_count(train), schedule)
    rng = np.random.default_rng([schedule.seed, 1])
    every = max(1, schedule.steps // EVALUATIONS)
    start = best = held_out_loss(module, held, outputs, schedule.batch_size, schedule.kl)
    best_step, best_state, done, stopped_by = 0, _snapshot(module), 0, None
    try:
        with progress("distill steps", schedule.steps) as task:
            for done, rows in enumerate(batches, start=1):
                batch = {name: value[rows] for name, value in train.items()}
                batch = augmented(batch, schedule.augment, rng)
                targets = [torch.from_numpy(t) for t in teacher(batch)]
                produced = module(**_tensors(batch))
                loss = _training_loss(produced, targets, outputs, labels, rows, schedule.kl)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                hold_zeros(zeros, gradients=True)
                optimizer.step()
                hold_zeros(zeros, gradients=False)
                lr_at.step()
                task.advance()
                out_of_time = _over(started, schedule.time_limit)
                if done % every == 0 or done == schedule.steps or out_of_time:
                    loss_now = held_out_loss(
                        module, held, outputs, schedule.batch_size, schedule.kl
                    )
                    if loss_now < best:
                        best, best_step, best_state = loss_now, done, _snapshot(module)
                if out_of_time and done < schedule.steps:
                    stopped_by = "time limit"
                    break
    except KeyboardInterrupt:
        stopped_by = "interrupted"
    names = sorted(module.names[q] for q, p in module.named_parameters() if p.requires_grad)
    model = None
    if best_step > 0:
        module.load_state_dict(best_state, strict=False)
        model = write_back(student, module)
    return Outcome(
        model=model,
        steps=done,
        seconds=round(time.perf_counter() - started, 2),
        start_loss=start,
        best_loss=best,
        best_step=best_step,
        stopped_by=stopped_by,
        trained_tensors=names,
        trained_params=sum(p.numel() for p in parameters),
        held_zeros=sum(int((mask == 0).sum()) for _, mask in zeros),
    )


def zero_masks(parameters) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, 1 where it is not zero, else 0) for each trained tensor holding exact zeros:
    they stay zero, so a pass's pruning survives (docs/decisions.md#zeros-stay-zero)."""
    return [(p, (p.detach() != 0).to(p.dtype)) for p in parameters if bool((p.detach() == 0).any())]


def hold_zeros(masks: list[tuple[torch.nn.Parameter, torch.Tensor]], gradients: bool) -> None:
    """Zero the masked entries' gradients (so AdamW's moments stay 0 there), or after the
    step their values: a multiply by 0 keeps a zero as it was, bit for bit."""
    with torch.no_grad():
        for parameter, mask in masks:
            target = parameter.grad if gradients else parameter
            if target is not None:
                target.mul_(mask)


def _training_loss(produced, targets, outputs, labels, rows, kl=False) -> torch.Tensor:
    """Normalised MSE on the graph outputs (with `kl`, KL of the softmaxes for a (batch,
    classes) output), plus the mean normalised MSE on the features, plus a cross-entropy on
    the first output when labels are given."""
    produced = produced if isinstance(produced, tuple) else (produced,)
    terms = [
        _output_loss(p, t, kl) if i < outputs else normalised_mse(p, t)
        for i, (p, t) in enumerate(zip(produced, targets, strict=True))
    ]
    loss = torch.stack(terms[:outputs]).mean()
    if len(terms) > outputs:
        loss = loss + torch.stack(terms[outputs:]).mean()
    if labels is not None:
        target = torch.from_numpy(labels[rows].astype(np.int64))
        loss = loss + torch.nn.functional.cross_entropy(produced[0], target)
    return loss


def _output_loss(produced: torch.Tensor, target: torch.Tensor, kl: bool) -> torch.Tensor:
    return (
        softmax_kl(produced, target)
        if kl and produced.dim() == 2
        else normalised_mse(produced, target)
    )


def softmax_kl(produced: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """KL(softmax(target) ‖ softmax(produced)) per sample, averaged: 0 when they agree."""
    log_p = torch.nn.functional.log_softmax(produced.float(), dim=1)
    log_q = torch.nn.functional.log_softmax(target.float(), dim=1)
    return torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def normalised_mse(produced: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """MSE relative to the target's mean square: outputs of any scale weigh the same."""
    error = (produced.float() - target.float()).pow(2).mean()
    return error / (target.float().pow(2).mean() + EPSILON)


def held_out_loss(
    module, held: tuple[Samples, list[np.ndarray]], outputs: int, size: int, kl: bool = False
) -> float:
    """The training loss of the graph outputs on the held-out samples (features excluded:
    what the weights are chosen by is what the user gets)."""
    samples, targets = held
    count = _count(samples)
    produced: list[list[torch.Tensor]] = [[] for _ in range(outputs)]
    with torch.no_grad():
        for begin in range(0, count, size):
            batch = {name: value[begin : begin + size] for name, value in samples.items()}
            result = module(**_tensors(batch))
            result = result if isinstance(result, tuple) else (result,)
            for index in range(outputs):
                produced[index].append(result[index])
        terms = [
            _output_loss(torch.cat(parts), torch.from_numpy(target), kl)
            for parts, target in zip(produced, targets, strict=True)
        ]
    return float(torch.stack(terms).mean())


def augmented(batch: Samples, kinds: tuple[str, ...], rng: np.random.Generator) -> Samples:
    """The batch with its image inputs (4-D, NCHW) mirrored left-right ("flip", half of
    the samples) and moved by up to 4 pixels with zeros shifted in ("shift"): more distinct
    inputs from few samples, and the teacher labels each anew."""
    out = {}
    for name, value in batch.items():
        if value.ndim == 4 and value.dtype.kind == "f":
            value = value.copy()
            if "flip" in kinds:
                mirrored = rng.random(len(value)) < 0.5
                value[mirrored] = value[mirrored, :, :, ::-1]
            if "shift" in kinds:
                value = _shifted(value, rng.integers(-4, 5, size=(len(value), 2)))
        out[name] = value
    return out


def _shifted(images: np.ndarray, moves: np.ndarray) -> np.ndarray:
    height, width = images.shape[2:]
    padded = np.pad(images, ((0, 0), (0, 0), (4, 4), (4, 4)))
    out = np.empty_like(images)
    for index, (down, right) in enumerate(moves):
        top, left = 4 - down, 4 - right
        out[index] = padded[index, :, top : top + height, left : left + width]
    return out


def _batch_order(count: int, schedule: Schedule):
    """Row indices of each step's batch: seeded shuffles, one per pass over the samples."""
    rng = np.random.default_rng(schedule.seed)
    size = min(schedule.batch_size, count)
    order: np.ndarray = np.empty(0, dtype=np.int64)
    for _ in range(schedule.steps):
        if len(order) < size:
            order = np.concatenate([order, rng.permutation(count)])
        rows, order = np.sort(order[:size]), order[size:]
        yield rows


def _warmup_cosine(steps: int) -> Callable[[int], float]:
    warmup = max(1, round(steps * WARMUP))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def _tensors(batch: Samples) -> dict[str, torch.Tensor]:
    """The batch as torch tensors, images channels-last: torch's CPU convolutions train
    about ten times faster so on ResNet-20 (docs/decisions.md), with the same results."""
    out = {}
    for name, value in batch.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value))
        out[name] = (
            tensor.contiguous(memory_format=torch.channels_last) if tensor.ndim == 4 else tensor
        )
    return out


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trained parameters (frozen ones and buffers never change)."""
    return {
        name: value.detach().clone()
        for name, value in module.named_parameters()
        if value.requires_grad
    }


def _count(samples: Samples) -> int:
    return len(next(iter(samples.values())))


def _over(started: float, limit: float | None) -> bool:
    return limit is not None and time.perf_counter() - started >= limit
