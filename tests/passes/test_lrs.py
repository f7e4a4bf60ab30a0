"""lrs pass: exact L + S weights give the original outputs (conv, MatMul, Gemm; structured and
unstructured S), MACs as `analyse` counts them, the data solver beats weight-only on data,
the structured branch reads fewer channels, skips with reasons, a MAC budget."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes import get_pass

from onnxcompress import graph
from onnxcompress.analyse import analyse
from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import run_model

RTOL, ATOL = 1e-4, 1e-5
LRS = get_pass("lrs")


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    body = helper.make_graph(nodes, "t", inputs, outputs, inits)
    model = helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _info(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _const(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _split_matrix(rng, n, d, rank, groups, kept) -> np.ndarray:
    """n × d = rank-`rank` L + S nonzero only on the columns of the `kept` groups."""
    low = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d)) / rank
    sparse = np.where(np.isin(groups, kept)[None, :], rng.standard_normal((n, d)), 0.0)
    return low + sparse


def _conv_weight(rng, n, c, k, rank, kept) -> np.ndarray:
    groups = np.repeat(np.arange(c), k * k)
    return _split_matrix(rng, n, c * k * k, rank, groups, kept).reshape(n, c, k, k)


def _conv_model(rng):
    """conv_a 3×3 (8 → 32, L + S on channels 1, 5), depthwise 3×3, conv_b 1×1 (32 → 32,
    L + S on 8 channels): rank 4 and 3/4 of S's input channels zero in both."""
    inits = [
        _const("wa", _conv_weight(rng, 32, 8, 3, 4, [1, 5]) / 8),  # outputs O(1): float32
        _const("ba", rng.standard_normal(32)),
        _const("wd", rng.standard_normal((32, 1, 3, 3)) / 3),
        _const("wb", _conv_weight(rng, 32, 32, 1, 4, [0, 3, 4, 9, 17, 20, 28, 31]) / 6),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wd"], ["d"], name="dw", group=32, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["d", "wb"], ["y"], name="conv_b"),
    ]
    shape = [2, 8, 10, 10]
    model = _model(nodes, [_info("x", shape)], [_info("y", [2, 32, 10, 10])], inits)
    return model, {"x": shape}


def _linear_model(rng):
    """x[2, 5, 24] @ W1 (24 → 20) + b → Relu → @ W2 (20 → 16); rank 3, S on 6 and 5 inputs."""
    w1 = _split_matrix(rng, 20, 24, 3, np.arange(24), [0, 2, 7, 11, 12, 23]).T
    w2 = _split_matrix(rng, 16, 20, 3, np.arange(20), [1, 4, 8, 15, 19]).T
    inits = [_const("w1", w1), _const("b1", rng.standard_normal(20)), _const("w2", w2)]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="bias1"),
        helper.make_node("Relu", ["hb"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2"),
    ]
    shape = [2, 5, 24]
    return _model(nodes, [_info("x", shape)], [_info("y", [2, 5, 16])], inits), {"x": shape}


def _gemm_model(rng):
    w = _split_matrix(rng, 20, 24, 3, np.arange(24), [3, 4, 5, 6, 10, 20]).T
    inits = [_const("w", w), _const("c", rng.standard_normal(20))]
    node = helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="fc", beta=0.5)
    return _model([node], [_info("x", [6, 24])], [_info("y", [6, 20])], inits), {"x": [6, 24]}


def _run(model, shapes, calibration=None, **options):
    raw = {"never_slower": False, **options}
    context = PassContext(shapes, calibration=calibration)
    return LRS.run(model, LRS.make_options(raw), context)


def _feeds(rng, shapes) -> dict[str, np.ndarray]:
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _assert_same_outputs(original, rewritten, feeds) -> None:
    want, got = run_model(original, [feeds]), run_model(rewritten, [feeds])
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=RTOL, atol=ATOL)


def _assert_sound(original, result, shapes) -> None:
    """Checker passes; every record's MACs are its nodes' MACs in `analyse` of the output."""
    graph.check_model(result.model)
    after = analyse(result.model, shapes)
    saved = 0
    for record in result.records:
        if record.status != "rewritten":
            continue
        nodes = [s for s in after.nodes if s.name.startswith(f"{record.node}.lrs_")]
        assert sum(s.macs for s in nodes) == record.macs_after, record.to_dict()
        details = record.details
        assert details["macs_low_rank"] + details["macs_sparse"] <= record.macs_after
        saved += record.macs_before - record.macs_after
    assert after.total_macs == analyse(original, shapes).total_macs - saved
    assert result.summary["macs_after"] == after.total_macs
    rewritten = [r.details for r in result.records if r.status == "rewritten"]
    for part in ("macs_low_rank", "macs_sparse"):  # the summary says where the MACs sit
        assert result.summary[part] == sum(d[part] for d in rewritten)


def _rewritten(result) -> dict:
    return {r.node: r for r in result.records if r.status == "rewritten"}


