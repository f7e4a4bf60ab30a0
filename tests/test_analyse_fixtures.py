"""analyse on the fixture models: every node's MACs and the params, checked against figures
worked out by hand from the architectures in models/fixtures.py.

Spatial sizes are derived by hand from the 32×32 input: a 3×3 conv with pad 1 keeps the size at
stride 1 and halves it at stride 2 (floor((32 + 2 - 3) / 2) + 1 = 16); a 1×1 conv with pad 0 and
stride 2 also halves it (floor((32 - 1) / 2) + 1 = 16); MaxPool 2×2 stride 2 halves it.

Conventions (onnxcompress/analyse.py): Conv = output elements × (C_in / groups)·kh·kw, Gemm M·N·K,
MatMul prod(out)·K, pooling = output elements × kernel size, global pools = input elements,
data movement = 0, everything else (Relu, Clip, BN, Add, Div, Softmax, LayerNorm) = 1 per
output element. Params = elements of every float initializer, each counted once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from models.fixtures import FIXTURES
from onnxcompress.analyse import analyse

REPO = Path(__file__).resolve().parents[1]
IMAGE = [1, 3, 32, 32]


def conv_macs(cout: int, h_out: int, w_out: int, cin_per_group: int, k: int) -> int:
    """MACs of one Conv at batch 1: output elements × (C_in / groups) × k × k."""
    return cout * h_out * w_out * cin_per_group * k * k


def check(name: str, input_shapes: dict, expected: dict[str, int], params: int, batch: int = 1):
    """analyse(name) matches the batch-1 hand figures, every one scaled by `batch`."""
    analysis = analyse(FIXTURES[name](), input_shapes)
    got = {stats.name: stats.macs for stats in analysis.nodes}
    want = {node: batch * macs for node, macs in expected.items()}
    assert list(got) == list(want), "node names or order differ from the hand table"
    wrong = {node: (got[node], want[node]) for node in want if got[node] != want[node]}
    assert not wrong, f"(analyse, hand) MACs differ: {wrong}"
    assert analysis.total_macs == batch * sum(expected.values())
    assert analysis.total_params == params
    return analysis


# --- hand tables: node name -> MACs at batch 1, in graph order ------------------------------


def vgg_style_macs() -> dict[str, int]:
    return {
        # stage 1 at 32×32, then MaxPool to 16×16
        "stage1.conv0": conv_macs(16, 32, 32, 3, 3),  # 16 * 32 * 32 * (3 * 3 * 3)
        "stage1.relu0": 16 * 32 * 32,
        "stage1.conv1": conv_macs(16, 32, 32, 16, 3),
        "stage1.relu1": 16 * 32 * 32,
        "stage1.pool": 16 * 16 * 16 * (2 * 2),
        # stage 2 at 16×16, then MaxPool to 8×8
        "stage2.conv0": conv_macs(32, 16, 16, 16, 3),
        "stage2.relu0": 32 * 16 * 16,
        "stage2.conv1": conv_macs(32, 16, 16, 32, 3),
        "stage2.relu1": 32 * 16 * 16,
        "stage2.pool": 32 * 8 * 8 * (2 * 2),
        # stage 3 at 8×8, then MaxPool to 4×4
        "stage3.conv0": conv_macs(64, 8, 8, 32, 3),
        "stage3.relu0": 64 * 8 * 8,
        "stage3.pool": 64 * 4 * 4 * (2 * 2),
        # head: GAP reads 64×4×4, Gemm M=1, N=10, K=64
        "head.pool": 64 * 4 * 4,
        "head.flatten": 0,
        "head.fc": 1 * 10 * 64,
    }


def resnet_style_macs() -> dict[str, int]:
    return {
        "stem.conv": conv_macs(16, 32, 32, 3, 3),
        "stem.bn": 16 * 32 * 32,
        "stem.relu": 16 * 32 * 32,
        # stage1.block0: 16 -> 16, stride 1, identity shortcut, 32×32
        "stage1.block0.conv1": conv_macs(16, 32, 32, 16, 3),
        "stage1.block0.bn1": 16 * 32 * 32,
        "stage1.block0.relu1": 16 * 32 * 32,
        "stage1.block0.conv2": conv_macs(16, 32, 32, 16, 3),
        "stage1.block0.bn2": 16 * 32 * 32,
        "stage1.block0.add": 16 * 32 * 32,
        "stage1.block0.relu2": 16 * 32 * 32,
        # stage2.block0: 16 -> 32, stride 2, 32×32 -> 16×16, 1×1 projection shortcut
        "stage2.block0.conv1": conv_macs(32, 16, 16, 16, 3),
        "stage2.block0.bn1": 32 * 16 * 16,
        "stage2.block0.relu1": 32 * 16 * 16,
        "stage2.block0.conv2": conv_macs(32, 16, 16, 32, 3),
        "stage2.block0.bn2": 32 * 16 * 16,
        "stage2.block0.shortcut.conv": conv_macs(32, 16, 16, 16, 1),
        "stage2.block0.shortcut.bn": 32 * 16 * 16,
        "stage2.block0.add": 32 * 16 * 16,
        "stage2.block0.relu2": 32 * 16 * 16,
        # stage3.block0: 32 -> 64, stride 2, 16×16 -> 8×8, 1×1 projection shortcut
        "stage3.block0.conv1": conv_macs(64, 8, 8, 32, 3),
        "stage3.block0.bn1": 64 * 8 * 8,
        "stage3.block0.relu1": 64 * 8 * 8,
        "stage3.block0.conv2": conv_macs(64, 8, 8, 64, 3),
        "stage3.block0.bn2": 64 * 8 * 8,
        "stage3.block0.shortcut.conv": conv_macs(64, 8, 8, 32, 1),
        "stage3.block0.shortcut.bn": 64 * 8 * 8,
        "stage3.block0.add": 64 * 8 * 8,
        "stage3.block0.relu2": 64 * 8 * 8,
        "head.pool": 64 * 8 * 8,
        "head.flatten": 0,
        "head.fc": 1 * 10 * 64,
    }


def mobilenet_style_macs() -> dict[str, int]:
    # The stem (3×3, stride 2) takes 32×32 to 16×16; everything after stays at 16×16.
    return {
        "stem.conv": conv_macs(16, 16, 16, 3, 3),
        "stem.bn": 16 * 16 * 16,
        "stem.relu6": 16 * 16 * 16,
        "block1.depthwise.conv": conv_macs(16, 16, 16, 16 // 16, 3),
        "block1.depthwise.bn": 16 * 16 * 16,
        "block1.depthwise.relu6": 16 * 16 * 16,
        "block1.pointwise.conv": conv_macs(24, 16, 16, 16, 1),
        "block1.pointwise.bn": 24 * 16 * 16,
        "block2.expand.conv": conv_macs(72, 16, 16, 24, 1),
        "block2.expand.bn": 72 * 16 * 16,
        "block2.expand.relu6": 72 * 16 * 16,
        "block2.depthwise.conv": conv_macs(72, 16, 16, 72 // 72, 3),
        "block2.depthwise.bn": 72 * 16 * 16,
        "block2.depthwise.relu6": 72 * 16 * 16,
        "block2.project.conv": conv_macs(24, 16, 16, 72, 1),
        "block2.project.bn": 24 * 16 * 16,
        "block2.add": 24 * 16 * 16,
        "head.expand.conv": conv_macs(64, 16, 16, 24, 1),
        "head.expand.bn": 64 * 16 * 16,
        "head.expand.relu6": 64 * 16 * 16,
        "head.pool": 64 * 16 * 16,
        "head.flatten": 0,
        "head.fc": 1 * 10 * 64,
    }


def mlp_macs() -> dict[str, int]:
    return {
        "fc1": 1 * 128 * 64,  # M=1, N=128, K=64 (transB=1)
        "fc1.relu": 128,
        "fc2": 1 * 64 * 128,  # M=1, N=64, K=128 (transB=0; alpha/beta cost nothing)
        "fc2.relu": 64,
        "fc3": 1 * 10 * 64,
    }


def transformer_block_macs() -> dict[str, int]:
    # tokens [1, 16, 64]; 2 heads of 32: Q [1,2,16,32], Kᵀ [1,2,32,16], V [1,2,16,32].
    table: dict[str, int] = {}
    for kind in ("q", "k", "v"):
        table[f"attn.{kind}_proj"] = (1 * 16 * 64) * 64  # out [1,16,64], K=64
        table[f"attn.{kind}_proj.bias_add"] = 1 * 16 * 64
        table[f"attn.{kind}_split"] = 0
        table[f"attn.{kind}_heads"] = 0
    table.update(
        {
            "attn.scores": (1 * 2 * 16 * 16) * 32,  # out [1,2,16,16], K=32
            "attn.scaled": 1 * 2 * 16 * 16,
            "attn.softmax": 1 * 2 * 16 * 16,
            "attn.context": (1 * 2 * 16 * 32) * 16,  # out [1,2,16,32], K=16
            "attn.context_t": 0,
            "attn.merge": 0,
            "attn.out_proj": (1 * 16 * 64) * 64,
            "attn.out_proj.bias_add": 1 * 16 * 64,
            "attn.residual": 1 * 16 * 64,
            "norm1": 1 * 16 * 64,
            "ffn.fc1": (1 * 16 * 128) * 64,  # out [1,16,128], K=64
            "ffn.fc1.bias_add": 1 * 16 * 128,
            "ffn.relu": 1 * 16 * 128,
            "ffn.fc2": (1 * 16 * 64) * 128,  # out [1,16,64], K=128
            "ffn.fc2.bias_add": 1 * 16 * 64,
            "ffn.residual": 1 * 16 * 64,
            "norm2": 1 * 16 * 64,
        }
    )
    return table


# --- hand param counts: conv weight cout·(cin/groups)·k·k (+ cout bias), BN 4·c --------------

VGG_PARAMS = (
    (16 * 3 * 3 * 3 + 16)
    + (16 * 16 * 3 * 3 + 16)
    + (32 * 16 * 3 * 3 + 32)
    + (32 * 32 * 3 * 3 + 32)
    + (64 * 32 * 3 * 3 + 64)
    + (10 * 64 + 10)
)
RESNET_PARAMS = (
    (16 * 3 * 3 * 3 + 4 * 16)  # stem conv (no bias) + BN
    + (16 * 16 * 3 * 3 + 4 * 16) * 2  # stage1 conv1, conv2
    + (32 * 16 * 3 * 3 + 4 * 32)  # stage2 conv1
    + (32 * 32 * 3 * 3 + 4 * 32)  # stage2 conv2
    + (32 * 16 * 1 * 1 + 4 * 32)  # stage2 shortcut
    + (64 * 32 * 3 * 3 + 4 * 64)  # stage3 conv1
    + (64 * 64 * 3 * 3 + 4 * 64)  # stage3 conv2
    + (64 * 32 * 1 * 1 + 4 * 64)  # stage3 shortcut
    + (10 * 64 + 10)
)
MOBILENET_PARAMS = (
    (16 * 3 * 3 * 3 + 4 * 16)  # stem
    + (16 * 1 * 3 * 3 + 4 * 16)  # block1 depthwise
    + (24 * 16 * 1 * 1 + 4 * 24)  # block1 pointwise
    + (72 * 24 * 1 * 1 + 4 * 72)  # block2 expand
    + (72 * 1 * 3 * 3 + 4 * 72)  # block2 depthwise
    + (24 * 72 * 1 * 1 + 4 * 24)  # block2 project
    + (64 * 24 * 1 * 1 + 4 * 64)  # head expand
    + 2  # the shared scalar Clip bounds relu6.min and relu6.max
    + (10 * 64 + 10)
)
MLP_PARAMS = (128 * 64 + 128) + (64 * 128 + 64) + (10 * 64 + 10)
TRANSFORMER_PARAMS = (
    4 * (64 * 64 + 64)  # q, k, v, out projections
    + 1  # attn.scale (the int64 reshape targets are not float)
    + 2 * 64  # norm1 scale and bias
    + (64 * 128 + 128)  # ffn.fc1
    + (128 * 64 + 64)  # ffn.fc2
    + 2 * 64  # norm2
)


# --- one test per fixture --------------------------------------------------------------------


def test_vgg_style() -> None:
    check("vgg_style", {"input": IMAGE}, vgg_style_macs(), VGG_PARAMS)


def test_resnet_style() -> None:
    check("resnet_style", {"input": IMAGE}, resnet_style_macs(), RESNET_PARAMS)


def test_mobilenet_style() -> None:
    check("mobilenet_style", {"input": IMAGE}, mobilenet_style_macs(), MOBILENET_PARAMS)


def test_mlp() -> None:
    check("mlp", {"input": [1, 64]}, mlp_macs(), MLP_PARAMS)


def test_transformer_block() -> None:
    check(
        "transformer_block", {"tokens": [1, 16, 64]}, transformer_block_macs(), TRANSFORMER_PARAMS
    )


def test_batch_4_scales_every_node_and_keeps_params() -> None:
    # Every op in resnet_style works per sample, so each node's MACs are 4× the batch-1 figure.
    analysis = check(
        "resnet_style", {"input": [4, 3, 32, 32]}, resnet_style_macs(), RESNET_PARAMS, batch=4
    )
    assert analysis.by_name()["head.fc"].macs == 4 * 10 * 64  # Gemm M = 4


def test_cli_json_total(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    result = subprocess.run(
        [sys.executable, "-m", "onnxcompress", "analyse", "models/mobilenet_style.onnx"]
        + ["--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["input_shapes"] == {"input": IMAGE}  # dynamic batch defaults to 1
    assert report["total_macs"] == sum(mobilenet_style_macs().values())
    assert report["total_params"] == MOBILENET_PARAMS
