"""The tensors a graph-order refit reads, computed by running each model forward once, segment
by segment, instead of from the graph inputs again for every layer.

A refit in graph order reads, for each rewritten layer, a tensor of the original model (the
target) and one of the rewritten model (what the refitted factor is fed), on every
calibration batch. Cut from the inputs each time (`runtime.paired_outputs`), that costs a run
of everything upstream of every layer: about half the model times the number of layers, per
model. Here each model keeps, per batch, the tensors its later nodes still read (its live
set) and runs only the nodes between the last layer read and the next: one forward pass per
model over the whole refit. A segment is built from the model when it is run, so the rewritten
model's segments carry the factors refitted before them.

The live sets of all batches are held in memory: where they would pass `LIVE_BYTES` (judged on
the first batch) the stream stops (`Exhausted`); the caller reads that layer the old way and
starts a new stream at the next one, its live tensors computed from the inputs."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnx

from onnxcompress.runtime import (
    Batch,
    expose_only,
    has_subgraphs,
    make_session,
    nodes_as_model,
    run_session,
    type_inputs,
)

# Bytes of live tensors (both models, all batches) a stream may hold; see
# docs/decisions.md#live_bytes
LIVE_BYTES = 1 << 30


class Exhausted(Exception):
    """The live tensors outgrew LIVE_BYTES: read the remaining layers another way."""


class _ModelStream:
    """One model run forward in segments over the calibration batches, its live tensors held
    within `budget` bytes; starts just before the node that writes `start`, the tensors live
    there computed from the inputs (one cut run)."""

    def __init__(
        self, model: onnx.ModelProto, batches: list[Batch], threads: int, budget: int, start: str
    ) -> None:
        self.model = model
        self.threads = threads
        self.budget = budget
        self.position = 0  # nodes before it have run
        self.values = [dict(batch) for batch in batches]
        try:
            producer = self._producer(start)
        except ValueError:  # a graph input: from the start
            producer = 0
        live = sorted(self._later(producer) & self._written(0, producer))
        if live:
            cut = expose_only(model, live)
            self._run(make_session(cut, threads, optimize=True), live, self._later(producer))
        self.position = producer

    def read(self, name: str) -> list[np.ndarray]:
        """Tensor `name` for every batch, running the nodes up to the one that writes it."""
        if name not in self.values[0]:
            self._run_to(self._producer(name) + 1, name)
        return [values[name] for values in self.values]

    def _producer(self, name: str) -> int:
        for index, node in enumerate(self.model.graph.node):
            if name in node.output:
                if index < self.position:
                    raise ValueError(f"{name} was written before this point and not kept")
                return index
        raise ValueError(f"no node writes {name}")

    def _run_to(self, end: int, wanted: str) -> None:
        segment = list(self.model.graph.node[self.position : end])
        later = self._later(end) | {wanted}
        keep = sorted(self._written(self.position, end) & later)
        part = _segment(self.model, segment, self.values[0], keep)
        self._run(make_session(part, self.threads, optimize=True), keep, later)
        self.position = end

    def _run(self, session, keep: list[str], later: set[str]) -> None:
        """Every batch through `session`, keeping `keep` and what `later` reads; the first
        batch's bytes times the batches must fit the budget (else Exhausted, nothing more run)."""
        for index, values in enumerate(self.values):
            values.update(zip(keep, run_session(session, values, keep), strict=True))
            for name in [n for n in values if n not in later]:  # no later node reads it
                del values[name]
            if index == 0:
                expected = sum(v.nbytes for v in values.values()) * len(self.values)
                if expected > self.budget:
                    raise Exhausted(f"live tensors over {self.budget >> 20} MiB")

    def _later(self, position: int) -> set[str]:
        """What nodes from `position` on, or the graph outputs, read."""
        read = {i for node in self.model.graph.node[position:] for i in node.input}
        return read | {out.name for out in self.model.graph.output}

    def _written(self, start: int, end: int) -> set[str]:
        return {o for node in self.model.graph.node[start:end] for o in node.output if o}


def _segment(model: onnx.ModelProto, nodes: list, known: Batch, outputs: list[str]):
    """`nodes` of `model` as a model fed the tensors in `known` they read."""
    part, fed = nodes_as_model(model, nodes, [onnx.ValueInfoProto(name=n) for n in outputs])
    missing = [name for name in fed if name not in known]
    if missing:
        raise ValueError(f"{', '.join(missing)} not kept for this segment")
    type_inputs(part, known)
    return part


class RefitStream:
    """Pairs of (original tensor, rewritten tensor) per batch for layers read in graph order,
    from the layer whose tensors are (`source`, `target`) on. Refuses graphs with subgraphs
    (ValueError): their bodies may read any outer tensor."""

    def __init__(
        self,
        original: onnx.ModelProto,
        rewritten: onnx.ModelProto,
        batches: list[Batch],
        threads: int,
        start: tuple[str, str],
    ) -> None:
        if has_subgraphs(original) or has_subgraphs(rewritten):
            raise ValueError("graphs with subgraphs are not streamed")
        self.batches = batches
        self.streams = tuple(
            _ModelStream(model, batches, threads, LIVE_BYTES // 2, name)
            for model, name in zip((original, rewritten), start, strict=True)
        )

    def pairs(self, source: str, target: str) -> Iterator[tuple[Batch, np.ndarray, np.ndarray]]:
        """(batch, `source` of the original, `target` of the rewritten model) per batch, as
        `runtime.paired_outputs` gives them; raises here, not while iterating."""
        pairs = zip(self.streams, (source, target), strict=True)
        values = [stream.read(name) for stream, name in pairs]
        return zip(self.batches, *values, strict=True)
