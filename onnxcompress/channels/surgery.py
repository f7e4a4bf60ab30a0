"""Apply keep-masks to a model: slice the weights, biases and per-channel constants of every
node the groups touch, and rewrite group counts, Split sizes, Slice bounds, Reshape targets and
Resize sizes to match. Nodes keep their order and outputs keep their names, so a node's index
means the same node before and after (the caller cleans up afterwards)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress import graph
from onnxcompress.channels.groups import ChannelGraph, Edit

# Model IR versions before 4 want every initializer listed as a graph input too.
MIN_IR = 4


def prune_channels(
    model: onnx.ModelProto, channel_graph: ChannelGraph, keep: dict[int, np.ndarray]
) -> onnx.ModelProto:
    """A copy of `model` where group `g` keeps the channels `keep[g]` (a bool mask); groups
    not in `keep` are left whole. Unused old weights stay until the caller's cleanup."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    work.ir_version = max(work.ir_version, MIN_IR)
    editor = ConstantEditor(work)
    for edit in channel_graph.edits:
        if channel_graph.touches(edit, keep):
            kept = channel_graph.positions(edit.layout, keep)
            APPLY[edit.kind](editor, work.graph.node[edit.node], edit, kept)
    # Stale shapes of pruned tensors would contradict shape inference; they are optional.
    del work.graph.value_info[:]
    return work


def output_axis(node: onnx.NodeProto) -> int:
    """The weight axis holding a producer's output channels."""
    if node.op_type == "Gemm":
        return 0 if graph.node_attributes(node).get("transB", 0) else 1
    return {"Conv": 0, "ConvTranspose": 1, "MatMul": 1}[node.op_type]


def input_axis(node: onnx.NodeProto) -> int:
    """The weight axis a consumer reads its input channels (features) on."""
    if node.op_type == "Gemm":
        return 1 if graph.node_attributes(node).get("transB", 0) else 0
    return {"Conv": 1, "ConvTranspose": 0, "MatMul": 0}[node.op_type]


class ConstantEditor:
    """Reads a node's constant inputs and writes sliced copies under fresh names."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.opset = graph.default_opset(model)
        self.values = graph.constant_tensors(model)
        self.ours: dict[str, onnx.TensorProto] = {}
        self.names = {t.name for t in model.graph.initializer}
        for node in model.graph.node:
            self.names.update(node.input)
            self.names.update(node.output)

    def get(self, node: onnx.NodeProto, index: int) -> np.ndarray | None:
        if index >= len(node.input) or not node.input[index]:
            return None
        return self.values.get(node.input[index])

    def set(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        """Feed input `index` of `node` from `value` (a new initializer unless ours already)."""
        name = node.input[index] if index < len(node.input) else ""
        if name in self.ours:
            self.ours[name].CopyFrom(numpy_helper.from_array(value, name))
        else:
            base = f"{name or (node.name or node.output[0]) + f'_input{index}'}_pruned"
            name, counter = base, 1
            while name in self.names:
                name, counter = f"{base}_{counter}", counter + 1
            self.names.add(name)
            tensor = numpy_helper.from_array(value, name)
            self.model.graph.initializer.append(tensor)
            self.ours[name] = self.model.graph.initializer[-1]
            while len(node.input) <= index:
                node.input.append("")
            node.input[index] = name
        self.values[name] = value

    def take(self, node: onnx.NodeProto, index: int, kept: np.ndarray, axis: int) -> None:
        value = self.get(node, index)
        if value is not None:
            self.set(node, index, np.take(value, kept, axis=axis))


def _producer(editor: ConstantEditor, node: onnx.NodeProto, edit: Edit, kept: np.ndarray) -> None:
    axis = output_axis(node)
    outputs = editor.get(node, 1).shape[axis]
    editor.take(node, 1, kept, axis)
    bias = editor.get(node, 2)
    if bias is not None and bias.ndim >= 1 and bias.shape[-1] == outputs and outputs > 1:
        editor.take(node, 2, kept, bias.ndim - 1)


def _consumer(editor: ConstantEditor, node: onnx.NodeProto, edit: Edit, kept: np.ndarray) -> None:
    attrs = graph.node_attributes(node)
    groups = int(attrs.get("group", 1)) if node.op_type == "Conv" else 1
    if groups > 1:
        _grouped_consumer(editor, node, kept, groups, edit.layout.channels)
        return
    editor.take(node, 1, kept, input_axis(node))


def _grouped_consumer(
    editor: ConstantEditor, node: onnx.NodeProto, kept: np.ndarray, groups: int, channels: int
) -> None:
    """Weight [C_out, C_in/g, ...]: output channels of group b read input block b only, so each
    group's rows are sliced with the positions kept inside its own input block."""
    weight = editor.get(node, 1)
    width, rows = channels // groups, weight.shape[0] // groups
    parts = []
    for block in range(groups):
        local = kept[(kept >= block * width) & (kept < (block + 1) * width)] - block * width
        parts.append(weight[block * rows : (block + 1) * rows][:, local])
    editor.set(node, 1, np.concatenate(parts, axis=0))


