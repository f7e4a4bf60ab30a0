"""The training loop of `distill`: a student TorchGraph learns to reproduce a teacher's outputs
(and chosen intermediate tensors) on the batches of a sample source; the weights with the
lowest held-out loss win, and only if they beat the start.

The teacher is a plain function from a batch of numpy inputs to numpy targets, so this module
needs neither the teacher's graph nor onnxruntime."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch

from onnxcompress.errors import CompressError
from onnxcompress.passkit import Progress, ProgressTask
from onnxcompress.samples import SampleSource, steady_batches
from onnxcompress.train.samples import pieces
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


def device_for(choice: str) -> str:
    """The device to train on: `auto` is CUDA when torch sees a GPU, else the CPU; `cuda`
    without a GPU is refused in one line."""
    available = torch.cuda.is_available()
    if choice == "cuda" and not available:
        raise CompressError(
            "distill: device=cuda, but torch sees no GPU (torch.cuda.is_available() is "
            "false); use device=cpu or auto"
        )
    return "cuda" if choice == "cuda" or (choice == "auto" and available) else "cpu"


def train_student(
    student: onnx.ModelProto,
    exposed: onnx.ModelProto,
    trainable: set[str],
    teacher: Teacher,
    train: SampleSource,
    held: tuple[Samples, list[np.ndarray]],
    schedule: Schedule,
    progress: Progress,
    labels: bool = False,
    held_labels: np.ndarray | None = None,
) -> Outcome:
    """Train the `trainable` weights of `exposed` (the student with its feature tensors made
    graph outputs) to match `teacher` on batches of `train`; write the best weights into
    `student`. `held` is (held-out samples, the teacher's targets for its graph outputs);
    with `labels`, the source's labels add a cross-entropy on the first output, and
    `held_labels` (one per held-out sample) add it to the held-out loss too."""
    with torch_settings(schedule):
        return _train(
            student, exposed, trainable, teacher, train, held, schedule, progress,
            labels, held_labels,
        )  # fmt: skip


@contextmanager
def torch_settings(schedule: Schedule) -> Iterator[None]:
    """torch's threads and seed for a training run; its thread count restored after."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(schedule.threads)
    torch.manual_seed(schedule.seed)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    student, exposed, trainable, teacher, train, held, schedule, progress, labels, held_labels
):
    started = time.perf_counter()
    device = torch.device(schedule.device)
    module = TorchGraph(exposed, trainable=trainable).to(device)
    outputs = len(student.graph.output)
    rng = np.random.default_rng([schedule.seed, 1])

    def step_loss(batch) -> torch.Tensor:
        inputs = augmented(batch.inputs, schedule.augment, rng)
        targets = [torch.from_numpy(t).to(device) for t in teacher(inputs)]
        produced = module(**as_tensors(inputs, device))
        given = _labels(batch.labels, device) if labels else None
        return training_loss(produced, targets, outputs, given, schedule.kl)

    def held_loss() -> float:
        size, kl = schedule.batch_size, schedule.kl
        return held_out_loss(module, held, outputs, size, kl, device, held_labels)

    batches = steady_batches(train, schedule.batch_size, schedule.seed)
    with progress("distill steps", schedule.steps) as task:
        done = fit(module, step_loss, held_loss, schedule, batches, task)
    names = sorted(module.names[q] for q, p in module.named_parameters() if p.requires_grad)
    return Outcome(
        model=write_back(student, module) if done.best_step > 0 else None,
        steps=done.steps,
        seconds=round(time.perf_counter() - started, 2),
        start_loss=done.start_loss,
        best_loss=done.best_loss,
        best_step=done.best_step,
        stopped_by=done.stopped_by,
        trained_tensors=names,
        trained_params=sum(p.numel() for p in module.parameters() if p.requires_grad),
        held_zeros=done.held_zeros,
    )


@dataclass
class Fit:
    """What one run of `fit` did: steps taken, held-out loss at the start and at its best
    (`best_step` 0: nothing beat the start), and why it stopped early, if it did."""

    steps: int
    start_loss: float
    best_loss: float
    best_step: int
    stopped_by: str | None  # "time limit", "interrupted" or None
    held_zeros: int = 0  # exact zeros of the trained tensors, kept zero throughout


