"""One layer's part of a model, for measuring that layer rewritten alone: the layer and every
node that reads what it writes (`runtime.downstream_cut`), fed the tensors it reads from
upstream, computed once from the original. A rewrite of the layer changes nothing upstream, so
its refit and its run need only this part: the same numbers as the whole model's, without
running the unchanged upstream part again for every candidate."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TypeVar

import onnx

from onnxcompress import layer_refit
from onnxcompress.layers import replace_node
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import (
    downstream_cut,
    expose_only,
    make_session,
    run_session,
    type_inputs,
)

T = TypeVar("T")


@dataclass
class Downstream:
    model: onnx.ModelProto  # the part, as in the original
    context: PassContext  # its batches: the calibration inputs and the upstream tensors
    outputs: list[str]  # the graph outputs it computes; the others cannot change
    graph_outputs: list[str]  # the whole model's outputs, in order

    def whole(self, computed: list[T], reference: list[T]) -> list[T]:
        """The whole model's outputs (`reference`: the original's, in graph order) with those
        this part computes (`computed`, in the part's order) put in."""
        found = dict(zip(self.outputs, computed, strict=True))
        return [
            found.get(name, ref) for name, ref in zip(self.graph_outputs, reference, strict=True)
        ]


def downstream(model: onnx.ModelProto, layer: str, context: PassContext) -> Downstream | None:
    """Layer `layer`'s part of `model` on `context`'s calibration batches; None for graphs
    with subgraphs (run the whole model)."""
    try:
        part, frontier = downstream_cut(model, layer)
    except ValueError:
        return None
    inputs = {value.name for value in model.graph.input}
    computed = [name for name in frontier if name not in inputs]
    session = None
    if computed:
        upstream = expose_only(model, computed)
        session = make_session(upstream, threads=context.threads, optimize=True)
    batches = []
    for batch in context.calibration or []:
        found = run_session(session, batch, computed) if session else []
        batches.append({**batch, **dict(zip(computed, found, strict=True))})
    type_inputs(part, batches[0])
    names = [out.name for out in part.graph.output]
    on_part = dataclasses.replace(context, calibration=batches)
    return Downstream(part, on_part, names, [out.name for out in model.graph.output])


def rewritten_alone(
    model: onnx.ModelProto,
    part: Downstream | None,
    layer: str,
    rewrite,
    context: PassContext,
    refit: bool = True,
) -> tuple[onnx.ModelProto, PassContext]:
    """`model`, or its `part` for `layer` when there is one, with `layer` replaced by `rewrite`
    (nodes, initializers, refit site) and, with `refit`, refit as a pass would; and the context
    whose batches it runs on."""
    base, on = (part.model, part.context) if part else (model, context)
    trial = onnx.ModelProto()
    trial.CopyFrom(base)
    replace_node(trial, layer, rewrite.nodes, rewrite.initializers)
    if refit and rewrite.refit is not None:
        layer_refit.refit_layers(base, trial, [rewrite.refit], on)
    return trial, on