def test_conv_exact_split_matches_and_branch_reads_kept_channels():
    rng = np.random.default_rng(0)
    model, shapes = _conv_model(rng)
    result = _run(model, shapes, rank=4, sparsity=0.75, iterations=300)
    assert set(_rewritten(result)) == {"conv_a", "conv_b"}
    _assert_same_outputs(model, result.model, _feeds(rng, shapes))
    _assert_sound(model, result, shapes)
    record = _rewritten(result)["conv_a"]
    assert record.details["sparse_branch"] == "structured: 2 of 8 input channels"
    assert record.details["weight_rel_error"] < 1e-5
    assert record.macs_after < record.macs_before
    # The sparse branch reads channels 1 and 5 only, through a smaller dense conv.
    inits = {i.name: numpy_helper.to_array(i) for i in result.model.graph.initializer}
    gather = next(n for n in result.model.graph.node if n.name == "conv_a.lrs_gather")
    assert list(inits[gather.input[1]]) == [1, 5]
    branch = next(n for n in result.model.graph.node if n.name == "conv_a.lrs_sparse")
    assert branch.input[0] == gather.output[0]
    assert inits[branch.input[1]].shape == (32, 2, 3, 3)
    skipped = {r.node: r.reason for r in result.records if r.status == "skipped"}
    assert "depthwise" in skipped["dw"]


def test_matmul_exact_split_matches():
    rng = np.random.default_rng(1)
    model, shapes = _linear_model(rng)
    result = _run(model, shapes, rank=3, sparsity=0.75, iterations=300, align=1)
    assert set(_rewritten(result)) == {"fc1", "fc2"}
    _assert_same_outputs(model, result.model, _feeds(rng, shapes))
    _assert_sound(model, result, shapes)
    assert _rewritten(result)["fc2"].details["sparse_branch"] == (
        "structured: 5 of 20 input channels"
    )
    adds = [n for n in result.model.graph.node if n.name == "bias1"]
    assert adds and adds[0].input[0] == "h"  # the bias Add after fc1 is left as it was


def test_gemm_exact_split_keeps_c():
    rng = np.random.default_rng(2)
    model, shapes = _gemm_model(rng)
    result = _run(model, shapes, rank=3, sparsity=0.75, iterations=300)
    assert set(_rewritten(result)) == {"fc"}
    _assert_same_outputs(model, result.model, _feeds(rng, shapes))
    _assert_sound(model, result, shapes)


def test_gemm_of_opset_9_keeps_every_gemm_valid():
    """Gemm before opset 11 requires C: the C-less products get a zero one (as svd's)."""
    rng = np.random.default_rng(2)
    model, shapes = _gemm_model(rng)
    model.opset_import[0].version = 9
    result = _run(model, shapes, rank=3, sparsity=0.75, iterations=300)
    gemms = [n for n in result.model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) == 3 and all(len(n.input) == 3 for n in gemms)
    _assert_same_outputs(model, result.model, _feeds(rng, shapes))
    _assert_sound(model, result, shapes)
    record = _rewritten(result)["fc"]
    assert record.params_after == analyse(result.model, shapes).total_params


def test_unstructured_exact_split_size_only():
    rng = np.random.default_rng(3)
    low = rng.standard_normal((32, 2)) @ rng.standard_normal((2, 72))
    sparse = np.zeros(32 * 72)
    sparse[rng.choice(sparse.size, 230, replace=False)] = 5 * rng.choice([-1, 1], 230)
    weight = (low + sparse.reshape(32, 72)).reshape(32, 8, 3, 3)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    shape = [1, 8, 6, 6]
    model = _model([node], [_info("x", shape)], [_info("y", [1, 32, 6, 6])], [_const("w", weight)])
    shapes = {"x": shape}
    result = _run(model, shapes, rank=2, sparsity=1 - 230 / (32 * 72), structured=False)
    record = _rewritten(result)["conv"]
    assert record.details["sparse_branch"].startswith("unstructured: size only")
    assert record.details["sparse_nonzeros"] == 230
    assert record.macs_after > record.macs_before  # S is stored dense: no MACs saved
    assert "size only" in result.summary["sparse_branch"]
    _assert_same_outputs(model, result.model, _feeds(rng, shapes))
    _assert_sound(model, result, shapes)
    with pytest.raises(CompressError, match="size, never MACs"):
        _run(model, shapes, structured=False, target_macs=0.5)


def _correlated_batches(rng, mixing, count=3):
    """Inputs whose 8 channels are mixtures of 2 smooth latent maps plus a little noise."""
    batches = []
    for _ in range(count):
        latent = rng.standard_normal((4, 2, 12, 12))
        x = np.einsum("cl,blhw->bchw", mixing, latent) + 0.05 * rng.standard_normal((4, 8, 12, 12))
        batches.append({"x": x.astype(np.float32)})
    return batches