def _depthwise(editor: ConstantEditor, node: onnx.NodeProto, edit: Edit, kept: np.ndarray) -> None:
    editor.take(node, 1, kept, 0)
    editor.take(node, 2, kept, 0)
    _set_attribute(node, "group", len(kept))


def _param(editor: ConstantEditor, node: onnx.NodeProto, edit: Edit, kept: np.ndarray) -> None:
    editor.take(node, edit.input_index, kept, edit.extra["axis"])


def _split(editor: ConstantEditor, node: onnx.NodeProto, edit: Edit, kept: np.ndarray) -> None:
    sizes, start, new = edit.extra["sizes"], 0, []
    for size in sizes:
        new.append(int(np.count_nonzero((kept >= start) & (kept < start + size))))
        start += size
    if editor.opset >= 13:
        _remove_attribute(node, "num_outputs")
        editor.set(node, 1, np.array(new, dtype=np.int64))
    else:
        _set_attribute(node, "split", new)


def _slice(editor: ConstantEditor, node: onnx.NodeProto, edit: Edit, kept: np.ndarray) -> None:
    entry = edit.extra["entry"]
    start = int(np.count_nonzero(kept < edit.extra["start"]))
    end = int(np.count_nonzero(kept < edit.extra["end"]))
    if editor.opset < 10:
        for name, value in (("starts", start), ("ends", end)):
            values = list(graph.node_attributes(node)[name])
            values[entry] = value
            _set_attribute(node, name, values)
        return
    for index, value in ((1, start), (2, end)):
        array = editor.get(node, index).copy()
        array[entry] = value
        editor.set(node, index, array)


def _reshape(editor: ConstantEditor, node: onnx.NodeProto, edit: Edit, kept: np.ndarray) -> None:
    shape = editor.get(node, 1).copy()
    entry, layout = edit.extra["entry"], edit.layout
    if shape[entry] > 0:  # an explicit size (0 copies the input's, -1 is inferred)
        shape[entry] = shape[entry] // (layout.channels * layout.repeat) * len(kept)
        editor.set(node, 1, shape)


def _resize(editor: ConstantEditor, node: onnx.NodeProto, edit: Edit, kept: np.ndarray) -> None:
    sizes = editor.get(node, edit.input_index).copy()
    sizes[edit.extra["entry"]] = len(kept)
    editor.set(node, edit.input_index, sizes)


APPLY = {
    "producer": _producer,
    "consumer": _consumer,
    "depthwise": _depthwise,
    "param": _param,
    "split": _split,
    "slice": _slice,
    "reshape": _reshape,
    "resize": _resize,
}


def _set_attribute(node: onnx.NodeProto, name: str, value) -> None:
    _remove_attribute(node, name)
    node.attribute.append(helper.make_attribute(name, value))


def _remove_attribute(node: onnx.NodeProto, name: str) -> None:
    for attr in list(node.attribute):
        if attr.name == name:
            node.attribute.remove(attr)


def zero_removed_inputs(
    model: onnx.ModelProto, channel_graph: ChannelGraph, keep: dict[int, np.ndarray]
) -> onnx.ModelProto:
    """A copy of `model`, same shapes, where every consumer ignores the channels `keep` drops
    (their weight columns are zero). Every path of a pruned channel ends at a consumer, so this
    computes exactly what `prune_channels` does without refit: the reference to test against."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    editor = ConstantEditor(work)
    for edit in channel_graph.edits:
        if edit.kind != "consumer" or not channel_graph.touches(edit, keep):
            continue
        node = work.graph.node[edit.node]
        width = edit.layout.channels * edit.layout.repeat
        removed = np.setdiff1d(np.arange(width), channel_graph.positions(edit.layout, keep))
        weight = editor.get(node, 1).copy()
        attrs = graph.node_attributes(node)
        groups = int(attrs.get("group", 1)) if node.op_type == "Conv" else 1
        if groups > 1:  # input channel p is column p % (C_in/g) of group p // (C_in/g)'s rows
            per_group, rows = width // groups, weight.shape[0] // groups
            for p in removed:
                weight[(p // per_group) * rows : (p // per_group + 1) * rows, p % per_group] = 0
        else:
            index = [slice(None)] * weight.ndim
            index[input_axis(node)] = removed
            weight[tuple(index)] = 0
        editor.set(node, 1, weight)
    return work
