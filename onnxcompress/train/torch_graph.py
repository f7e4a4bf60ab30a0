"""An ONNX graph run as a trainable torch module: `TorchGraph(model)` interprets the graph
node by node with torch ops; its float weights are `nn.Parameter`s that `write_back` puts
into the same graph again, by initializer (or Constant) name.

float16 and bfloat16 graphs compute in float32: inputs, weights and outputs are float32 in
torch, and `write_back` stores each weight in its original type."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from onnxcompress.graph import constant_tensors, default_opset
from onnxcompress.train.coverage import UnsupportedOps, supported
from onnxcompress.train.tensors import (
    Trainable,
    stored_weights,
    topological_nodes,
    trainable_names,
)
from onnxcompress.train.torch_layers import LAYERS
from onnxcompress.train.torch_ops import OPS, Call, Op
from onnxcompress.train.torch_shapes import SHAPE_OPS

HANDLERS: dict[str, Op] = {**OPS, **SHAPE_OPS, **LAYERS}
# Computed in float32: the half types have few CPU kernels and lose precision in training.
HALF_TYPES = (np.float16,)


@dataclass
class Step:
    """One node to run: its handler, tensor names and parsed attributes, and the values no
    later step reads (dropped after it, so activations do not pile up)."""

    op_type: str
    run: Op
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Any]
    last_reads: list[str]


class TorchGraph(torch.nn.Module):
    """The ONNX `model` as a torch module.

    Every float tensor of one element or more held in an initializer or a Constant node's
    `value` becomes an `nn.Parameter` in `self.weights` (all other constants are buffers);
    those named by `trainable` require gradients, the others are frozen. `trainable` is None
    for `tensors.default_trainable` (layer weights, biases, norm scales), a collection of
    tensor names, or a predicate on the name. `names` maps each parameter's name in
    `named_parameters()` to its tensor's name in the graph.

    `forward` takes the graph's inputs (positionally in graph order, or by name) and returns
    its output, or a tuple of them when the graph has several. It computes what the ONNX
    graph computes in either module mode: BatchNormalization uses the graph's statistics and
    Dropout passes everything. Raises `UnsupportedOps` (naming every op type it cannot run)
    at construction.
    """

    def __init__(self, model: onnx.ModelProto, trainable: Trainable = None):
        super().__init__()
        missing = supported(model)
        if missing:
            raise UnsupportedOps(missing)
        self.opset = default_opset(model)
        self.weights = torch.nn.ParameterDict()
        self.names: dict[str, str] = {}
        self._tensor_slots: dict[str, tuple[str, str]] = {}  # graph name -> (kind, key)
        self._hold_constants(model, trainable_names(model, trainable))
        constants = set(constant_tensors(model))  # IR 3 lists initializers as inputs too
        self.input_names = [i.name for i in model.graph.input if i.name not in constants]
        self.output_names = [o.name for o in model.graph.output]
        self._steps = _steps(model, set(self.output_names))

    def parameter(self, tensor_name: str) -> torch.nn.Parameter:
        """The parameter holding the graph tensor `tensor_name`."""
        kind, key = self._tensor_slots.get(tensor_name, ("", ""))
        if kind != "weight":
            raise KeyError(f"{tensor_name!r} is not a float weight of the graph")
        return self.weights[key]

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, ...]:
        values = self._feeds(args, kwargs)
        for name, (kind, key) in self._tensor_slots.items():
            values[name] = self.weights[key] if kind == "weight" else getattr(self, key)
        for step in self._steps:
            inputs = [values[name] if name else None for name in step.inputs]
            call = Call(inputs, step.attrs, self.opset, len(step.outputs))
            result = step.run(call)
            results = result if isinstance(result, tuple | list) else (result,)
            for name, value in zip(step.outputs, results, strict=False):
                if name:
                    values[name] = value
            for name in step.last_reads:
                values.pop(name, None)
        outputs = tuple(values[name] for name in self.output_names)
        return outputs[0] if len(outputs) == 1 else outputs

    def _hold_constants(self, model: onnx.ModelProto, trainable: set[str]) -> None:
        weights = stored_weights(model)
        # Tensors nothing reads (a pass's leftovers before cleanup) are not held.
        read = {name for node in model.graph.node for name in node.input}
        read |= {output.name for output in model.graph.output}
        used_keys: set[str] = set()
        for name, array in constant_tensors(model).items():
            if name not in read:
                continue
            key = _unique_key(name, used_keys)
            value = torch.from_numpy(_computed(array))
            if name in weights:
                self.weights[key] = torch.nn.Parameter(value, requires_grad=name in trainable)
                self.names[f"weights.{key}"] = name
                self._tensor_slots[name] = ("weight", key)
            else:
                self.register_buffer(f"const_{key}", value)
                self._tensor_slots[name] = ("buffer", f"const_{key}")

    def _feeds(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        if len(args) > len(self.input_names):
            raise TypeError(f"the graph takes {len(self.input_names)} inputs, got {len(args)}")
        feeds = dict(zip(self.input_names, args, strict=False)) | kwargs
        missing = [name for name in self.input_names if name not in feeds]
        unknown = sorted(set(feeds) - set(self.input_names))
        if missing or unknown:
            raise TypeError(f"graph inputs missing: {missing}; not graph inputs: {unknown}")
        return {name: _as_computed(value) for name, value in feeds.items()}


def _computed(array: np.ndarray) -> np.ndarray:
    """A constant as torch computes it: half types as float32, always a writable copy."""
    if array.dtype in HALF_TYPES or array.dtype.name == "bfloat16":
        return array.astype(np.float32)
    return np.array(array, copy=True)


def _as_computed(value: Any) -> torch.Tensor:
    tensor = torch.as_tensor(value)
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _unique_key(name: str, used: set[str]) -> str:
    """`name` as a parameter name (no dots, a word), unique among `used` (which it joins)."""
    base = re.sub(r"\W", "_", name) or "tensor"
    key, counter = base, 1
    while key in used:
        key, counter = f"{base}_{counter}", counter + 1
    used.add(key)
    return key


def _steps(model: onnx.ModelProto, outputs: set[str]) -> list[Step]:
    nodes = topological_nodes(model)
    last_reader = {name: i for i, node in enumerate(nodes) for name in node.input if name}
    steps = []
    for i, node in enumerate(nodes):
        reads = {name for name in node.input if name and last_reader[name] == i}
        steps.append(
            Step(
                node.op_type,
                HANDLERS[node.op_type],
                list(node.input),
                list(node.output),
                {attr.name: _attribute(attr) for attr in node.attribute},
                sorted(reads - outputs),
            )
        )
    return steps


def _attribute(attr: onnx.AttributeProto) -> Any:
    """An attribute's value with strings decoded and tensors as numpy arrays."""
    value = helper.get_attribute_value(attr)
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, onnx.TensorProto):
        return numpy_helper.to_array(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode() for v in value]
    return value
