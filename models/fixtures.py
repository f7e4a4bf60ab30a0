"""Small seeded fixture models built with onnx.helper and numpy (opset 17, IR 8, float32).

Each builder returns an `onnx.ModelProto` that passes the full ONNX check and runs in
onnxruntime; the same seed always gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
PRODUCER = "onnxcompress-fixtures"


class GraphBuilder:
    """Collects nodes and initializers; every op helper returns the name of its output tensor
    (shared by the fixtures here and the MiniLM builder)."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}

    def const(self, name: str, value: np.ndarray) -> str:
        # Shared constants (Clip bounds, reshape targets) are stored once.
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.asarray(value), name)
        return name

    def normal(self, name: str, shape: tuple[int, ...], std: float) -> str:
        return self.const(name, self.rng.normal(0.0, std, shape).astype(np.float32))

    def weight(self, name: str, shape: tuple[int, ...], fan_in: int) -> str:
        """He-scaled weight, so activations stay O(1) through Relu stacks."""
        return self.normal(name, shape, float(np.sqrt(2.0 / fan_in)))

    def op(
        self, op_type: str, name: str, inputs: list[str], out: str | None = None, **attrs
    ) -> str:
        out = out or name
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=name, **attrs))
        return out

    def conv(
        self,
        name: str,
        x: str,
        cin: int,
        cout: int,
        k: int = 3,
        stride: int = 1,
        group: int = 1,
        bias: bool = True,
    ) -> str:
        fan_in = cin // group * k * k
        inputs = [x, self.weight(f"{name}.weight", (cout, cin // group, k, k), fan_in)]
        if bias:
            inputs.append(self.normal(f"{name}.bias", (cout,), 0.05))
        return self.op(
            "Conv",
            name,
            inputs,
            kernel_shape=[k, k],
            strides=[stride, stride],
            pads=[k // 2] * 4,
            group=group,
        )

    def bn(self, name: str, x: str, c: int) -> str:
        """BatchNormalization with non-trivial statistics, so folding it changes the weights."""
        r = self.rng
        stats = {
            "scale": r.uniform(0.5, 1.5, c),
            "bias": r.normal(0.0, 0.1, c),
            "mean": r.normal(0.0, 0.1, c),
            "var": r.uniform(0.5, 1.5, c),
        }
        names = [self.const(f"{name}.{key}", v.astype(np.float32)) for key, v in stats.items()]
        return self.op("BatchNormalization", name, [x, *names], epsilon=1e-5)

    def relu(self, name: str, x: str) -> str:
        return self.op("Relu", name, [x])

    def relu6(self, name: str, x: str) -> str:
        low = self.const("relu6.min", np.array(0.0, dtype=np.float32))
        high = self.const("relu6.max", np.array(6.0, dtype=np.float32))
        return self.op("Clip", name, [x, low, high])

    def gemm(
        self,
        name: str,
        x: str,
        cin: int,
        cout: int,
        trans_b: bool = True,
        alpha: float = 1.0,
        beta: float = 1.0,
        out: str | None = None,
    ) -> str:
        shape = (cout, cin) if trans_b else (cin, cout)
        # Divide by alpha so that the scaled product keeps the He variance.
        w = self.normal(f"{name}.weight", shape, float(np.sqrt(2.0 / cin)) / alpha)
        b = self.normal(f"{name}.bias", (cout,), 0.05 / beta)
        attrs = {"transB": 1} if trans_b else {}
        if alpha != 1.0:
            attrs["alpha"] = alpha
        if beta != 1.0:
            attrs["beta"] = beta
        return self.op("Gemm", name, [x, w, b], out=out, **attrs)

    def linear(self, name: str, x: str, cin: int, cout: int, out: str | None = None) -> str:
        """MatMul with a constant [cin, cout] weight, then Add of a bias."""
        y = self.op("MatMul", name, [x, self.weight(f"{name}.weight", (cin, cout), cin)])
        bias = self.normal(f"{name}.bias", (cout,), 0.05)
        return self.op("Add", f"{name}.bias_add", [y, bias], out=out)

    def classifier_head(self, x: str, c: int, classes: int = 10) -> str:
        pooled = self.op("GlobalAveragePool", "head.pool", [x])
        flat = self.op("Flatten", "head.flatten", [pooled], axis=1)
        return self.gemm("head.fc", flat, c, classes, out="logits")

    def model(
        self,
        name: str,
        seed: int,
        inputs: list,
        outputs: list,
        opset: int = OPSET,
        script: str = "models/fixtures.py",
    ) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, name, inputs, outputs, initializer=list(self.initializers.values())
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", opset)],
            producer_name=PRODUCER,
            doc_string=f"onnxcompress fixture {name} (seed {seed}), built by {script}",
        )
        model.ir_version = IR_VERSION
        return model


def _tensor(name: str, dims: list) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


IMAGE_INPUT = ["batch", 3, 32, 32]
LOGITS = ["batch", 10]


def vgg_style(seed: int = 0) -> onnx.ModelProto:
    """Plain Conv3x3+Relu stack with max pooling, global pooling and a Gemm classifier."""
    b = GraphBuilder(seed)
    x = "input"
    stages = [[(3, 16), (16, 16)], [(16, 32), (32, 32)], [(32, 64)]]
    for stage, convs in enumerate(stages, start=1):
        for index, (cin, cout) in enumerate(convs):
            x = b.relu(
                f"stage{stage}.relu{index}", b.conv(f"stage{stage}.conv{index}", x, cin, cout)
            )
        x = b.op("MaxPool", f"stage{stage}.pool", [x], kernel_shape=[2, 2], strides=[2, 2])
    logits = b.classifier_head(x, 64)
    return b.model("vgg_style", seed, [_tensor("input", IMAGE_INPUT)], [_tensor(logits, LOGITS)])


def _basic_block(b: GraphBuilder, name: str, x: str, cin: int, cout: int, stride: int) -> str:
    y = b.conv(f"{name}.conv1", x, cin, cout, stride=stride, bias=False)
    y = b.relu(f"{name}.relu1", b.bn(f"{name}.bn1", y, cout))
    y = b.bn(f"{name}.bn2", b.conv(f"{name}.conv2", y, cout, cout, bias=False), cout)
    shortcut = x
    if stride != 1 or cin != cout:
        shortcut = b.conv(f"{name}.shortcut.conv", x, cin, cout, k=1, stride=stride, bias=False)
        shortcut = b.bn(f"{name}.shortcut.bn", shortcut, cout)
    return b.relu(f"{name}.relu2", b.op("Add", f"{name}.add", [y, shortcut]))


def resnet_style(seed: int = 0) -> onnx.ModelProto:
    """CIFAR ResNet-like: Conv+BN+Relu stem, three basic blocks (two with stride 2 and a
    1x1 Conv+BN projection shortcut), global pooling and a Gemm classifier."""
    b = GraphBuilder(seed)
    x = b.relu("stem.relu", b.bn("stem.bn", b.conv("stem.conv", "input", 3, 16, bias=False), 16))
    x = _basic_block(b, "stage1.block0", x, 16, 16, stride=1)
    x = _basic_block(b, "stage2.block0", x, 16, 32, stride=2)
    x = _basic_block(b, "stage3.block0", x, 32, 64, stride=2)
    logits = b.classifier_head(x, 64)
    return b.model("resnet_style", seed, [_tensor("input", IMAGE_INPUT)], [_tensor(logits, LOGITS)])


def _conv_bn(b: GraphBuilder, name: str, x: str, cin: int, cout: int, act: bool, **conv) -> str:
    y = b.bn(f"{name}.bn", b.conv(f"{name}.conv", x, cin, cout, bias=False, **conv), cout)
    return b.relu6(f"{name}.relu6", y) if act else y


def mobilenet_style(seed: int = 0) -> onnx.ModelProto:
    """MobileNet-like: stem, a depthwise-separable block, an inverted residual with Add,
    a 1x1 expansion, global pooling and a Gemm classifier. Relu6 is Clip(0, 6)."""
    b = GraphBuilder(seed)
    x = _conv_bn(b, "stem", "input", 3, 16, act=True, stride=2)
    x = _conv_bn(b, "block1.depthwise", x, 16, 16, act=True, group=16)
    x = _conv_bn(b, "block1.pointwise", x, 16, 24, act=False, k=1)
    y = _conv_bn(b, "block2.expand", x, 24, 72, act=True, k=1)
    y = _conv_bn(b, "block2.depthwise", y, 72, 72, act=True, group=72)
    y = _conv_bn(b, "block2.project", y, 72, 24, act=False, k=1)
    x = b.op("Add", "block2.add", [x, y])
    x = _conv_bn(b, "head.expand", x, 24, 64, act=True, k=1)
    logits = b.classifier_head(x, 64)
    inputs = [_tensor("input", IMAGE_INPUT)]
    return b.model("mobilenet_style", seed, inputs, [_tensor(logits, LOGITS)])


def mlp(seed: int = 0) -> onnx.ModelProto:
    """Three Gemm layers 64 -> 128 -> 64 -> 10: transB=1, then transB=0 with alpha/beta != 1."""
    b = GraphBuilder(seed)
    x = b.relu("fc1.relu", b.gemm("fc1", "input", 64, 128, trans_b=True))
    x = b.relu("fc2.relu", b.gemm("fc2", x, 128, 64, trans_b=False, alpha=0.5, beta=2.0))
    logits = b.gemm("fc3", x, 64, 10, trans_b=True, out="logits")
    return b.model("mlp", seed, [_tensor("input", ["batch", 64])], [_tensor(logits, LOGITS)])


def transformer_block(seed: int = 0) -> onnx.ModelProto:
    """One post-norm encoder block: 2-head self-attention with residual and LayerNormalization,
    then a Relu FFN (64 -> 128 -> 64) with residual and LayerNormalization."""
    b = GraphBuilder(seed)
    seq, dim, heads = 16, 64, 2
    head_dim = dim // heads
    split = b.const("attn.split_shape", np.array([0, 0, heads, head_dim], dtype=np.int64))
    merge = b.const("attn.merge_shape", np.array([0, 0, dim], dtype=np.int64))

    def heads_of(kind: str, perm: list[int]) -> str:
        y = b.linear(f"attn.{kind}_proj", "tokens", dim, dim)
        y = b.op("Reshape", f"attn.{kind}_split", [y, split])
        return b.op("Transpose", f"attn.{kind}_heads", [y], perm=perm)

    q = heads_of("q", [0, 2, 1, 3])  # [batch, heads, seq, head_dim]
    k = heads_of("k", [0, 2, 3, 1])  # [batch, heads, head_dim, seq]: K transposed
    v = heads_of("v", [0, 2, 1, 3])
    scores = b.op("MatMul", "attn.scores", [q, k])
    scale = b.const("attn.scale", np.array(np.sqrt(head_dim), dtype=np.float32))
    scores = b.op("Div", "attn.scaled", [scores, scale])
    probs = b.op("Softmax", "attn.softmax", [scores], axis=-1)
    ctx = b.op("MatMul", "attn.context", [probs, v])
    ctx = b.op("Transpose", "attn.context_t", [ctx], perm=[0, 2, 1, 3])
    ctx = b.op("Reshape", "attn.merge", [ctx, merge])
    attn = b.linear("attn.out_proj", ctx, dim, dim)
    x = b.op("Add", "attn.residual", ["tokens", attn])
    x = _layer_norm(b, "norm1", x, dim)
    h = b.relu("ffn.relu", b.linear("ffn.fc1", x, dim, 2 * dim))
    h = b.linear("ffn.fc2", h, 2 * dim, dim)
    x = b.op("Add", "ffn.residual", [x, h])
    hidden = _layer_norm(b, "norm2", x, dim, out="hidden")
    shape = ["batch", seq, dim]
    return b.model("transformer_block", seed, [_tensor("tokens", shape)], [_tensor(hidden, shape)])


def _layer_norm(b: GraphBuilder, name: str, x: str, dim: int, out: str | None = None) -> str:
    scale = b.const(f"{name}.scale", b.rng.uniform(0.8, 1.2, dim).astype(np.float32))
    bias = b.normal(f"{name}.bias", (dim,), 0.05)
    return b.op("LayerNormalization", name, [x, scale, bias], out=out, axis=-1, epsilon=1e-5)


def half_precision(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float16 copy of a float32 fixture, as a float16 export looks: every float weight and
    graph input/output in float16 (for the `upcast` pass; not written to models/)."""
    half = onnx.ModelProto()
    half.CopyFrom(model)
    g = half.graph
    for init in g.initializer:
        if init.data_type == TensorProto.FLOAT:
            value = numpy_helper.to_array(init).astype(np.float16)
            init.CopyFrom(numpy_helper.from_array(value, init.name))
    for info in [*g.input, *g.output]:
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            info.type.tensor_type.elem_type = TensorProto.FLOAT16
    del g.value_info[:]
    return half


FIXTURES: dict[str, Callable[..., onnx.ModelProto]] = {
    "vgg_style": vgg_style,
    "resnet_style": resnet_style,
    "mobilenet_style": mobilenet_style,
    "mlp": mlp,
    "transformer_block": transformer_block,
}
