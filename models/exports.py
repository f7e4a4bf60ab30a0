"""Fixtures shaped like exports the project's own builders never make (issue 26): weights in
`Constant` nodes as paddle2onnx and PyTorch's exporter write them, a bidirectional LSTM, and a
monodepth2-style depth decoder. Seeded random weights, built with onnx.helper and numpy.

- `paddle_crnn`: a PP-OCR-like text recognizer (opset 11, every weight a `Constant` node): a
  MobileNetV3-like stem (hard-swish as paddle2onnx spells it, an SE block, depthwise convs),
  the feature map squeezed to a sequence, two bidirectional LSTMs, a MatMul + Add head.
- `torch_constant_norms`: a PyTorch-2.2-export-like CNN + token mixer (opset 17) whose
  BatchNormalization, InstanceNormalization and LayerNormalization take their scale and bias
  from `Constant` nodes (`/norm/Constant_output_0`), the rest from initializers.
- `depth_decoder`: monodepth2's depth decoder: five encoder skip features (graph inputs) go
  through reflect-padded 3×3 convs + ELU, nearest 2× upsampling and concatenation, with a
  sigmoid disparity at four scales. About 465 M MACs at 192×640; generate it, don't commit it.

Usage: python models/exports.py --out DIR   (writes the three models)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Run as a plain script, the repo root is not on sys.path; add it so `models` imports.
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.fixtures import GraphBuilder  # noqa: E402

# Encoder skip features of the depth decoder: (channels, downsampling) from the finest.
DEPTH_SKIPS = ((16, 2), (24, 4), (40, 8), (112, 16), (320, 32))
DEPTH_DECODER = (8, 12, 20, 40, 80)  # decoder channels at each scale, finest first


SCRIPT = "models/exports.py"


class ConstantNodeBuilder(GraphBuilder):
    """A GraphBuilder whose constants are `Constant` nodes, as paddle2onnx writes every weight."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.made: set[str] = set()  # constants made once, as the base class's initializers

    def const(self, name: str, value: np.ndarray) -> str:
        if name not in self.made:
            tensor = numpy_helper.from_array(np.asarray(value), name)
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor))
            self.made.add(name)
        return name


