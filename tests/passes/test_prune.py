"""prune: exact sparsity, keep rules, N:M, quantised survivors, weights in Constant nodes,
models that still check and run, the input untouched, and the design-card command."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes import get_pass
from onnxcompress.passes.prune import PruneOptions, prune

from models.fixtures import mlp, resnet_style, transformer_block
from onnxcompress import graph
from onnxcompress.coding import onnxc_reader as onnxc_reader
from onnxcompress.coding import onnxc_writer as onnxc_writer
from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import run_model
from tests.conftest import REPO

SPEC = get_pass("prune")
CONTEXT = PassContext(input_shapes={})
PRUNABLE = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _run(model, **raw):
    return prune(model, SPEC.make_options(raw), CONTEXT)


def _weights(model):
    """{weight name: array} of every Conv/Gemm/MatMul weight, in graph order of the layers."""
    constants = graph.constant_tensors(model)
    out = {}
    for node in model.graph.node:
        if node.op_type in PRUNABLE:
            for name in node.input[:2]:
                if name in constants:
                    out[name] = constants[name]
    return out


def _rewritten(result):
    return {r.details["weight"] for r in result.records if r.status == "rewritten"}


def _inputs(model, seed=0):
    rng = np.random.default_rng(seed)
    shapes = graph.resolve_input_shapes(model, {})
    batch = {
        name: rng.standard_normal([2, *shape[1:]]).astype(np.float32)
        for name, shape in shapes.items()
    }
    return [batch]


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.8])
def test_global_sparsity_is_exact(sparsity):
    model = resnet_style()
    result = _run(model, sparsity=sparsity)
    pruned = _weights(result.model)
    names = _rewritten(result)
    total = sum(pruned[n].size for n in names)
    zeros = sum(int((pruned[n] == 0).sum()) for n in names)
    assert zeros == round(sparsity * total)
    assert result.summary["nonzero_params"] == total - zeros
    assert result.summary["sparsity"] == pytest.approx(zeros / total, abs=1e-6)
    assert result.changed


def test_layer_sparsity_is_exact_per_tensor():
    result = _run(resnet_style(), sparsity=0.7, scope="layer")
    pruned = _weights(result.model)
    for name in _rewritten(result):
        assert int((pruned[name] == 0).sum()) == round(0.7 * pruned[name].size)


def test_keep_first_last_by_default_and_patterns():
    model = resnet_style()
    order = [n for n in model.graph.node if n.op_type in PRUNABLE]
    result = _run(model, sparsity=0.5)
    status = {r.node: r for r in result.records}
    assert status[order[0].name].status == "skipped" and "first" in status[order[0].name].reason
    assert status[order[-1].name].status == "skipped" and "last" in status[order[-1].name].reason
    before, after = _weights(model), _weights(result.model)
    for node in (order[0], order[-1]):
        np.testing.assert_array_equal(before[node.input[1]], after[node.input[1]])

    everything = _run(model, sparsity=0.5, keep="none")
    assert all(r.status == "rewritten" for r in everything.records)

    by_name = _run(model, sparsity=0.5, keep="stage2.*")
    kept = {r.node for r in by_name.records if r.status == "skipped"}
    assert kept == {n.name for n in order if n.name.startswith("stage2.")}


def test_nm_pattern_is_valid_along_input_channels():
    model = resnet_style()
    result = _run(model, pattern="2:4", keep="none")
    pruned = _weights(result.model)
    checked = 0
    for node in result.model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in _rewritten(result):
            continue
        w = np.moveaxis(pruned[node.input[1]], 1, -1)  # input channels last
        groups = (w != 0).reshape(-1, 4)
        assert (groups.sum(axis=1) <= 2).all()
        checked += 1
    assert checked >= 5
    # the stem has 3 input channels: not a multiple of 4, so it says why and stays dense
    stem = next(r for r in result.records if r.node == "stem.conv")
    assert stem.status == "skipped" and "multiple of 4" in stem.reason


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantised_survivors_take_few_values(bits):
    result = _run(resnet_style(), sparsity=0.6, quantize_bits=bits)
    pruned = _weights(result.model)
    for name in _rewritten(result):
        values = np.unique(pruned[name][pruned[name] != 0])
        assert 1 <= values.size <= 2**bits
    assert result.summary["sparsity"] == pytest.approx(0.6, abs=1e-3)


def test_sparsity_zero_is_the_original():
    model = resnet_style()
    result = _run(model, sparsity=0.0, keep="none")
    assert not result.changed
    for name, value in _weights(model).items():
        np.testing.assert_array_equal(_weights(result.model)[name], value)
    batches = _inputs(model)
    before, after = run_model(model, batches), run_model(result.model, batches)
    for key in before:
        np.testing.assert_array_equal(before[key], after[key])


@pytest.mark.parametrize("build", [resnet_style, mlp, transformer_block])
def test_pruned_model_checks_runs_and_input_untouched(build):
    model = build()
    snapshot = model.SerializeToString()
    result = _run(model, sparsity=0.5)
    assert model.SerializeToString() == snapshot
    graph.check_model(result.model)
    outputs = run_model(result.model, _inputs(model))
    assert all(np.isfinite(v).all() for v in outputs.values())
    summary = result.summary
    assert summary["onnxc_bytes"] < summary["zstd19_bytes"] < summary["onnx_bytes"]
    assert any("make neither onnxruntime faster" in note for note in summary["notes"])


def test_matmul_weight_on_either_side_and_gemm_transposes():
    rng = np.random.default_rng(0)
    left = rng.standard_normal((8, 12)).astype(np.float32)  # W @ x
    right = rng.standard_normal((6, 16)).astype(np.float32)  # x @ W
    nodes = [
        helper.make_node("MatMul", ["WL", "x"], ["h"], name="left"),
        helper.make_node("MatMul", ["h", "WR"], ["y"], name="right"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [12, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 16])],
        [numpy_helper.from_array(left, "WL"), numpy_helper.from_array(right, "WR")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = _run(model, pattern="1:2", keep="none")
    w = graph.constant_tensors(result.model)
    # W @ x: input features are W's last axis; x @ W: W's first axis
    assert ((w["WL"] != 0).reshape(8, 6, 2).sum(-1) == 1).all()
    assert ((w["WR"] != 0).T.reshape(16, 3, 2).sum(-1) == 1).all()
    graph.check_model(result.model)


def _constant_weight_model():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node(
            "Constant", [], ["w"], name="w_const", value=numpy_helper.from_array(weight, "w")
        ),
        helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), weight


def test_weights_in_constant_nodes_are_pruned_in_place():
    model, weight = _constant_weight_model()
    result = _run(model, sparsity=0.75, keep="none")
    assert not result.model.graph.initializer  # written back into the Constant node
    value = graph.constant_tensors(result.model)["w"]
    assert (value == 0).sum() == round(0.75 * weight.size)
    kept = value != 0
    np.testing.assert_array_equal(value[kept], weight[kept])
    graph.check_model(result.model)
    # the .onnxc writer codes Constant-node weights too, and restores them exactly
    assert onnxc_reader.decode_model(onnxc_writer.encode_model(result.model)) == result.model


def test_graph_input_initializer_is_pruned():
    model, weight = _constant_weight_model()
    del model.graph.node[0]
    model.graph.initializer.append(numpy_helper.from_array(weight, "w"))
    model.graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, weight.shape))
    result = _run(model, sparsity=0.5, keep="none")
    assert (graph.constant_tensors(result.model)["w"] == 0).sum() == weight.size // 2


def test_non_constant_weight_is_skipped_with_reason():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    g = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [3, 4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    result = _run(model)
    assert not result.changed
    assert result.records[0].status == "skipped" and "not a constant" in result.records[0].reason


@pytest.mark.parametrize(
    "raw",
    [
        {"sparsity": "1.5"},
        {"sparsity": "-0.1"},
        {"scope": "network"},
        {"pattern": "4:2"},
        {"pattern": "2-4"},
        {"pattern": "2:4", "sparsity": "0.5"},
        {"quantize_bits": "1"},
        {"quantize_bits": "12"},
        {"keep": " , "},
        {"speed": "fast"},
    ],
)
def test_bad_options_raise_compress_error(raw):
    with pytest.raises(CompressError):
        SPEC.make_options(raw)


def test_options_defaults_are_documented():
    options = PruneOptions()
    assert options.sparsity is None and options.scope == "global"
    assert options.keep == "first,last" and options.pattern is None


@pytest.mark.parametrize("fixture", ["resnet_style", "mlp"])
def test_design_card_command(tmp_path, fixture):
    out = tmp_path / "out.onnx"
    cmd = [sys.executable, "-m", "onnxcompress", str(REPO / "models" / f"{fixture}.onnx")]
    cmd += ["--passes", "fga,prune", "-o", str(out), "--no-bench", "-q"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "make neither onnxruntime faster" in done.stdout
    graph.check_model(onnx.load(out))
