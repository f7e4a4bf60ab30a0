"""How much a layer's error matters at the model's outputs, measured once per layer.

Used two ways by the factorization driver: a layer whose rewrite alone collapses the outputs
(a classifier cut to a few ranks) is kept whatever the budget; and, with `allocation=output`,
the budget weighs each layer's error by its measured effect.

A layer's relative weight (or data) error says how far the layer moved, not what that does to
the outputs: a classifier or a layer feeding a normalisation can wreck the model at an error
another layer shrugs off. With calibration data, each layer is rewritten alone at one probe
rung (the one nearest the budget's share of its MACs, refitted as the pass will) and the
model's relative output error on a few samples is measured: one refit and one forward pass per
layer. Its square over the probe's own error² is the layer's scale; `allocation=output`
allocates by scale × error², a first-order estimate of each rung's output damage (damages of
several layers are taken to add).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx

from onnxcompress.downstream import downstream, rewritten_alone
from onnxcompress.layers import Namer
from onnxcompress.passkit import PassContext, first_samples, no_progress, track

# Samples the probes run on: output errors of a few dozen samples rank layers well enough,
# and each probe is a forward pass over them.
PROBE_SAMPLES = 64


@dataclass(frozen=True)
class Probe:
    """One layer rewritten alone at its probe rung: the rung's own relative error, and the
    model's relative output error (L2 over every output) it caused."""

    error: float
    output_rel_l2: float

    @property
    def scale(self) -> float:
        """Output error² per unit of the layer's error²."""
        return self.output_rel_l2**2 / max(self.error**2, 1e-12)


def probe_layers(
    model: onnx.ModelProto,
    choices: list,
    build: Callable[[Any, Any, Namer], Any],
    target: float,
    context: PassContext,
    refit: bool,
) -> dict[str, Probe]:
    """Layer name → its probe, for mac_budget.LayerChoice `choices`; `build(layer, candidate,
    namer)` returns the rewrite; the probe rung is the one nearest `target` × the layer's MACs;
    `refit`: the rewrite is refitted on the probe samples first, as the pass will."""
    from onnxcompress.runtime import make_session

    batches = first_samples(context.calibration, PROBE_SAMPLES) or []
    on_probes = dataclasses.replace(context, calibration=batches, progress=no_progress)
    reference = _outputs(make_session(model, context.threads), batches)
    probes = {}
    for choice in track(context.progress, "measuring each layer's output damage", choices):
        candidate = _probe(choice.ladder, target * choice.layer.macs)
        part = downstream(model, choice.layer.name, on_probes)
        rewrite = build(choice.layer, candidate, Namer(model))
        trial, on_part = rewritten_alone(model, part, choice.layer.name, rewrite, on_probes, refit)
        outputs = _outputs(make_session(trial, context.threads), on_part.calibration)
        if part:
            outputs = [part.whole(got, want) for got, want in zip(outputs, reference, strict=True)]
        squared = _relative_squared(outputs, reference)
        probes[choice.layer.name] = Probe(candidate.error, float(np.sqrt(squared)))
    return probes


def _probe(ladder: list, macs: float):
    """The rung whose MACs are nearest `macs` (ties: the more accurate one)."""
    return min(ladder, key=lambda candidate: abs(candidate.macs - macs))


def _outputs(session, batches: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    from onnxcompress.runtime import run_session

    return [[np.asarray(v, np.float64) for v in run_session(session, b)] for b in batches]


def _relative_squared(outputs: list[list[np.ndarray]], reference: list[list[np.ndarray]]) -> float:
    """Σ‖ŷ − y‖² / Σ‖y‖² over every output of every batch."""
    error = energy = 0.0
    for got_batch, want_batch in zip(outputs, reference, strict=True):
        for got, want in zip(got_batch, want_batch, strict=True):
            error += float(np.sum((got - want) ** 2))
            energy += float(np.sum(want**2))
    return error / max(energy, 1e-30)
