"""ImageNet-sized models with seeded random weights, for timing factorization passes.

    from benchmarks.big_models import resnet18, vgg16   # or BIG_MODELS["resnet18"]()
    model = resnet18()   # onnx.ModelProto, input [batch, 3, 224, 224] → logits [batch, 1000]

Shapes follow torchvision's ResNet-18 and VGG-16 as exported for inference with
BatchNormalization already folded into the convolutions: plain Conv (with bias) + Relu,
residual Adds, MaxPool, GlobalAveragePool, Flatten and one Gemm to 1000 classes. VGG-16 keeps
its 13 convolutions but uses the same global-pooling head as ResNet instead of the
25088 → 4096 → 4096 → 1000 classifier (that would add 120 M parameters and only 0.8 % of the
MACs, and these models exist to time convolutions). Built in memory with onnx.helper and
numpy (opset 17, IR 8); no file is written and the same seed gives the same bytes. The
weights are He-scaled Gaussians: their singular values are flat, unlike trained weights, so
fidelity figures on these models are a worst case, not an estimate for a trained network.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from models.fixtures import GraphBuilder, _tensor  # noqa: E402

IMAGE_INPUT = ["batch", 3, 224, 224]
LOGITS = ["batch", 1000]
CLASSES = 1000


def _conv_relu(b: GraphBuilder, conv: str, relu: str, x: str, cin: int, cout: int, **attrs) -> str:
    return b.relu(relu, b.conv(conv, x, cin, cout, **attrs))


def _max_pool(b: GraphBuilder, name: str, x: str, k: int, stride: int, pad: int = 0) -> str:
    return b.op("MaxPool", name, [x], kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4)


def _basic_block(b: GraphBuilder, name: str, x: str, cin: int, cout: int, stride: int) -> str:
    y = _conv_relu(b, f"{name}.conv1", f"{name}.relu1", x, cin, cout, stride=stride)
    y = b.conv(f"{name}.conv2", y, cout, cout)
    shortcut = x
    if stride != 1 or cin != cout:
        shortcut = b.conv(f"{name}.downsample", x, cin, cout, k=1, stride=stride)
    return b.relu(f"{name}.relu2", b.op("Add", f"{name}.add", [y, shortcut]))


def resnet18(seed: int = 0) -> onnx.ModelProto:
    """ResNet-18 (torchvision layout, BN folded): 7×7/2 stem, 3×3/2 max pool, four stages of
    two basic blocks (64, 128, 256, 512 channels; 1×1/2 projection shortcuts), GAP, Gemm.
    About 1.8 G MACs and 11.7 M parameters at batch 1."""
    b = GraphBuilder(seed)
    x = _conv_relu(b, "stem.conv", "stem.relu", "input", 3, 64, k=7, stride=2)
    x = _max_pool(b, "stem.pool", x, k=3, stride=2, pad=1)
    cin = 64
    for stage, cout in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            stride = 2 if stage > 1 and block == 0 else 1
            x = _basic_block(b, f"layer{stage}.{block}", x, cin, cout, stride)
            cin = cout
    logits = b.classifier_head(x, cin, CLASSES)
    return b.model("resnet18", seed, [_tensor("input", IMAGE_INPUT)], [_tensor(logits, LOGITS)])


VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def vgg16(seed: int = 0) -> onnx.ModelProto:
    """VGG-16 convolutions (13 × 3×3 Conv + Relu in five stages, 2×2/2 max pool after each),
    then GAP and Gemm 512 → 1000. About 15.4 G MACs and 15.2 M parameters at batch 1."""
    b = GraphBuilder(seed)
    x, cin = "input", 3
    for stage, widths in enumerate(VGG16_STAGES, start=1):
        for index, cout in enumerate(widths, start=1):
            x = _conv_relu(
                b, f"stage{stage}.conv{index}", f"stage{stage}.relu{index}", x, cin, cout
            )
            cin = cout
        x = _max_pool(b, f"stage{stage}.pool", x, k=2, stride=2)
    logits = b.classifier_head(x, cin, CLASSES)
    return b.model("vgg16", seed, [_tensor("input", IMAGE_INPUT)], [_tensor(logits, LOGITS)])


BIG_MODELS: dict[str, Callable[..., onnx.ModelProto]] = {"resnet18": resnet18, "vgg16": vgg16}
