"""What `benchmarks/run.py` needs to know of one benchmark model: the fp32 model, its
calibration and evaluation data, how a compressed model is scored against the original, and
the inputs its latency is timed on."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

Batches = list[dict[str, np.ndarray]]


@dataclass
class BenchModel:
    """One model of the suite, ready to compress and measure.

    `score(model, threads)` runs `model` (the original or a compressed one) over `evaluation`
    and returns the figures of merit, e.g. {"top1": 85.9, "agreement": 100.0} for a labelled
    classifier or {"cosine_mean": 0.99, "cosine_min": 0.95} for an embedding model; `metric`
    names the key the table and plots lead with, `higher_is_better` its direction.
    `latency_inputs` maps a batch size to the feeds timed at that size (only the sizes the
    model accepts: a model with a fixed batch of 1 has just {1: ...}).
    """

    name: str
    model: onnx.ModelProto
    input_shapes: dict[str, list[int]]  # what the passes analyse with (static shapes)
    calibration: Batches
    evaluation: Batches
    score: Callable[[onnx.ModelProto, int], dict[str, float]]
    metric: str
    latency_inputs: dict[int, dict[str, np.ndarray]]
    higher_is_better: bool = True
    notes: list[str] = field(default_factory=list)  # data used, preprocessing, caveats
    max_repeats: int | None = None  # cap on timed runs per batch size (very slow models)
    batch: int = 1  # the batch the passes see and latency ratios are read at (--batch)
    # Samples of the model's training split (--train-count) that training passes read from
    # the context: an onnxcompress.samples.SampleSource, or None.
    training: Any = None


# --- the methods the suite runs, and their budgets -------------------------------------------

# Factorization passes: align 8 measured better than the default 16 on these small models, and
# never_slower off so that a MACs budget is what it says (no layer reverted on a timing).
_FACTORIZATION = {"align": 8, "never_slower": False}


@dataclass(frozen=True)
class Method:
    """A compression method of the suite: a registered pass with fixed options, whose budget
    ladder sets `budget` (target_macs or sparsity), then the passes of `then` at their
    defaults (e.g. int8 after a factorization); pass_name None is the dynamic int8 baseline."""

    pass_name: str | None
    budget: str | None
    defaults: dict = field(default_factory=dict)
    coded: bool = False  # sized as `.onnxc`: pruned weights only get small once coded
    note: str = ""
    then: tuple[str, ...] = ()


METHODS: dict[str, Method] = {
    **{
        name: Method(name, "target_macs", _FACTORIZATION, note="align 8, never_slower off")
        for name in ("fga", "tucker2", "cp", "svd", "lrs")
    },
    "channels": Method("channels", "target_macs", note="structured channel pruning, refit"),
    "prune": Method("prune", "sparsity", coded=True, note="global magnitude pruning"),
    "prune_uniform": Method(
        "prune",
        "sparsity",
        {"scope": "layer"},
        coded=True,
        note="baseline: magnitude pruning, the same sparsity in every layer",
    ),  # fmt: skip
    "rdprune": Method(
        "rdprune",
        "sparsity",
        {"compare": False},
        coded=True,
        note="SuRP rate-distortion pruning, its own coded weights",
    ),  # fmt: skip
    "auto": Method(
        "auto",
        "target_latency",
        {"align": 8, "int8": False},
        note="per layer: keep, svd, cp, tucker2 or fga, from measured latency and damage; "
        "float plans only (int8=false)",
    ),
    "int8": Method("int8", None, note="static int8 (QDQ, per channel) calibrated on the data"),
    "blocks": Method(
        "blocks", "count", note="identity residual blocks removed, least damaging first, refit"
    ),
    "blocks+int8": Method("blocks", "count", note="blocks, then int8", then=("int8",)),
    **{
        f"{name}+int8": Method(
            name, "target_macs", _FACTORIZATION, note=f"{name} (align 8), then int8", then=("int8",)
        )
        for name in ("svd", "cp")
    },
    "channels+int8": Method("channels", "target_macs", note="channels, then int8", then=("int8",)),
    **{
        f"{name}+distill": Method(
            name,
            "target_macs",
            _FACTORIZATION,
            note=f"{name} (align 8), then distill: trained to match the original on the "
            "calibration data, or with --train-count on that many training samples",
            then=("distill",),
        )
        for name in ("fga", "svd", "cp", "tucker2", "lrs")
    },
    "prune+distill": Method(
        "prune",
        "sparsity",
        coded=True,
        note="global magnitude pruning, then distill (zeros stay zero)",
        then=("distill",),
    ),
    "channels+distill": Method(
        "channels", "target_macs", note="channels, then distill", then=("distill",)
    ),
    "blocks+distill": Method("blocks", "count", note="blocks, then distill", then=("distill",)),
    "auto+distill": Method(
        "auto",
        "target_latency",
        {"align": 8, "int8": False},
        note="auto's float plan, then distill",
        then=("distill",),
    ),
    "auto_int8": Method(
        "auto",
        "target_latency",
        {"align": 8, "int8": True},
        note="auto as by default with data: float plans, int8 of the original and of the best "
        "one, and plans chosen on int8 timings, all measured; keeps the best",
    ),
    "auto+int8": Method(
        "auto",
        "target_latency",
        {"align": 8, "int8": False},
        note="auto's float plan, then int8",
        then=("int8",),
    ),
    "int8_dynamic": Method(
        None, None, note="baseline: onnxruntime quantize_dynamic, int8 weights; MACs as original"
    ),
}


@dataclass(frozen=True)
class Variant:
    """One method at one budget: its label in tables, and the options its pass gets."""

    label: str
    method: str
    options: dict
    budget: float | None = None


def variants(
    methods: list[str],
    budgets: list[float],
    sparsities: list[float],
    opt: dict[str, dict],
    latency_budgets: list[float] = (),
    block_counts: list[int] = (),
) -> list[Variant]:
    """Every method at every budget of its kind (MACs fractions, sparsities, latency
    fractions or blocks removed); `opt` maps a method name or a pass name to extra options
    (the method's name wins)."""
    out = []
    for name in methods:
        method = METHODS[name]
        extra = {**opt.get(method.pass_name or "", {}), **opt.get(name, {})}
        base = {**method.defaults, **extra}
        if method.budget is None:
            out.append(Variant(name, name, base))
            continue
        ladder = {"target_macs": budgets, "sparsity": sparsities, "count": block_counts}.get(
            method.budget, latency_budgets
        )
        for value in ladder:
            label = f"{name}@{value:g}"
            out.append(Variant(label, name, {**base, method.budget: value}, value))
    return out


def parse_options(items: list[str], methods: list[str]) -> dict[str, dict[str, str]]:
    """`METHOD.KEY=VALUE` items (METHOD a method or a pass name) → {name: {key: value}};
    ValueError for a malformed item or one that sets a budget option."""
    names = set(methods) | {METHODS[m].pass_name for m in methods if METHODS[m].pass_name}
    names |= {name for m in methods for name in METHODS[m].then}  # e.g. --opt distill.steps=100
    options: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, option = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--opt {item}: expected METHOD.KEY=VALUE")
        if name not in names:
            raise ValueError(f"--opt {item}: {name} is not a method or pass of this run")
        if option in ("target_macs", "sparsity", "count"):
            raise ValueError(
                f"--opt {item}: {option} is set by --budgets / --sparsities / --block-counts"
            )
        options.setdefault(name, {})[option] = value
    return options
