"""Torch versions of the ONNX elementwise ops and activations TorchGraph runs, one function
per op in `OPS` (shapes, indexing and reductions are in torch_shapes.py; the layers — Conv,
pools, norms, Gemm — in torch_layers.py), and the `Call` every such function takes.

Each function takes a `Call` (the node's input tensors, attributes and the model's opset) and
returns a tensor or a tuple of tensors, one per node output."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from onnx import TensorProto

# float16 and bfloat16 graphs compute in float32 (write_back stores the original type).
DTYPES = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.FLOAT16: torch.float32,
    TensorProto.BFLOAT16: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.INT64: torch.int64,
    TensorProto.INT32: torch.int32,
    TensorProto.INT16: torch.int16,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool,
}


@dataclass
class Call:
    """One node's run: input tensors (None for an omitted optional input), attributes, the
    model's default-domain opset (some ops changed meaning between opsets) and output count."""

    inputs: list[torch.Tensor | None]
    attrs: dict[str, Any]
    opset: int
    n_outputs: int = 1

    def input(self, index: int) -> torch.Tensor | None:
        return self.inputs[index] if index < len(self.inputs) else None

    def ints(self, index: int) -> list[int] | None:
        """An integer input (shape, axes, indices) as a list, None when omitted."""
        value = self.input(index)
        return None if value is None else [int(v) for v in value.reshape(-1).tolist()]

    def attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def attr_or_input(self, name: str, index: int) -> list[int] | None:
        """Axes and the like: an attribute in older opsets, an input in newer ones."""
        value = self.attrs.get(name)
        return list(value) if value is not None else self.ints(index)


Op = Callable[[Call], Any]


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Op:
    return lambda call: fn(call.inputs[0])


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Op:
    return lambda call: fn(call.inputs[0], call.inputs[1])


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Op:
    return lambda call: functools.reduce(fn, call.inputs)


def div(call: Call) -> torch.Tensor:
    a, b = call.inputs
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")  # integer Div truncates, as in C


def pow_(call: Call) -> torch.Tensor:
    base, exponent = call.inputs
    return torch.pow(base, exponent).to(base.dtype)  # the result has the base's type


def mean(call: Call) -> torch.Tensor:
    return functools.reduce(torch.add, call.inputs) / len(call.inputs)


def clip(call: Call) -> torch.Tensor:
    x = call.inputs[0]
    if call.opset < 11:
        low, high = call.attr("min"), call.attr("max")
    else:
        low, high = call.input(1), call.input(2)
    return x if low is None and high is None else torch.clamp(x, low, high)


def hard_sigmoid(call: Call) -> torch.Tensor:
    alpha, beta = call.attr("alpha", 0.2), call.attr("beta", 0.5)
    return torch.clamp(call.inputs[0] * alpha + beta, 0.0, 1.0)


def prelu(call: Call) -> torch.Tensor:
    x, slope = call.inputs
    return torch.where(x >= 0, x, x * slope)


def gelu(call: Call) -> torch.Tensor:
    return F.gelu(call.inputs[0], approximate=call.attr("approximate", "none"))


def _softmax_like(fn: Callable[..., torch.Tensor]) -> Op:
    def run(call: Call) -> torch.Tensor:
        x = call.inputs[0]
        if call.opset >= 13:
            return fn(x, dim=call.attr("axis", -1))
        # Before opset 13 the op normalises over all dims from `axis` on, flattened.
        axis = call.attr("axis", 1) % x.dim()
        flat = x.reshape(math.prod(x.shape[:axis]), -1)
        return fn(flat, dim=1).reshape(x.shape)

    return run


def dropout(call: Call) -> Any:
    x = call.inputs[0]  # inference: no dropout; the mask, if asked for, keeps everything
    return (x, torch.ones_like(x, dtype=torch.bool)) if call.n_outputs > 1 else x


def image_scaler(call: Call) -> torch.Tensor:
    x = call.inputs[0]
    bias = torch.tensor(call.attr("bias"), dtype=x.dtype, device=x.device)
    bias = bias.reshape(1, -1, *[1] * (x.dim() - 2))
    return x * call.attr("scale", 1.0) + bias


def affine(call: Call) -> torch.Tensor:
    return call.inputs[0] * call.attr("alpha", 1.0) + call.attr("beta", 0.0)


OPS: dict[str, Op] = {
    "Abs": _unary(torch.abs),
    "Add": _binary(torch.add),
    "Affine": affine,
    "And": _binary(torch.logical_and),
    "Ceil": _unary(torch.ceil),
    "Clip": clip,
    "Div": div,
    "Dropout": dropout,
    "Elu": lambda call: F.elu(call.inputs[0], alpha=call.attr("alpha", 1.0)),
    "Equal": _binary(torch.eq),
    "Erf": _unary(torch.erf),
    "Exp": _unary(torch.exp),
    "Floor": _unary(torch.floor),
    "Gelu": gelu,
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "HardSigmoid": hard_sigmoid,
    "HardSwish": _unary(F.hardswish),
    "Identity": _unary(lambda x: x),
    "ImageScaler": image_scaler,
    "LeakyRelu": lambda call: F.leaky_relu(call.inputs[0], call.attr("alpha", 0.01)),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Log": _unary(torch.log),
    "LogSoftmax": _softmax_like(torch.log_softmax),
    "Max": _variadic(torch.maximum),
    "Mean": mean,
    "Min": _variadic(torch.minimum),
    "Mul": _binary(torch.mul),
    "Neg": _unary(torch.neg),
    "Not": _unary(torch.logical_not),
    "Or": _binary(torch.logical_or),
    "Pow": pow_,
    "PRelu": prelu,
    "Reciprocal": _unary(torch.reciprocal),
    "Relu": _unary(torch.relu),
    "Sigmoid": _unary(torch.sigmoid),
    "Sign": _unary(torch.sign),
    "Softmax": _softmax_like(torch.softmax),
    "Softplus": _unary(F.softplus),
    "Sqrt": _unary(torch.sqrt),
    "Sub": _binary(torch.sub),
    "Sum": _variadic(torch.add),
    "Tanh": _unary(torch.tanh),
    "Where": lambda call: torch.where(*call.inputs),
}
