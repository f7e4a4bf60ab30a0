"""Identity residual blocks (`onnxcompress.residual_blocks`) and the `blocks` pass: which
blocks are found, that removing one computes what the block with a zero branch computes
(onnxruntime), that the refit after it helps, and the pass's ranking, records and errors."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnxcompress.passes import get_pass

from models.fixtures import mlp, mobilenet_style, resnet_style
from onnxcompress import graph, residual_blocks
from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import run_model

SHAPES = {"input": [4, 3, 32, 32]}


def _images(seed, count=2):
    rng = np.random.default_rng(seed)
    return [
        {"input": rng.standard_normal(SHAPES["input"]).astype(np.float32)} for _ in range(count)
    ]


def _folded(model):
    spec = get_pass("fold_bn")
    return spec.run(model, spec.make_options({}), PassContext(SHAPES)).model


def _zero_branch_end(model, bn_name):
    """`model` with the BatchNormalization `bn_name` writing zeros (scale and shift 0)."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    node = next(n for n in result.graph.node if n.name == bn_name)
    for init in result.graph.initializer:
        if init.name in node.input[1:3]:
            zero = np.zeros_like(numpy_helper.to_array(init))
            init.CopyFrom(numpy_helper.from_array(zero, init.name))
    return result


def _output(model, batches):
    (values,) = run_model(model, batches).values()
    return values


@pytest.mark.parametrize(
    ("build", "add", "skips_relu", "branch_end"),
    [
        (resnet_style, "stage1.block0.add", True, "stage1.block0.bn2"),
        (mobilenet_style, "block2.add", False, "block2.project.bn"),
    ],
)
def test_a_removed_block_computes_its_input(build, add, skips_relu, branch_end):
    model = build()
    (block,) = residual_blocks.identity_blocks(model)  # projection shortcuts are not identity
    made_by = graph.producers(model)
    assert block.add == add and (made_by[block.output].op_type == "Relu") == skips_relu
    dropped = residual_blocks.without_blocks(model, [block])
    graph.check_model(dropped)
    names = {n.name for n in dropped.graph.node}
    assert add not in names and branch_end not in names
    batches = _images(seed=3)
    want = _output(_zero_branch_end(model, branch_end), batches)
    np.testing.assert_allclose(_output(dropped, batches), want, rtol=1e-5, atol=1e-5)


