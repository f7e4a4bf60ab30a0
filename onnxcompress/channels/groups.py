"""Channel dependency groups, found by walking the graph forward from every Conv/Gemm/MatMul.

Each producer's output channels form a *space*. Every tensor the walk reaches gets a *layout*:
which spaces its channel axis is made of, at which offsets (Concat puts several side by side,
Split/Slice cut ranges, Flatten turns each channel into a block of columns). Ops that add or
multiply two activations tie their spaces together (union–find); tied spaces are one *group*,
pruned with one keep-mask. An op the walk cannot map makes every group it touches unprunable,
with the reason in words. Nothing here edits the model: the walk records the *edits* that
`channel_surgery` applies once keep-masks are chosen. The per-op rules are in `channel_rules`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from onnxcompress import graph


class Unmappable(Exception):
    """An op whose effect on the channels the walk cannot follow; the message says why."""


@dataclass(frozen=True)
class Segment:
    """Channels [start, start + length) of one space, or `length` channels of no space (None:
    a graph input, a constant, an op the walk gave up on: such channels are never pruned)."""

    space: int | None
    start: int
    length: int


@dataclass(frozen=True)
class Layout:
    """How the channel axis `axis` of a rank-`rank` tensor maps onto spaces; after a flatten
    each channel owns `repeat` consecutive features."""

    axis: int
    rank: int
    segments: tuple[Segment, ...]
    repeat: int = 1

    @property
    def channels(self) -> int:
        return sum(s.length for s in self.segments)

    def spaces(self) -> set[int]:
        return {s.space for s in self.segments if s.space is not None}

    def moved(self, axis: int, rank: int, repeat: int | None = None) -> Layout:
        return Layout(axis, rank, self.segments, self.repeat if repeat is None else repeat)

    def cut(self, start: int, length: int) -> Layout:
        """The layout of channels [start, start + length) of this tensor."""
        pieces, offset = [], 0
        for seg in self.segments:
            low, high = max(start, offset), min(start + length, offset + seg.length)
            if low < high:
                pieces.append(Segment(seg.space, seg.start + low - offset, high - low))
            offset += seg.length
        return Layout(self.axis, self.rank, tuple(pieces), self.repeat)


def opaque(channels: int) -> Segment:
    return Segment(None, 0, channels)


def channels_input(ins: list[Layout | None]) -> Layout | None:
    """For ops whose channels enter by input 0 only: that input's layout."""
    if any(layout is not None for layout in ins[1:]):
        raise Unmappable("channels reach a parameter input")
    return ins[0]


def require_channels_on_axis_1(layout: Layout) -> None:
    """For ops that read channels on axis 1, one value each (conv, pooling, normalization)."""
    if layout.axis != 1 or layout.repeat != 1:
        raise Unmappable("channels are not on axis 1")


@dataclass
class Edit:
    """One change surgery makes once keep-masks are known.

    kind: producer (output channels of a Conv/Gemm/MatMul/ConvTranspose), consumer (input
    channels of one), depthwise (tied input and output channels), param (a per-channel constant
    input `input_index`, sliced on `extra["axis"]`), split, slice, reshape, resize.
    """

    kind: str
    node: int
    layout: Layout
    input_index: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Group:
    """Spaces tied together: one keep-mask over `channels` channels prunes all of them."""

    id: int
    name: str
    channels: int
    blocks: int  # equal kept count in each of `blocks` blocks (grouped convs)
    producers: list[int]
    consumers: list[int]
    nodes: set[int]  # every node whose inputs or outputs carry these channels
    reasons: list[str]
    keep_ranges: list[tuple[int, int]]  # (start, length) ranges that must keep a channel

    @property
    def prunable(self) -> bool:
        return not self.reasons


@dataclass
class ChannelGraph:
    """The walk's result: groups, the layout of every tensor reached, the edits to apply."""

    groups: list[Group]
    layouts: dict[str, Layout]
    edits: list[Edit]
    group_of_space: dict[int, int]  # space -> index into `groups`

    def positions(self, layout: Layout, keep: dict[int, np.ndarray]) -> np.ndarray:
        """Indices along the tensor's channel axis (features, after a flatten) that stay when
        group `g` keeps `keep[g]` (a bool mask); groups missing from `keep` keep everything."""
        parts, offset = [], 0
        for seg in layout.segments:
            mask = None
            if seg.space is not None:
                mask = keep.get(self.group_of_space[seg.space])
            if mask is None:
                parts.append(np.arange(seg.length) + offset)
            else:
                parts.append(np.flatnonzero(mask[seg.start : seg.start + seg.length]) + offset)
            offset += seg.length
        kept = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        if layout.repeat > 1:
            kept = (kept[:, None] * layout.repeat + np.arange(layout.repeat)).reshape(-1)
        return kept.astype(np.int64)

    def owners(self, layout: Layout) -> list[tuple[int | None, np.ndarray]]:
        """Per segment: (group index or None, channel indices in that group), in axis order."""
        found = []
        for seg in layout.segments:
            group = None if seg.space is None else self.group_of_space[seg.space]
            found.append((group, np.arange(seg.start, seg.start + seg.length)))
        return found

    def touches(self, edit: Edit, keep: dict[int, np.ndarray]) -> bool:
        return any(self.group_of_space[s] in keep for s in edit.layout.spaces())


