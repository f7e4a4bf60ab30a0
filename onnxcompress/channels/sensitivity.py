"""How much a group's consumer error matters at the model's outputs. The refit-aware damage
curves measure each group at its own consumers; an error there may be damped or amplified on
the way to the outputs, so a greedy allocation that compares curves across groups would trust
them too much. Each group is pruned alone to about half its channels, refit, and run: its
curve is rescaled so that, at that count, it equals the squared relative error the model's
outputs then show on the calibration data."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from onnxcompress.channels.budget import masks_for
from onnxcompress.channels.groups import ChannelGraph
from onnxcompress.channels.importance import allowed_counts
from onnxcompress.channels.refit import refit_consumers
from onnxcompress.channels.surgery import prune_channels
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import run_model

log = logging.getLogger(__name__)

PROBE_FRACTION = 0.5  # each group's probe keeps the allowed count nearest half its channels


def output_scaled_damage(
    model: onnx.ModelProto,
    channel_graph: ChannelGraph,
    scores: dict[int, np.ndarray],
    damage: dict[int, np.ndarray],
    context: PassContext,
    round_to: int,
    refit_options: tuple = (),
) -> dict[int, np.ndarray]:
    """Damage curves in units of the model outputs' squared relative error (see the module)."""
    reference = _outputs(model, context)
    scaled = {}
    for g, curve in damage.items():
        group = channel_graph.groups[g]
        allowed = allowed_counts(group.channels, round_to, group.blocks)
        probe = min(allowed[1:] or allowed, key=lambda k: abs(k - PROBE_FRACTION * group.channels))
        at_probe = float(curve[group.channels - probe])
        if probe == group.channels or at_probe <= 0:
            scaled[g] = curve
            continue
        measured = _output_error(model, channel_graph, scores, g, probe, context, reference,
                                 refit_options)  # fmt: skip
        scaled[g] = curve * (measured / at_probe)
        log.debug("group %d: consumer damage %.4g -> output error %.4g", g, at_probe, measured)
    return scaled


def _output_error(model, channel_graph, scores, g, count, context, reference, refit_options):
    keep = masks_for(channel_graph, {g: scores[g]}, {g: count})
    pruned = prune_channels(model, channel_graph, keep)
    refit_consumers(model, pruned, channel_graph, keep, context, *refit_options)
    outputs = _outputs(pruned, context)
    error = sum(float(np.sum(np.square(outputs[n] - reference[n]))) for n in reference)
    energy = sum(float(np.sum(np.square(reference[n]))) for n in reference)
    return error / max(energy, 1e-30)


def _outputs(model: onnx.ModelProto, context: PassContext) -> dict[str, np.ndarray]:
    return run_model(model, context.calibration or [], context.threads)