def _two_blocks_in_a_row(scales=(1.0, 1.0)):
    """Relu, then two blocks Relu(Add(x, Conv1x1(x))), the second reading the first; each
    branch's weights times its scale."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Relu", ["input"], ["x0"], name="stem")]
    weights = []
    for i, scale in zip((1, 2), scales, strict=True):
        w = (scale * rng.standard_normal((4, 4, 1, 1))).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"w{i}"))
        nodes += [
            helper.make_node("Conv", [f"x{i - 1}", f"w{i}"], [f"c{i}"], name=f"conv{i}"),
            helper.make_node("Add", [f"x{i - 1}", f"c{i}"], [f"s{i}"], name=f"add{i}"),
            helper.make_node("Relu", [f"s{i}"], [f"x{i}"], name=f"relu{i}"),
        ]
    nodes.append(helper.make_node("Identity", ["x2"], ["output"], name="out"))
    value = helper.make_tensor_value_info
    io = [value(n, onnx.TensorProto.FLOAT, ["batch", 4, 5, 5]) for n in ("input", "output")]
    g = helper.make_graph(nodes, "two_blocks", [io[0]], [io[1]], weights)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_blocks_in_a_row_both_removed_leave_their_first_input():
    model = _two_blocks_in_a_row()
    blocks = residual_blocks.identity_blocks(model)
    assert [(b.add, b.input, b.output) for b in blocks] == [
        ("add1", "x0", "x1"),
        ("add2", "x1", "x2"),
    ]
    dropped = residual_blocks.without_blocks(model, blocks)
    graph.check_model(dropped)
    assert [n.name for n in dropped.graph.node] == ["stem", "out"]
    x = np.random.default_rng(1).standard_normal((1, 4, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(_output(dropped, [{"input": x}]), np.maximum(x, 0))


def test_refit_after_a_removed_block_lowers_the_output_error():
    model = _folded(resnet_style())
    calibration = _images(seed=1, count=4)
    context = PassContext(SHAPES, calibration=calibration, threads=1)
    (block,) = residual_blocks.identity_blocks(model)
    dropped = residual_blocks.without_blocks(model, [block])
    refit, summary = residual_blocks.refit_after(model, dropped, context)
    # stage2 and stage3: two branch convs and the projection each; not the classifier (16
    # samples for its 65 unknowns an output: its refit would match them and little else)
    assert summary["layers"] == 6
    held_out = _images(seed=2)
    want = _output(model, held_out)

    def error(candidate):
        return np.linalg.norm(_output(candidate, held_out) - want) / np.linalg.norm(want)

    assert error(refit) < error(dropped)


def _run_blocks(model, calibration, **options):
    spec = get_pass("blocks")
    shapes = {"input": [1, 4, 5, 5]}
    return spec.run(model, spec.make_options(options), PassContext(shapes, calibration, threads=1))


def _small_images(seed, count=2):
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((8, 4, 5, 5)).astype(np.float32)} for _ in range(count)]


def test_the_pass_removes_the_least_damaging_block_and_says_what_went():
    model = _two_blocks_in_a_row(scales=(1.0, 0.01))  # the second branch adds next to nothing
    result = _run_blocks(model, _small_images(seed=1), count=1)
    graph.check_model(result.model)
    assert result.summary["blocks"]["removed"] == ["add2"]
    kept, removed = result.records
    assert (kept.node, kept.status, removed.node, removed.status) == (
        "add1",
        "skipped",
        "add2",
        "rewritten",
    )
    assert removed.details["rel_l2_alone"] < kept.details["rel_l2_alone"]
    assert removed.details["nodes_removed"] == ["conv2", "add2", "relu2"]
    assert (removed.params_before, removed.params_after) == (16, 0)
    # The damage it ranked on is what the model does on other data.
    held_out = _small_images(seed=2)
    want, got = _output(model, held_out), _output(result.model, held_out)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.05


def test_named_blocks_need_no_data_and_bad_requests_are_clear_errors():
    model = _two_blocks_in_a_row()
    result = _run_blocks(model, None, names="add1")
    assert result.summary["blocks"]["removed"] == ["add1"]
    assert "no refit" in result.summary["notes"]
    for options, calibration, message in (
        ({"names": "nosuch"}, None, "nosuch is not an identity block's Add; they are: add1, add2"),
        ({"count": 3}, _small_images(seed=1), "count=3, but the model has 2 identity blocks"),
        ({"count": 1}, None, "ranking blocks needs calibration data"),
    ):
        with pytest.raises(CompressError, match=message):
            _run_blocks(model, calibration, **options)
    with pytest.raises(CompressError, match="no residual block"):
        _run_blocks(mlp(), None)


def _weight_maker(model, seed):
    """`weight(name, shape)`: adds a random initializer to `model`, returns its name."""
    rng = np.random.default_rng(seed)

    def weight(name, shape):
        array = rng.standard_normal(shape).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(array, name))
        return name

    return weight


def test_refit_after_leaves_grouped_convs_and_resolves_auto_pad():
    """After the first block: a depthwise conv (one fit per group would be needed: left as it
    is) and a 3×3 conv padded by auto_pad=SAME_UPPER (refit on correctly padded patches)."""
    model = _two_blocks_in_a_row()
    weight = _weight_maker(model, seed=3)

    tail = next(n for n in model.graph.node if n.name == "out")
    tail.input[0] = "same"
    model.graph.node.remove(tail)
    model.graph.node.extend([
        helper.make_node("Conv", ["x2", weight("dw", (4, 1, 3, 3)), weight("dwb", (4,))],
                         ["depthwise"], name="depthwise", group=4, pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["depthwise", weight("w3", (4, 4, 3, 3)), weight("b3", (4,))],
                         ["same"], name="same", auto_pad="SAME_UPPER"),
        tail,
    ])  # fmt: skip
    graph.check_model(model)
    first = residual_blocks.identity_blocks(model)[0]
    dropped = residual_blocks.without_blocks(model, [first])
    calibration = _small_images(seed=1, count=2)
    context = PassContext({"input": [8, 4, 5, 5]}, calibration, threads=1)
    refit, summary = residual_blocks.refit_after(model, dropped, context)
    assert summary["layers"] == 1  # "same" only: conv2 has no bias, depthwise is grouped
    weights = {i.name: numpy_helper.to_array(i) for i in refit.graph.initializer}
    np.testing.assert_array_equal(weights["dw"], numpy_helper.to_array(
        next(i for i in dropped.graph.initializer if i.name == "dw")))  # fmt: skip
    held_out = _small_images(seed=2)
    want = _output(model, held_out)

    def error(candidate):
        return np.linalg.norm(_output(candidate, held_out) - want) / np.linalg.norm(want)

    assert error(refit) < error(dropped)


def test_refit_after_refits_the_linear_layers_it_can_and_leaves_the_others():
    """After the last block: pooling, then a Gemm with transB=1, a Gemm without, a MatMul with
    a bias Add (all refit) and a Gemm with alpha=0.5 (left: its weight is not what it applies)."""
    model = _two_blocks_in_a_row()
    weight = _weight_maker(model, seed=4)

    tail = next(n for n in model.graph.node if n.name == "out")
    model.graph.node.remove(tail)
    model.graph.output[0].CopyFrom(
        helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["batch", 3])
    )
    model.graph.node.extend([
        helper.make_node("GlobalAveragePool", ["x2"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["features"], name="flatten"),
        helper.make_node("Gemm", ["features", weight("g1", (8, 4)), weight("g1b", (8,))],
                         ["h1"], name="gemm_t", transB=1),
        helper.make_node("Relu", ["h1"], ["r1"], name="r1"),
        helper.make_node("Gemm", ["r1", weight("g2", (8, 8)), weight("g2b", (1, 8))],
                         ["h2"], name="gemm"),
        helper.make_node("Relu", ["h2"], ["r2"], name="r2"),
        helper.make_node("MatMul", ["r2", weight("m", (8, 6))], ["h3"], name="matmul"),
        helper.make_node("Add", ["h3", weight("mb", (6,))], ["h3b"], name="bias"),
        helper.make_node("Relu", ["h3b"], ["r3"], name="r3"),
        helper.make_node("Gemm", ["r3", weight("g4", (6, 3)), weight("g4b", (3,))],
                         ["output"], name="scaled", alpha=0.5),
    ])  # fmt: skip
    graph.check_model(model)
    last = residual_blocks.identity_blocks(model)[1]
    dropped = residual_blocks.without_blocks(model, [last])
    # 32 samples: too few rows for the 8-feature layers (4 per unknown), enough for the first.
    few = PassContext({"input": [8, 4, 5, 5]}, _small_images(seed=1, count=4), threads=1)
    assert residual_blocks.refit_after(model, dropped, few)[1]["layers"] == 1
    calibration = _small_images(seed=1, count=8)
    context = PassContext({"input": [8, 4, 5, 5]}, calibration, threads=1)
    refit, summary = residual_blocks.refit_after(model, dropped, context)
    assert summary["layers"] == 3
    before = {i.name: numpy_helper.to_array(i) for i in dropped.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in refit.graph.initializer}
    for name in ("g4", "g4b"):
        np.testing.assert_array_equal(after[name], before[name])
    for name in ("g1", "g1b", "g2", "g2b", "m", "mb"):
        assert after[name].shape == before[name].shape
        assert not np.array_equal(after[name], before[name]), name
    graph.check_model(refit)
    held_out = _small_images(seed=2)
    want = _output(model, held_out)

    def error(candidate):
        return np.linalg.norm(_output(candidate, held_out) - want) / np.linalg.norm(want)

    assert error(refit) < error(dropped)