@pytest.mark.parametrize("structured", [True, False])
def test_data_solver_beats_weight_only_on_data(structured):
    rng = np.random.default_rng(4)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", pads=[1, 1, 1, 1])
    weight = rng.standard_normal((16, 8, 3, 3))
    shapes = {"x": [4, 8, 12, 12]}
    model = _model(
        [node], [_info("x", shapes["x"])], [_info("y", [4, 16, 12, 12])], [_const("w", weight)]
    )
    mixing = rng.standard_normal((8, 2))
    calibration, evaluation = _correlated_batches(rng, mixing), _correlated_batches(rng, mixing)
    errors = {}
    for solver in ("weight", "linear"):
        result = _run(
            model, shapes, calibration, rank=4, sparsity=0.5, solver=solver, structured=structured
        )
        record = _rewritten(result)["conv"]
        _assert_sound(model, result, shapes)
        want = run_model(model, evaluation)["y"]
        got = run_model(result.model, evaluation)["y"]
        errors[solver] = np.linalg.norm(got - want) / np.linalg.norm(want)
        if solver == "linear":
            assert record.details["solver"] == "linear (calibration data)"
            assert "calibration" in result.summary["error_basis"]
            assert record.details["data_rel_error"] < record.details["weight_rel_error"]
    assert errors["linear"] < 0.5 * errors["weight"], errors


def test_target_macs_budget_met():
    rng = np.random.default_rng(5)
    model, shapes = _conv_model(rng)
    result = _run(model, shapes, target_macs=0.7, align=4)
    assert result.changed
    _assert_sound(model, result, shapes)
    before = analyse(model, shapes).total_macs
    assert result.summary["macs_after"] <= 0.7 * before
    for record in _rewritten(result).values():
        assert record.details["sparse_branch"].startswith("structured:")


def test_one_d_conv_and_left_matmul_are_skipped():
    rng = np.random.default_rng(6)
    conv = helper.make_node("Conv", ["x", "w"], ["c"], name="conv1d")
    left = helper.make_node("MatMul", ["m", "c"], ["y"], name="left")
    inits = [_const("w", rng.standard_normal((4, 3, 3))), _const("m", rng.standard_normal((5, 4)))]
    model = _model([conv, left], [_info("x", [3, 8])], [_info("y", [1, 5, 6])], [])
    model.graph.input[0].CopyFrom(_info("x", [1, 3, 8]))
    model.graph.initializer.extend(inits)
    result = _run(model, {"x": [1, 3, 8]}, rank=1, sparsity=0.5)
    assert not result.changed
    reasons = {r.node: r.reason for r in result.records}
    assert "1-D convolution" in reasons["conv1d"]
    assert "x @ W only" in reasons["left"]


def test_bad_options_are_refused():
    with pytest.raises(CompressError, match="solver must be one of"):
        LRS.make_options({"solver": "other"})
    with pytest.raises(CompressError, match="sparsity"):
        LRS.make_options({"sparsity": 1.5})


def test_sparsity_one_is_plain_low_rank():
    """No channel kept: no sparse branch and no Add; a rank-2 weight is exact."""
    rng = np.random.default_rng(7)
    weight = _conv_weight(rng, 16, 8, 3, 2, []) / 4
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", strides=[2, 2])
    shapes = {"x": [1, 8, 9, 9]}
    inits = [_const("w", weight), _const("b", rng.standard_normal(16))]
    model = _model([node], [_info("x", shapes["x"])], [_info("y", [1, 16, 4, 4])], inits)
    result = _run(model, shapes, rank=2, sparsity=1.0)
    assert [n.op_type for n in result.model.graph.node] == ["Conv", "Conv"]
    assert _rewritten(result)["conv"].details["sparse_branch"] == (
        "structured: 0 of 8 input channels"
    )
    _assert_same_outputs(model, result.model, _feeds(rng, shapes))
    _assert_sound(model, result, shapes)


def test_admm_solver_on_relu_fed_layer():
    """conv_a feeds a Relu: ADMM, weighed by its ReLU-output error; conv_b (graph output)
    keeps the linear fit. The ReLU output on the calibration data is no worse than with the
    linear solver (ADMM starts from it and keeps its best iterate)."""
    rng = np.random.default_rng(8)
    shapes = {"x": [4, 8, 12, 12]}
    inits = [
        _const("wa", rng.standard_normal((16, 8, 3, 3)) / 8),
        _const("ba", 0.3 * rng.standard_normal(16)),
        _const("wb", rng.standard_normal((16, 16, 3, 3)) / 12),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a"], name="conv_a", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "wb"], ["y"], name="conv_b", pads=[1, 1, 1, 1]),
    ]
    model = _model(nodes, [_info("x", shapes["x"])], [_info("y", [4, 16, 12, 12])], inits)
    model.graph.output.append(_info("r", [4, 16, 12, 12]))
    calibration = _correlated_batches(rng, rng.standard_normal((8, 2)))
    relu_errors = {}
    for solver in ("linear", "admm"):
        result = _run(model, shapes, calibration, rank=4, sparsity=0.5, solver=solver)
        _assert_sound(model, result, shapes)
        records = _rewritten(result)
        assert records["conv_b"].details["solver"] == "linear (calibration data)"
        want, got = run_model(model, calibration)["r"], run_model(result.model, calibration)["r"]
        relu_errors[solver] = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert records["conv_a"].details["solver"] == "admm (ReLU-aware, calibration data)"
    assert "ReLU outputs" in result.summary["error_basis"]
    assert relu_errors["admm"] <= 1.01 * relu_errors["linear"], relu_errors
