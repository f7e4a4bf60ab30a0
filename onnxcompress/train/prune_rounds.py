"""Prune, retrain, prune again: a pruning pass's own rule applied in rounds to a rising
sparsity, each round followed by distillation toward the original with the zeros held. This
is SuRP as its authors ran it (`rdprune.retrain_steps`), and magnitude pruning the same way
(`prune.retrain_steps`), so that the two compare under the same training."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress import graph
from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassContext
from onnxcompress.prunable import write_weights
from onnxcompress.train.distillation import distil, require_training
from onnxcompress.train.schedule import DEFAULT_BATCH, DEFAULT_LR, Schedule
from onnxcompress.train.tensors import default_trainable

# weights (name -> array) and a sparsity -> the pruned weights, same names, shapes and types.
PruneTo = Callable[[dict[str, np.ndarray], float], dict[str, np.ndarray]]


@dataclass(frozen=True)
class Retraining:
    """`steps` of distillation after each of `rounds` pruning rounds."""

    steps: int
    rounds: int

    def check(self, who: str) -> None:
        """CompressError naming the option (`who` is the pass) for a count out of range."""
        if self.steps < 0:
            raise CompressError(f"{who}.retrain_steps={self.steps}: expected 0 (off) or more")
        if self.rounds < 1:
            raise CompressError(f"{who}.rounds={self.rounds}: expected 1 or more")


def round_sparsities(target: float, rounds: int) -> list[float]:
    """Each round prunes the same share of the weights still left: 1 − (1 − target)^(k/rounds),
    the last one `target` (the geometric schedule of iterative pruning, Han et al. 2015)."""
    return [1 - (1 - target) ** (k / rounds) for k in range(1, rounds)] + [target]


def retrained(
    model: onnx.ModelProto,
    names: list[str],
    prune_to: PruneTo,
    target: float,
    retraining: Retraining,
    context: PassContext,
    who: str,
) -> tuple[onnx.ModelProto, dict]:
    """`model` after its weights `names` were pruned by `prune_to` to each round's sparsity,
    each round followed by `retraining.steps` of distillation toward the run's original (every
    weight, bias and norm scale trains; zeros stay zero), and a summary of the rounds."""
    require_training(model, context, f"{who}.retrain_steps")
    teacher = context.original or model
    rows, started = [], time.perf_counter()
    for index, sparsity in enumerate(round_sparsities(target, retraining.rounds)):
        constants = graph.constant_tensors(model)
        pruned = prune_to({name: constants[name] for name in names}, sparsity)
        model = _with_weights(model, pruned)
        schedule = Schedule(
            retraining.steps, DEFAULT_LR, DEFAULT_BATCH, context.seed + index, context.threads
        )
        run = distil(
            model, teacher, default_trainable(model), schedule, context, f"{who}.retrain_steps"
        )
        outcome = run.outcome
        if outcome.model is not None:
            model = outcome.model
        rows.append(_round_row(sparsity, pruned, outcome))
    summary = {
        "steps": sum(row["steps"] for row in rows),
        "seconds": round(time.perf_counter() - started, 2),
        "rounds": rows,
    }
    return model, summary


def _with_weights(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    write_weights(out, values)
    return out


def _round_row(sparsity: float, pruned: dict[str, np.ndarray], outcome) -> dict:
    size = sum(value.size for value in pruned.values())
    nonzero = sum(int(np.count_nonzero(value)) for value in pruned.values())
    kept = outcome.model is not None
    return {
        "sparsity_asked": round(sparsity, 6),
        "sparsity": round(1 - nonzero / size, 6) if size else 0.0,
        "steps": outcome.steps,
        "seconds": outcome.seconds,
        "held_out_loss_before": round(outcome.start_loss, 6),
        "held_out_loss_after": round(outcome.best_loss if kept else outcome.start_loss, 6),
        "held_zeros": outcome.held_zeros,
    }
