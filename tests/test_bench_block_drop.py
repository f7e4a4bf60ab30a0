"""benchmarks/block_drop.py: which blocks it finds, that removing one computes what the
block with a zero branch computes (onnxruntime), and that the refit after it helps."""

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from benchmarks import block_drop
from models.fixtures import mobilenet_style, resnet_style
from onnxcompress import graph
from onnxcompress.passkit import PassContext
from onnxcompress.validate import run_model
from passes import get_pass

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
    (block,) = block_drop.identity_blocks(model)  # projection shortcuts are not identity
    made_by = graph.producers(model)
    assert block.add == add and (made_by[block.output].op_type == "Relu") == skips_relu
    dropped = block_drop.without_blocks(model, [block])
    graph.check_model(dropped)
    names = {n.name for n in dropped.graph.node}
    assert add not in names and branch_end not in names
    batches = _images(seed=3)
    want = _output(_zero_branch_end(model, branch_end), batches)
    np.testing.assert_allclose(_output(dropped, batches), want, rtol=1e-5, atol=1e-5)


def _two_blocks_in_a_row():
    """Relu, then two blocks Relu(Add(x, Conv1x1(x))), the second reading the first."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Relu", ["input"], ["x0"], name="stem")]
    weights = []
    for i in (1, 2):
        weights.append(
            numpy_helper.from_array(rng.standard_normal((4, 4, 1, 1), np.float32), f"w{i}")
        )
        nodes += [
            helper.make_node("Conv", [f"x{i - 1}", f"w{i}"], [f"c{i}"], name=f"conv{i}"),
            helper.make_node("Add", [f"x{i - 1}", f"c{i}"], [f"s{i}"], name=f"add{i}"),
            helper.make_node("Relu", [f"s{i}"], [f"x{i}"], name=f"relu{i}"),
        ]
    nodes.append(helper.make_node("Identity", ["x2"], ["output"], name="out"))
    value = helper.make_tensor_value_info
    io = [value(n, onnx.TensorProto.FLOAT, [1, 4, 5, 5]) for n in ("input", "output")]
    g = helper.make_graph(nodes, "two_blocks", [io[0]], [io[1]], weights)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_blocks_in_a_row_both_removed_leave_their_first_input():
    model = _two_blocks_in_a_row()
    blocks = block_drop.identity_blocks(model)
    assert [(b.add, b.input, b.output) for b in blocks] == [
        ("add1", "x0", "x1"),
        ("add2", "x1", "x2"),
    ]
    dropped = block_drop.without_blocks(model, blocks)
    graph.check_model(dropped)
    assert [n.name for n in dropped.graph.node] == ["stem", "out"]
    x = np.random.default_rng(1).standard_normal((1, 4, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(_output(dropped, [{"input": x}]), np.maximum(x, 0))


def test_refit_after_a_removed_block_lowers_the_output_error():
    model = _folded(resnet_style())
    calibration = _images(seed=1, count=4)
    context = PassContext(SHAPES, calibration=calibration, threads=1)
    (block,) = block_drop.identity_blocks(model)
    dropped = block_drop.without_blocks(model, [block])
    refit, count = block_drop.refit_after(model, dropped, context)
    assert count == 6  # stage2 and stage3: two branch convs and the projection each
    held_out = _images(seed=2)
    want = _output(model, held_out)

    def error(candidate):
        return np.linalg.norm(_output(candidate, held_out) - want) / np.linalg.norm(want)

    assert error(refit) < error(dropped)