def _tensor(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _scalar(b: GraphBuilder, name: str, value: float) -> str:
    return b.const(name, np.array(value, dtype=np.float32))


def _hard_swish(b: GraphBuilder, name: str, x: str) -> str:
    """x * clip(x + 3, 0, 6) / 6: paddle2onnx's hard-swish below opset 14."""
    shifted = b.op("Add", f"{name}.add", [x, _scalar(b, "hswish.three", 3.0)])
    low, high = _scalar(b, "hswish.zero", 0.0), _scalar(b, "hswish.six", 6.0)
    gate = b.op("Clip", f"{name}.clip", [shifted, low, high])
    return b.op("Div", f"{name}.div", [b.op("Mul", f"{name}.mul", [x, gate]), high])


def _conv_bn(b: GraphBuilder, name: str, x: str, cin: int, cout: int, k: int, **conv) -> str:
    stride = conv.pop("stride", (1, 1))
    group = conv.pop("group", 1)
    w = b.weight(f"{name}.w_0", (cout, cin // group, k, k), cin // group * k * k)
    y = b.op(
        "Conv", f"{name}.conv", [x, w], kernel_shape=[k, k], strides=list(stride),
        pads=[k // 2] * 4, group=group, dilations=[1, 1],
    )  # fmt: skip
    return b.bn(f"{name}.bn", y, cout)


def _se(b: GraphBuilder, name: str, x: str, c: int) -> str:
    """Squeeze-and-excitation: pool, 1×1 down + Relu, 1×1 up + HardSigmoid, scale x."""
    pooled = b.op("GlobalAveragePool", f"{name}.pool", [x])
    down = b.relu(f"{name}.relu", b.conv(f"{name}.down", pooled, c, c // 4, k=1))
    up = b.conv(f"{name}.up", down, c // 4, c, k=1)
    gate = b.op("HardSigmoid", f"{name}.gate", [up], alpha=0.2, beta=0.5)
    return b.op("Mul", f"{name}.scale", [x, gate])


def _paddle_gates(b: GraphBuilder, name: str, value: np.ndarray, hidden: int) -> str:
    """A paddle weight (gates i, f, c, o) reordered to ONNX's i, o, f, c with Split + Concat,
    then given a leading direction axis: paddle2onnx's rnn mapper, so W, R and B are computed
    from `Constant` nodes, not stored."""
    parts = [f"{name}.gate{i}" for i in range(4)]
    b.nodes.append(
        helper.make_node(
            "Split", [b.const(name, value)], parts, name=f"{name}.split", axis=0, split=[hidden] * 4
        )
    )
    ordered = b.op("Concat", f"{name}.reorder", [parts[0], parts[3], parts[1], parts[2]], axis=0)
    return b.op("Unsqueeze", f"{name}.unsqueeze", [ordered], axes=[0])


def _inverted_residual(b: GraphBuilder, name: str, x: str, c: int) -> str:
    """MobileNetV3's stride-1 block without its Add: 1×1 expand, depthwise 3×3, 1×1 project."""
    y = b.relu(f"{name}.expand.relu", _conv_bn(b, f"{name}.expand", x, c, 2 * c, 1))
    y = b.relu(f"{name}.dw.relu", _conv_bn(b, f"{name}.dw", y, 2 * c, 2 * c, 3, group=2 * c))
    return _conv_bn(b, f"{name}.project", y, 2 * c, c, 1)


def _bilstm(b: GraphBuilder, name: str, x: str, cin: int, hidden: int) -> str:
    """Time-major [T, B, cin] → [T, B, 2·hidden] through one bidirectional LSTM whose weights
    and zero initial states are computed the way paddle2onnx writes them."""
    scale = float(np.sqrt(1.0 / hidden))
    per_direction = {"W": [], "R": [], "B": []}
    for d in ("fw", "bw"):
        w_ih = b.rng.normal(0.0, scale, (4 * hidden, cin)).astype(np.float32)
        w_hh = b.rng.normal(0.0, scale, (4 * hidden, hidden)).astype(np.float32)
        b_ih, b_hh = (b.rng.normal(0.0, 0.05, 4 * hidden).astype(np.float32) for _ in range(2))
        per_direction["W"].append(_paddle_gates(b, f"{name}.{d}.weight_ih", w_ih, hidden))
        per_direction["R"].append(_paddle_gates(b, f"{name}.{d}.weight_hh", w_hh, hidden))
        biases = [
            _paddle_gates(b, f"{name}.{d}.bias_{kind}", v[:, None], hidden)
            for kind, v in (("ih", b_ih), ("hh", b_hh))
        ]
        both = b.op("Concat", f"{name}.{d}.bias", biases, axis=1)  # [1, 8H, 1]
        per_direction["B"].append(b.op("Squeeze", f"{name}.{d}.bias_flat", [both], axes=[2]))
    w, r, bias = (
        b.op("Concat", f"{name}.{key}", per_direction[key], axis=0) for key in ("W", "R", "B")
    )
    state = _zero_state(b, name, x, hidden)
    # Y_h and Y_c are written but read by nothing, as paddle2onnx leaves them.
    y, last_h, last_c = (f"{name}.lstm.{out}" for out in ("Y", "Y_h", "Y_c"))
    b.nodes.append(
        helper.make_node(
            "LSTM",
            [x, w, r, bias, "", state, state],
            [y, last_h, last_c],
            name=f"{name}.lstm",
            direction="bidirectional",
            hidden_size=hidden,
        )
    )
    y = b.op("Transpose", f"{name}.transpose", [y], perm=[0, 2, 1, 3])  # [T, B, 2, hidden]
    merge = b.const("lstm.merge_shape", np.array([0, 0, -1], dtype=np.int64))
    return b.op("Reshape", f"{name}.merge", [y, merge])


def _zero_state(b: GraphBuilder, name: str, x: str, hidden: int) -> str:
    """Zeros [2, batch, hidden], the batch read from x at run time (paddle's
    fill_constant_batch_size_like)."""
    shape = b.op("Shape", f"{name}.shape", [x])
    start, end = (
        b.const("lstm.batch_start", np.array([1])),
        b.const("lstm.batch_end", np.array([2])),
    )
    batch = b.op("Slice", f"{name}.batch", [shape, start, end])
    directions = b.const("lstm.directions", np.array([2]))
    size = b.const(f"lstm.hidden_{hidden}", np.array([hidden]))
    dims = b.op("Concat", f"{name}.state_shape", [directions, batch, size], axis=0)
    zero = numpy_helper.from_array(np.zeros(1, dtype=np.float32))
    return b.op("ConstantOfShape", f"{name}.state", [dims], value=zero)


def paddle_crnn(seed: int = 0) -> onnx.ModelProto:
    """PP-OCR-like CRNN text recognizer, weights in `Constant` nodes (paddle2onnx, opset 11):
    input [batch, 3, 32, width], output per-step class probabilities [batch, width / 4, 37]."""
    b = ConstantNodeBuilder(seed)
    x = _hard_swish(b, "stem.hswish", _conv_bn(b, "stem", "x", 3, 16, 3, stride=(2, 2)))
    x = b.relu("block1.relu", _conv_bn(b, "block1.dw", x, 16, 16, 3, stride=(2, 1), group=16))
    x = _conv_bn(b, "block1.pw", _se(b, "block1.se", x, 16), 16, 24, 1)
    x = _hard_swish(b, "block2.hswish", _conv_bn(b, "block2.expand", x, 24, 48, 1))
    x = _conv_bn(b, "block2.dw", x, 48, 48, 3, stride=(2, 1), group=48)
    x = _conv_bn(b, "block2.pw", _hard_swish(b, "block2.dw.hswish", x), 48, 32, 1)
    x = b.op("Add", "block3.add", [x, _inverted_residual(b, "block3", x, 32)])
    x = _se(b, "block4.se", _conv_bn(b, "block4.dw", x, 32, 32, 3, stride=(2, 1), group=32), 32)
    x = _hard_swish(b, "block4.hswish", _conv_bn(b, "block4.pw", x, 32, 48, 1))
    # [B, 48, 1, width / 4]
    x = b.op("MaxPool", "neck.pool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.op("Squeeze", "neck.squeeze", [x], axes=[2])
    x = b.op("Transpose", "neck.time_major", [x], perm=[2, 0, 1])  # [T, B, C]
    x = _bilstm(b, "neck.lstm0", x, 48, 24)
    x = _bilstm(b, "neck.lstm1", x, 48, 24)
    x = b.op("Transpose", "neck.batch_major", [x], perm=[1, 0, 2])
    weight = b.weight("head.fc.w_0", (48, 37), 48)
    y = b.op("MatMul", "head.fc", [x, weight])
    y = b.op("Add", "head.fc.bias_add", [y, b.normal("head.fc.b_0", (37,), 0.05)])
    probs = b.op("Softmax", "head.softmax", [y], out="softmax_0.tmp_0", axis=2)
    inputs = [_tensor("x", ["batch", 3, 32, "width"])]  # paddle2onnx: dynamic batch and width
    outputs = [_tensor(probs, ["batch", "steps", 37])]
    return b.model("paddle_crnn", seed, inputs, outputs, opset=11, script=SCRIPT)


class TorchExportBuilder(GraphBuilder):
    """Weights as initializers, but normalisation scale/bias as `Constant` nodes named the way
    torch.onnx (TorchScript, torch 2.2) names them."""

    def node_constant(self, scope: str, index: int, value: np.ndarray) -> str:
        name = f"/{scope}/Constant_{index}_output_0" if index else f"/{scope}/Constant_output_0"
        tensor = numpy_helper.from_array(value, name)
        node_name = name.removesuffix("_output_0")
        self.nodes.append(helper.make_node("Constant", [], [name], name=node_name, value=tensor))
        return name

    def norm_params(self, scope: str, c: int) -> tuple[str, str]:
        scale = self.node_constant(scope, 0, self.rng.uniform(0.8, 1.2, c).astype(np.float32))
        return scale, self.node_constant(scope, 1, self.rng.normal(0.0, 0.05, c).astype(np.float32))


def torch_constant_norms(seed: int = 0) -> onnx.ModelProto:
    """Conv → BatchNormalization → Relu → Conv → InstanceNormalization → Relu, flattened to
    tokens, LayerNormalization, MatMul, GAP-like mean, Gemm; every normalisation's scale and
    bias a `Constant` node. Input [batch, 3, 16, 16], output [batch, 10]."""
    b = TorchExportBuilder(seed)
    x = b.conv("/conv1/Conv", "input", 3, 16)
    scale, bias = b.norm_params("bn1", 16)
    variance = b.rng.uniform(0.5, 1.5, 16).astype(np.float32)
    stats = [b.normal("bn1.running_mean", (16,), 0.1), b.const("bn1.running_var", variance)]
    x = b.op("BatchNormalization", "/bn1/BatchNormalization", [x, scale, bias, *stats])
    x = b.relu("/relu1/Relu", x)
    x = b.conv("/conv2/Conv", x, 16, 16, stride=2)
    scale, bias = b.norm_params("in2", 16)
    x = b.op("InstanceNormalization", "/in2/InstanceNormalization", [x, scale, bias])
    x = b.relu("/relu2/Relu", x)
    x = _group_norm(b, "gn", x, 16, groups=4)
    tokens = b.const("tokens_shape", np.array([0, 16, 64], dtype=np.int64))
    x = b.op("Reshape", "/Reshape", [x, tokens])
    x = b.op("Transpose", "/Transpose", [x], perm=[0, 2, 1])  # [B, 64 tokens, 16]
    scale, bias = b.norm_params("ln", 16)
    x = b.op("LayerNormalization", "/ln/LayerNormalization", [x, scale, bias], axis=-1)
    x = b.op("MatMul", "/mix/MatMul", [x, b.weight("mix.weight", (16, 32), 16)])
    x = b.op("ReduceMean", "/ReduceMean", [x], axes=[1], keepdims=0)
    logits = b.gemm("/fc/Gemm", x, 32, 10, out="logits")
    inputs = [_tensor("input", ["batch", 3, 16, 16])]
    outputs = [_tensor(logits, ["batch", 10])]
    return b.model("torch_constant_norms", seed, inputs, outputs, script=SCRIPT)


def _group_norm(b: TorchExportBuilder, scope: str, x: str, c: int, groups: int) -> str:
    """GroupNorm as torch.onnx writes it: reshape to [N, groups, -1], InstanceNormalization
    with `Constant` ones and zeros, reshape back, then the affine Mul and Add."""
    grouped = b.node_constant(scope, 0, np.array([0, groups, -1]))
    y = b.op("Reshape", f"/{scope}/Reshape", [x, grouped])
    ones = b.node_constant(scope, 1, np.ones(groups, np.float32))
    zeros = b.node_constant(scope, 2, np.zeros(groups, np.float32))
    y = b.op("InstanceNormalization", f"/{scope}/InstanceNormalization", [y, ones, zeros])
    shape = b.op("Shape", f"/{scope}/Shape", [x])
    y = b.op("Reshape", f"/{scope}/Reshape_1", [y, shape])
    weight = b.const(f"{scope}.weight", b.rng.uniform(0.8, 1.2, (c, 1, 1)).astype(np.float32))
    bias = b.normal(f"{scope}.bias", (c, 1, 1), 0.05)
    return b.op("Add", f"/{scope}/Add", [b.op("Mul", f"/{scope}/Mul", [y, weight]), bias])


def _reflect_conv(b: GraphBuilder, name: str, x: str, cin: int, cout: int, act: bool) -> str:
    """monodepth2's Conv3x3: reflection pad 1, 3×3 conv without pads; ELU after (ConvBlock)."""
    pads = b.const("reflect.pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], dtype=np.int64))
    padded = b.op("Pad", f"{name}.pad", [x, pads], mode="reflect")
    w = b.weight(f"{name}.weight", (cout, cin, 3, 3), cin * 9)
    bias = b.normal(f"{name}.bias", (cout,), 0.05)
    y = b.op("Conv", f"{name}.conv", [padded, w, bias], kernel_shape=[3, 3])
    return b.op("Elu", f"{name}.elu", [y]) if act else y


def depth_decoder(seed: int = 0, height: int = 192, width: int = 640) -> onnx.ModelProto:
    """monodepth2's DepthDecoder over encoder skips `DEPTH_SKIPS` (graph inputs `features.i`),
    decoder channels `DEPTH_DECODER`; outputs `disp.0`..`disp.3` (sigmoid, 1 channel)."""
    b = GraphBuilder(seed)
    scales = b.const("upsample.scales", np.array([1, 1, 2, 2], dtype=np.float32))
    inputs = [
        _tensor(f"features.{i}", ["batch", c, height // down, width // down])
        for i, (c, down) in enumerate(DEPTH_SKIPS)
    ]
    x, cin, outputs = "features.4", DEPTH_SKIPS[-1][0], []
    for i in range(4, -1, -1):
        cout = DEPTH_DECODER[i]
        x = _reflect_conv(b, f"upconv.{i}.0", x, cin, cout, act=True)
        x = b.op("Resize", f"upsample.{i}", [x, "", scales], mode="nearest")
        cin = cout
        if i > 0:
            x = b.op("Concat", f"skip.{i}", [x, f"features.{i - 1}"], axis=1)
            cin += DEPTH_SKIPS[i - 1][0]
        x = _reflect_conv(b, f"upconv.{i}.1", x, cin, cout, act=True)
        cin = cout
        if i < 4:
            disp = _reflect_conv(b, f"dispconv.{i}", x, cout, 1, act=False)
            name = f"disp.{i}"
            outputs.append(_tensor(b.op("Sigmoid", name, [disp]), ["batch", 1, None, None]))
    outputs = [_tensor(o.name, _disp_dims(o.name, height, width)) for o in outputs]
    return b.model(f"depth_decoder_{height}x{width}", seed, inputs, outputs, script=SCRIPT)


def _disp_dims(name: str, height: int, width: int) -> list:
    scale = 2 ** int(name.rsplit(".", 1)[1])
    return ["batch", 1, height // scale, width // scale]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the export-shaped fixtures to a folder.")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--depth-size", default="192x640", help="depth decoder input HxW")
    args = parser.parse_args(argv)
    height, width = (int(v) for v in args.depth_size.split("x"))
    args.out.mkdir(parents=True, exist_ok=True)
    built = {
        "paddle_crnn": paddle_crnn(),
        "torch_constant_norms": torch_constant_norms(),
        "depth_decoder": depth_decoder(height=height, width=width),
    }
    for name, model in built.items():
        onnx.save(model, args.out / f"{name}.onnx")
        print(args.out / f"{name}.onnx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
