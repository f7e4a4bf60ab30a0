"""A model's tensors over the calibration batches, computed in onnxruntime part by part: each
asked-for tensor is computed from the tensors already known by the nodes between them, so
that walking a model block by block runs each of its nodes about once instead of running it
from its inputs for every block."""

from __future__ import annotations

import numpy as np
import onnx

from onnxcompress import graph, runtime

Batches = list[dict[str, np.ndarray]]


class ModelTensors:
    """Tensors of `model` on `batches`, one array per batch, by name. The graph inputs are
    always known; `keep` forgets the others once they are no longer needed."""

    def __init__(self, model: onnx.ModelProto, batches: Batches, threads: int):
        self.model = model
        self.threads = threads
        self.inputs = {name: [batch[name] for batch in batches] for name in batches[0]}
        self.known: dict[str, list[np.ndarray]] = dict(self.inputs)

    def get(self, names: tuple[str, ...]) -> dict[str, list[np.ndarray]]:
        """The tensors `names`, computing those not known yet (which then are)."""
        missing = [name for name in dict.fromkeys(names) if name not in self.known]
        if missing:
            self.known.update(self._computed(missing))
        return {name: self.known[name] for name in names}

    def keep(self, names: set[str]) -> None:
        """Forget every tensor but the graph inputs and `names`."""
        self.known = {n: v for n, v in self.known.items() if n in names or n in self.inputs}

    def changed(self, model: onnx.ModelProto, nodes: tuple[int, ...]) -> None:
        """`model` is the same graph with new weights in `nodes`: forget what they reach
        (with subgraphs, all but the inputs: a body's reads are not followed)."""
        self.model = model
        stale = set(self.known) if runtime.has_subgraphs(model) else reached(model, nodes)
        self.known = {n: v for n, v in self.known.items() if n not in stale or n in self.inputs}

    def _computed(self, names: list[str]) -> dict[str, list[np.ndarray]]:
        part, fed = between(self.model, names, set(self.known))
        count = len(next(iter(self.inputs.values())))
        feeds = [{name: self.known[name][index] for name in fed} for index in range(count)]
        runtime.type_inputs(part, feeds[0])
        session = runtime.make_session(part, threads=self.threads, optimize=True)
        found: dict[str, list[np.ndarray]] = {name: [] for name in names}
        for feed in feeds:
            for name, value in zip(names, runtime.run_session(session, feed, names), strict=True):
                found[name].append(value)
        return found


def between(
    model: onnx.ModelProto, names: list[str], known: set[str]
) -> tuple[onnx.ModelProto, list[str]]:
    """The nodes of `model` that compute `names` from the `known` tensors, as a model
    (`runtime.nodes_as_model`), and the known tensors it reads. A graph with subgraphs is cut
    from its inputs only (a body may read any outer tensor)."""
    if runtime.has_subgraphs(model):
        cut = runtime.expose_only(model, names)
        return cut, [value.name for value in graph.runtime_inputs(cut)]
    made_by = {out: index for index, node in enumerate(model.graph.node) for out in node.output}
    wanted, stack = set(), [name for name in names if name not in known]
    while stack:
        index = made_by.get(stack.pop())
        if index is None or index in wanted:
            continue
        wanted.add(index)
        stack += [name for name in model.graph.node[index].input if name and name not in known]
    nodes = [model.graph.node[index] for index in sorted(wanted)]
    outputs = [onnx.ValueInfoProto(name=name) for name in names]
    return runtime.nodes_as_model(model, nodes, outputs)


def reached(model: onnx.ModelProto, nodes: tuple[int, ...]) -> set[str]:
    """Every tensor that the `nodes` write or that depends on one they write."""
    readers = graph.consumers(model)
    found: set[str] = set()
    stack = [name for index in nodes for name in model.graph.node[index].output if name]
    while stack:
        name = stack.pop()
        if name in found:
            continue
        found.add(name)
        stack += [out for node in readers.get(name, []) for out in node.output if out]
    return found


def joined(tensors: dict[str, list[np.ndarray]]) -> dict[str, np.ndarray] | None:
    """Each tensor's batches joined on their first axis; None when they do not join into
    as many rows each (the first axis is not the samples')."""
    try:
        out = {
            name: np.concatenate([np.atleast_1d(array) for array in arrays])
            for name, arrays in tensors.items()
        }
    except ValueError:
        return None
    return out if len({len(array) for array in out.values()}) == 1 else None