class Walker:
    """Forward dataflow over the nodes (in graph order) carrying layouts; union–find on spaces."""

    def __init__(self, model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None):
        self.model = model
        self.nodes = list(model.graph.node)
        self.constants = graph.constant_tensors(model)
        self.opset = graph.default_opset(model)
        self.shapes = _tensor_dims(model, input_shapes)
        self.users = graph.consumers(model)
        self.graph_outputs = [out.name for out in model.graph.output]
        self.layouts: dict[str, Layout] = {}
        self.edits: list[Edit] = []
        self.space_length: list[int] = []
        self.space_producer: list[int] = []
        self.parent: list[int] = []
        self.blocks: dict[int, int] = {}
        self.reasons: dict[int, list[str]] = {}
        self.touched: dict[int, set[int]] = {}
        self.keep_ranges: dict[int, list[tuple[int, int]]] = {}

    # --- helpers the rules use -----------------------------------------------------------

    def const(self, name: str) -> np.ndarray | None:
        return self.constants.get(name) if name else None

    def dims(self, name: str) -> list[int] | None:
        return self.shapes.get(name)

    def used(self, name: str) -> bool:
        return bool(name) and (bool(self.users.get(name)) or name in self.graph_outputs)

    def new_space(self, node: int, length: int, blocks: int = 1) -> Layout | None:
        """A fresh space for the output channels of producer `node` (rank set by the caller)."""
        space = len(self.space_length)
        self.space_length.append(length)
        self.space_producer.append(node)
        self.parent.append(space)
        if blocks > 1:
            self.blocks[space] = blocks
        return Layout(0, 0, (Segment(space, 0, length),))

    def edit(self, kind: str, node: int, layout: Layout, input_index: int = 0, **extra) -> None:
        self.edits.append(Edit(kind, node, layout, input_index, dict(extra)))

    def fail(self, layout: Layout | None, reason: str) -> None:
        for space in layout.spaces() if layout is not None else ():
            self.reasons.setdefault(space, []).append(reason)

    def require_blocks(self, layout: Layout, blocks: int, what: str) -> None:
        """Channels read by a grouped conv: every block must keep the same count."""
        spaces = [s for s in layout.segments if s.space is not None]
        if not spaces:
            return
        seg = layout.segments[0]
        if len(layout.segments) != 1 or seg.start or seg.length != self.space_length[seg.space]:
            raise Unmappable(f"{what} reads channels from more than one group")
        self.blocks[seg.space] = math.lcm(self.blocks.get(seg.space, 1), blocks)

    def require_kept(self, layout: Layout) -> None:
        """Each piece of `layout` must keep at least one channel (a Split/Slice output)."""
        for seg in layout.segments:
            if seg.space is not None:
                self.keep_ranges.setdefault(seg.space, []).append((seg.start, seg.length))

    def couple(self, a: Layout, b: Layout, where: str) -> None:
        """Channel i of `a` and of `b` are one channel (Add of two activations, ...)."""
        if a.channels != b.channels or a.repeat != b.repeat:
            raise Unmappable(f"{where}: inputs of {a.channels} and {b.channels} channels")
        for left, right in _aligned_pieces(a, b):
            if left.space is None and right.space is None:
                continue
            if left.space is None or right.space is None:
                known = left if right.space is None else right
                self.fail(Layout(0, 0, (known,)), f"{where} adds channels that cannot be pruned")
                continue
            if self.find(left.space) == self.find(right.space) and left.start == right.start:
                continue
            if self._whole(left) and self._whole(right):
                self._union(left.space, right.space)
                continue
            reason = f"{where} ties channel ranges that do not line up"
            self.fail(Layout(0, 0, (left, right)), reason)

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    # --- the walk ------------------------------------------------------------------------

    def walk(self, rules: dict, producer_ops: set[str]) -> None:
        for index, node in enumerate(self.nodes):
            ins = [self.layouts.get(name) if name else None for name in node.input]
            if not any(ins) and node.op_type not in producer_ops:
                continue
            for layout in ins:
                self._touch(layout, index)
            rule = rules.get(node.op_type) if node.domain in ("", "ai.onnx") else None
            if rule is None:
                for layout in ins:
                    self.fail(
                        layout,
                        f"feeds {node.op_type} '{label(node)}', an op the walk does not understand",
                    )
                continue
            try:
                outputs = rule(self, index, node, ins)
            except Unmappable as why:
                for layout in ins:
                    self.fail(layout, f"{node.op_type} '{label(node)}': {why}")
                continue
            for name, layout in outputs.items():
                self.layouts[name] = layout
                self._touch(layout, index)
        for name in self.graph_outputs:
            self.fail(self.layouts.get(name), f"reaches graph output '{name}'")
        for name in graph.names_in_subgraphs(self.model.graph):
            self.fail(self.layouts.get(name), f"tensor '{name}' is used inside a subgraph")

    def result(self) -> ChannelGraph:
        roots = sorted({self.find(s) for s in range(len(self.space_length))})
        index = {root: i for i, root in enumerate(roots)}
        group_of_space = {s: index[self.find(s)] for s in range(len(self.space_length))}
        groups = [
            Group(i, "", self.space_length[root], 1, [], [], set(), [], [])
            for i, root in enumerate(roots)
        ]
        for space, g in group_of_space.items():
            group = groups[g]
            group.producers.append(self.space_producer[space])
            group.blocks = math.lcm(group.blocks, self.blocks.get(space, 1))
            group.nodes |= self.touched.get(space, set())
            group.keep_ranges += self.keep_ranges.get(space, [])
            group.reasons += [r for r in self.reasons.get(space, []) if r not in group.reasons]
        for edit in self.edits:
            for g in {group_of_space[s] for s in edit.layout.spaces()}:
                groups[g].nodes.add(edit.node)
                if edit.kind == "consumer" and edit.node not in groups[g].consumers:
                    groups[g].consumers.append(edit.node)
        for group in groups:
            group.producers.sort()
            group.consumers.sort()
            group.name = "+".join(label(self.nodes[p]) for p in group.producers)
            if group.channels % group.blocks:
                group.reasons.append(
                    f"{group.channels} channels do not split into {group.blocks} equal blocks"
                )
            if not group.reasons and not group.consumers:
                group.reasons.append("no Conv/Gemm/MatMul reads these channels")
        return ChannelGraph(groups, dict(self.layouts), list(self.edits), group_of_space)

    def _touch(self, layout: Layout | None, node: int) -> None:
        for space in layout.spaces() if layout is not None else ():
            self.touched.setdefault(space, set()).add(node)

    def _whole(self, seg: Segment) -> bool:
        return seg.start == 0 and seg.length == self.space_length[seg.space]

    def _union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def label(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _aligned_pieces(a: Layout, b: Layout):
    """Pairs of segment pieces covering the same channel positions of `a` and `b`."""
    cuts = sorted({0, a.channels} | set(_boundaries(a)) | set(_boundaries(b)))
    for low, high in zip(cuts, cuts[1:], strict=False):
        (left,) = a.cut(low, high - low).segments
        (right,) = b.cut(low, high - low).segments
        yield left, right


def _boundaries(layout: Layout) -> list[int]:
    offsets, total = [], 0
    for seg in layout.segments:
        total += seg.length
        offsets.append(total)
    return offsets


def _tensor_dims(
    model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None
) -> dict[str, list[int]]:
    """Concrete dims of every tensor shape inference can tell (inputs pinned when given)."""
    try:
        shapes = graph.resolve_input_shapes(model, input_shapes)
        pinned = graph.with_input_shapes(model, shapes)
    except Exception:  # dynamic dims nobody pinned: shapes stay symbolic, rules say so
        pinned = model
    try:
        inferred = graph.infer_shapes(pinned)
    except Exception:
        inferred = pinned
    dims = {}
    for name, info in graph.value_infos(inferred).items():
        if not info.type.HasField("tensor_type") or not info.type.tensor_type.HasField("shape"):
            continue
        values = graph.dim_values(info)
        if all(isinstance(d, int) and d >= 0 for d in values):
            dims[name] = [int(d) for d in values]
    for name, value in graph.constant_tensors(model).items():
        dims.setdefault(name, list(value.shape))
    return dims
