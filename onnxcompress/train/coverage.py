"""Which ONNX op types `TorchGraph` runs, answered without importing torch, so that a pass can
decide whether a model is trainable before it loads anything heavy."""

from __future__ import annotations

import onnx

from onnxcompress.errors import CompressError

# Every default-domain op type that torch_ops.py, torch_shapes.py or torch_layers.py runs (a
# test keeps this list and their handler tables equal). `Constant` is read once, at construction.
SUPPORTED_OPS = frozenset(
    {
        # elementwise and activations
        "Abs", "Add", "Affine", "And", "Ceil", "Clip", "Div", "Dropout", "Elu", "Equal", "Erf",
        "Exp", "Floor", "Gelu", "Greater", "GreaterOrEqual", "HardSigmoid", "HardSwish",
        "Identity", "ImageScaler", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax",
        "Max", "Mean", "Min", "Mul", "Neg", "Not", "Or", "Pow", "PRelu", "Reciprocal", "Relu",
        "Sigmoid", "Sign", "Softmax", "Softplus", "Sqrt", "Sub", "Sum", "Tanh", "Where",
        # shapes, indexing and types
        "Cast", "Concat", "Constant", "ConstantOfShape", "Crop", "Expand", "Flatten", "Gather",
        "Pad", "Range", "Reshape", "Shape", "Size", "Slice", "Split", "Squeeze", "Tile",
        "Transpose", "Unsqueeze",
        # reductions
        "ArgMax", "ArgMin", "ReduceL1", "ReduceL2", "ReduceMax", "ReduceMean", "ReduceMin",
        "ReduceProd", "ReduceSum", "ReduceSumSquare",
        # layers
        "AveragePool", "BatchNormalization", "Conv", "ConvTranspose", "Gemm",
        "GlobalAveragePool", "GlobalMaxPool", "InstanceNormalization", "LayerNormalization",
        "MatMul", "MaxPool",
    }
)  # fmt: skip

# Op types refused on purpose, and why (said in the error so nobody adds them by accident).
REFUSED = {
    "If": "control flow",
    "Loop": "control flow",
    "Scan": "control flow",
    "LSTM": "recurrent",
    "GRU": "recurrent",
    "RNN": "recurrent",
}

DEFAULT_DOMAINS = ("", "ai.onnx")


def op_label(node: onnx.NodeProto) -> str:
    """The op type, prefixed by its domain outside the default one ('com.microsoft.Gelu')."""
    if node.domain in DEFAULT_DOMAINS:
        return node.op_type
    return f"{node.domain}.{node.op_type}"


def supported(model: onnx.ModelProto) -> list[str]:
    """The op types of `model` that TorchGraph cannot run, sorted; empty when it converts.
    A supported op used in a form it does not run is named with that form in brackets."""
    missing = set()
    for node in model.graph.node:
        if node.domain not in DEFAULT_DOMAINS or node.op_type not in SUPPORTED_OPS:
            missing.add(op_label(node))
        elif refused_form(node):
            missing.add(f"{node.op_type} ({refused_form(node)})")
    return sorted(missing)


def refused_form(node: onnx.NodeProto) -> str | None:
    """What TorchGraph does not run of a supported op (None when it runs the node):
    outputs only training or index bookkeeping produces, pool dilations torch lacks."""
    outputs = [name for name in node.output if name]
    if node.op_type == "MaxPool" and len(outputs) > 1:
        return "with Indices output"
    if node.op_type == "BatchNormalization" and len(outputs) > 1:
        return "training mode"
    dilations = next((list(a.ints) for a in node.attribute if a.name == "dilations"), [])
    if node.op_type == "AveragePool" and any(d != 1 for d in dilations):
        return "with dilations"
    return None


class UnsupportedOps(CompressError):
    """The model (or `what` part of it) holds op types TorchGraph does not run; `op_types`
    lists every one."""

    def __init__(self, op_types: list[str], what: str = "the model"):
        self.op_types = list(op_types)
        notes = [f"{op} ({REFUSED[op]}: not supported)" for op in op_types if op in REFUSED]
        others = [op for op in op_types if op not in REFUSED]
        listed = ", ".join(others + notes)
        super().__init__(f"cannot run {what} in torch: unsupported op types {listed}")
