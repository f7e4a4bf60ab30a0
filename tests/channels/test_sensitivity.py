"""Damage curves rescaled to the model outputs' error: at each group's probe count the curve
equals the outputs' squared relative error with that group alone pruned and refit."""

from __future__ import annotations

import numpy as np
import onnx

from onnxcompress import graph
from onnxcompress.channels.budget import masks_for
from onnxcompress.channels.graph import build_channel_graph
from onnxcompress.channels.importance import allowed_counts
from onnxcompress.channels.refit import refit_consumers
from onnxcompress.channels.scoring import refit_aware_scores
from onnxcompress.channels.sensitivity import output_scaled_damage
from onnxcompress.channels.surgery import prune_channels
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import run_model
from onnxcompress.validate import random_inputs
from tests.conftest import REPO

PINS = {"input": [4, 3, 32, 32]}


def test_each_curve_is_scaled_to_the_measured_output_error_at_its_probe():
    model = onnx.load(REPO / "models" / "resnet_style.onnx")
    shapes = graph.resolve_input_shapes(model, PINS)
    context = PassContext(input_shapes=shapes, calibration=random_inputs(model, shapes, 3, 2))
    channel_graph = build_channel_graph(model, shapes)
    groups = [g.id for g in channel_graph.groups if g.prunable][:3]
    scores, damage = refit_aware_scores(model, channel_graph, groups, context)
    scaled = output_scaled_damage(model, channel_graph, scores, damage, context, round_to=4)
    (name,) = [o.name for o in model.graph.output]
    reference = run_model(model, context.calibration)[name]
    for g in groups:
        group = channel_graph.groups[g]
        probe = min(
            allowed_counts(group.channels, 4)[1:], key=lambda k: abs(k - group.channels / 2)
        )
        keep = masks_for(channel_graph, {g: scores[g]}, {g: probe})
        pruned = prune_channels(model, channel_graph, keep)
        refit_consumers(model, pruned, channel_graph, keep, context)
        found = run_model(pruned, context.calibration)[name]
        measured = np.sum((found - reference) ** 2) / np.sum(reference**2)
        assert np.isclose(scaled[g][group.channels - probe], measured, rtol=1e-6)
        ratio = scaled[g][1:] / damage[g][1:]
        assert np.allclose(ratio, ratio[0])  # the shape of each curve is kept