def fit(
    module: torch.nn.Module,
    step_loss: Callable[[np.ndarray], torch.Tensor],
    held_loss: Callable[[], float],
    schedule: Schedule,
    batches: Iterable,
    task: ProgressTask,
) -> Fit:
    """Train `module`'s trainable parameters on the first `schedule.steps` of `batches`
    (AdamW, warm-up then cosine decay): `step_loss(batch)` is a batch's loss,
    `held_loss()` the held-out loss the weights are chosen by, measured at the start and
    `EVALUATIONS` times. The module ends with its best weights, or its starting ones when
    none beat the start; `time_limit` and Ctrl-C stop early and keep the best so far.
    With a `time_limit` the schedule runs on whichever ends first, steps or time, so a run
    cut by the clock still ends with its learning rate decayed."""
    started = time.perf_counter()
    parameters = [p for p in module.parameters() if p.requires_grad]
    zeros = zero_masks(parameters)
    factor = _warmup_cosine(schedule.steps)
    optimizer = torch.optim.AdamW(parameters, lr=schedule.lr * factor(0), weight_decay=0.0)
    start = best = held_loss()
    best_step, best_state, done, stopped_by, checked = 0, _snapshot(module), 0, None, 0
    try:
        for done, batch in enumerate(itertools.islice(batches, schedule.steps), start=1):
            loss = step_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            hold_zeros(zeros, gradients=True)
            optimizer.step()
            hold_zeros(zeros, gradients=False)
            task.advance()
            reached = _progress(done, schedule, time.perf_counter() - started)
            for group in optimizer.param_groups:
                group["lr"] = schedule.lr * factor(reached * schedule.steps)
            if int(reached * EVALUATIONS) > checked or reached >= 1:
                checked = int(reached * EVALUATIONS)
                loss_now = held_loss()
                if loss_now < best:
                    best, best_step, best_state = loss_now, done, _snapshot(module)
            if reached >= 1 and done < schedule.steps:
                stopped_by = "time limit"
                break
    except KeyboardInterrupt:
        stopped_by = "interrupted"
    module.load_state_dict(best_state, strict=False)
    held = sum(int((mask == 0).sum()) for _, mask in zeros)
    return Fit(done, start, best, best_step, stopped_by, held)


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


def _progress(done: int, schedule: Schedule, elapsed: float) -> float:
    """How far the run is, 0 to 1: by steps, or by the clock when that is further."""
    by_steps = done / schedule.steps
    if schedule.time_limit is None:
        return by_steps
    return min(1.0, max(by_steps, elapsed / schedule.time_limit))


def training_loss(produced, targets, outputs, labels, kl=False) -> torch.Tensor:
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
        loss = loss + torch.nn.functional.cross_entropy(produced[0], labels)
    return loss


def _labels(labels: np.ndarray | None, device: torch.device) -> torch.Tensor | None:
    return None if labels is None else torch.from_numpy(labels.astype(np.int64)).to(device)


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
    module,
    held: tuple[Samples | list[Samples], list[np.ndarray]],
    outputs: int,
    size: int,
    kl: bool = False,
    device: torch.device | None = None,
    labels: np.ndarray | None = None,
) -> float:
    """The training loss of the graph outputs on the held-out samples (features excluded:
    what the weights are chosen by is what the user gets), with the cross-entropy of the
    first output on `labels` (one per held-out sample) added when given."""
    samples, targets = held
    produced: list[list[torch.Tensor]] = [[] for _ in range(outputs)]
    with torch.no_grad():
        for batch in pieces(samples, size):
            result = module(**as_tensors(batch, device))
            result = result if isinstance(result, tuple) else (result,)
            for index in range(outputs):
                produced[index].append(result[index].cpu())
    whole = [torch.cat(parts) for parts in produced]
    loss = outputs_loss(whole, targets, kl)
    if labels is None:
        return loss
    target = torch.from_numpy(labels.astype(np.int64))
    return loss + float(torch.nn.functional.cross_entropy(whole[0].float(), target))


def outputs_loss(produced: list, targets: list[np.ndarray], kl: bool = False) -> float:
    """The loss of whole outputs (torch tensors or numpy arrays) against their targets: the
    mean over outputs of each one's normalised MSE (or KL, with `kl`)."""
    with torch.no_grad():
        terms = [
            _output_loss(torch.as_tensor(ours), torch.from_numpy(target), kl)
            for ours, target in zip(produced, targets, strict=True)
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


def row_batches(count: int, schedule: Schedule) -> Iterator[np.ndarray]:
    """Row indices of each step's batch of `count` rows in memory: seeded shuffles, one per
    pass over the rows."""
    rng = np.random.default_rng(schedule.seed)
    size = min(schedule.batch_size, count)
    order: np.ndarray = np.empty(0, dtype=np.int64)
    for _ in range(schedule.steps):
        if len(order) < size:
            order = np.concatenate([order, rng.permutation(count)])
        rows, order = np.sort(order[:size]), order[size:]
        yield rows


def _warmup_cosine(steps: int) -> Callable[[float], float]:
    """The learning rate's factor at a step (fractional when the clock sets the pace)."""
    warmup = max(1, round(steps * WARMUP))

    def factor(step: float) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def as_tensors(batch: Samples, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The batch as torch tensors (on `device`), images channels-last: torch's CPU
    convolutions train about ten times faster so on ResNet-20 (docs/decisions.md), with the
    same results."""
    out = {}
    for name, value in batch.items():
        tensor = torch.from_numpy(np.ascontiguousarray(value)).to(device)
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
