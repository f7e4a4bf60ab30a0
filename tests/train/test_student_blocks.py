"""The blocks of a compressed model: the nodes the original lacks, grown to the activation
after them (through a residual Add), each extracted as a model that computes in onnxruntime
what the student computes there; and where torch cannot run a block, a one-line refusal."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxcompress.passes import get_pass

from models.fixtures import mlp, resnet_style
from onnxcompress import graph, runtime
from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassContext
from onnxcompress.train.model_tensors import ModelTensors, between, joined
from onnxcompress.train.student_blocks import block_model, convertible_blocks, student_blocks

RESNET_SHAPES = {"input": [4, 3, 32, 32]}


def _ops(student, block) -> list[str]:
    return [student.graph.node[index].op_type for index in block.nodes]


@pytest.fixture(scope="module")
def mlp_pair():
    teacher = mlp()
    svd = get_pass("svd")
    options = svd.make_options({"rank": 4, "refit": False, "never_slower": False})
    student = svd.run(teacher, options, PassContext({"input": [32, 64]})).model
    return teacher, graph.cleanup_and_sort(student)


@pytest.fixture(scope="module")
def resnet_pair():
    teacher = resnet_style()
    fga = get_pass("fga")
    options = fga.make_options({"target_macs": 0.7, "refit": False, "never_slower": False})
    student = fga.run(teacher, options, PassContext(RESNET_SHAPES)).model
    return teacher, graph.cleanup_and_sort(student)


def test_a_factorized_layer_is_a_block_up_to_its_activation(mlp_pair):
    teacher, student = mlp_pair
    blocks = student_blocks(student, teacher)
    assert [block.name for block in blocks] == ["fc1.relu", "fc2.relu"]
    assert [block.inputs for block in blocks] == [("input",), ("fc1.relu",)]
    assert all(_ops(student, block) == ["Gemm", "Gemm", "Relu"] for block in blocks)
    assert all(block.rewritten == 2 for block in blocks)


def test_a_residual_block_grows_through_its_add_to_the_relu(resnet_pair):
    teacher, student = resnet_pair
    grown = [b for b in student_blocks(student, teacher) if "Add" in _ops(student, b)]
    assert grown
    for block in grown:
        assert _ops(student, block)[-3:] == ["BatchNormalization", "Add", "Relu"]
        assert len(block.inputs) == 2  # the branch's input and the shortcut
        assert block.name in {out for node in teacher.graph.node for out in node.output}


def test_the_original_has_no_blocks_and_a_changed_weight_makes_one():
    teacher = mlp()
    assert student_blocks(teacher, teacher) == []
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    weight = student.graph.initializer[0]
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 0.5, weight.name))
    (block,) = student_blocks(student, teacher)
    assert block.rewritten == 1 and weight.name in student.graph.node[block.nodes[0]].input


@pytest.mark.parametrize("pair", ["mlp_pair", "resnet_pair"])
def test_a_block_model_computes_what_the_student_computes_there(pair, request):
    teacher, student = request.getfixturevalue(pair)
    shape = RESNET_SHAPES["input"] if pair == "resnet_pair" else [32, 64]
    rng = np.random.default_rng(0)
    batches = [{"input": rng.standard_normal(shape).astype(np.float32)} for _ in range(2)]
    for block in student_blocks(student, teacher):
        everything = ModelTensors(student, batches, threads=1)  # from the graph inputs
        inputs = joined(everything.get(block.inputs))
        wanted = joined(ModelTensors(student, batches, threads=1).get(block.outputs))
        part = block_model(student, block)
        runtime.type_inputs(part, inputs)
        got = runtime.run_model(part, [inputs], threads=1)
        for name in block.outputs:
            np.testing.assert_allclose(got[name], wanted[name], rtol=1e-4, atol=1e-5)


def test_a_block_torch_cannot_run_is_refused_in_one_line(mlp_pair):
    teacher, student = mlp_pair
    quantized = _dequantized_weight(student, "fc2.svd_a")
    with pytest.raises(CompressError, match="DequantizeLinear") as caught:
        convertible_blocks(quantized, teacher)
    assert "\n" not in str(caught.value) and "fc2.relu" in str(caught.value)


def _dequantized_weight(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """`model` whose weight `name` is stored as int8 and dequantized in the graph, as a
    static int8 pass leaves it."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    (weight,) = [init for init in out.graph.initializer if init.name == name]
    values = numpy_helper.to_array(weight)
    scale = np.float32(np.abs(values).max() / 127)
    quantized = np.round(values / scale).astype(np.int8)
    weight.CopyFrom(numpy_helper.from_array(quantized, f"{name}.q"))
    out.graph.initializer.append(numpy_helper.from_array(np.array(scale), f"{name}.scale"))
    node = onnx.helper.make_node(
        "DequantizeLinear", [f"{name}.q", f"{name}.scale"], [name], name=f"{name}.dq"
    )
    out.graph.node.insert(0, node)
    return out


def test_tensors_computed_part_by_part_equal_those_computed_whole(resnet_pair):
    teacher, student = resnet_pair
    rng = np.random.default_rng(1)
    batches = [{"input": rng.standard_normal(RESNET_SHAPES["input"]).astype(np.float32)}]
    walked = ModelTensors(student, batches, threads=1)
    for block in student_blocks(student, teacher):
        walked.get(block.inputs)  # the next block starts from these
        walked.keep(set(block.inputs))
        part, fed = between(student, list(block.outputs), set(walked.known))
        assert len(part.graph.node) == len(block.nodes) and set(fed) == set(block.inputs)
        for name, value in walked.get(block.outputs).items():
            whole = ModelTensors(student, batches, threads=1).get((name,))[name]
            np.testing.assert_allclose(value[0], whole[0], rtol=1e-4, atol=1e-5)


def test_new_weights_forget_the_tensors_they_reach(mlp_pair):
    teacher, student = mlp_pair
    first, second = student_blocks(student, teacher)
    tensors = ModelTensors(student, [{"input": np.ones((2, 64), np.float32)}], threads=1)
    tensors.get(("fc1.relu", "fc2.relu"))
    tensors.changed(student, second.nodes)
    assert "fc1.relu" in tensors.known and "fc2.relu" not in tensors.known
    tensors.changed(student, first.nodes)
    assert set(tensors.known) == {"input"}


def _two_convs(width: int) -> onnx.ModelProto:
    """Conv (3 -> width channels) -> Relu -> Conv (width -> 8) -> Relu, seeded weights."""
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.standard_normal((8, 3, 3, 3))[:width],
        "w2": rng.standard_normal((8, 8, 3, 3))[:, :width],
    }
    nodes = [
        onnx.helper.make_node("Conv", ["input", "w1"], ["c1"], pads=[1, 1, 1, 1], name="c1"),
        onnx.helper.make_node("Relu", ["c1"], ["r1"], name="r1"),
        onnx.helper.make_node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1], name="c2"),
        onnx.helper.make_node("Relu", ["c2"], ["out"], name="r2"),
    ]
    body = onnx.helper.make_graph(
        nodes,
        "two_convs",
        [onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 3, 8, 8])],
        [onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [1, 8, 8, 8])],
        [numpy_helper.from_array(v.astype(np.float32), n) for n, v in weights.items()],
    )
    return onnx.helper.make_model(body, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_a_narrowed_tensor_is_inside_a_block_not_between_two():
    # Pruned channels: c1 and r1 keep their names but not their shapes, so no block ends there.
    student, teacher = _two_convs(4), _two_convs(8)
    (block,) = student_blocks(student, teacher)
    assert _ops(student, block) == ["Conv", "Relu", "Conv", "Relu"]
    assert block.inputs == ("input",) and block.outputs == ("out",)


def _dense(split: bool, bias: float) -> onnx.ModelProto:
    """MatMul (one weight, or two factors) -> Add bias -> Sigmoid, as DTLN's mask layer."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((6, 5)).astype(np.float32)
    weights = {"b": np.full(5, bias, np.float32)}
    if split:
        weights |= {"w.a": weight[:, :2], "w.b": np.eye(2, 5, dtype=np.float32)}
        nodes = [
            onnx.helper.make_node("MatMul", ["x", "w.a"], ["mid"], name="w.a"),
            onnx.helper.make_node("MatMul", ["mid", "w.b"], ["dense"], name="w.b"),
        ]
    else:
        weights["w"] = weight
        nodes = [onnx.helper.make_node("MatMul", ["x", "w"], ["dense"], name="w")]
    nodes += [
        onnx.helper.make_node("Add", ["dense", "b"], ["biased"], name="add"),
        onnx.helper.make_node("Sigmoid", ["biased"], ["mask"], name="mask"),
    ]
    body = onnx.helper.make_graph(
        nodes,
        "dense",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 6])],
        [onnx.helper.make_tensor_value_info("mask", onnx.TensorProto.FLOAT, ["n", 5])],
        [numpy_helper.from_array(v, n) for n, v in weights.items()],
    )
    return onnx.helper.make_model(body, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_a_refit_bias_after_the_factors_joins_their_block():
    # The original's `dense` is no target for the factors once the Add after them differs.
    (block,) = student_blocks(_dense(True, 0.5), _dense(False, 0.0))
    assert _ops(_dense(True, 0.5), block) == ["MatMul", "MatMul", "Add", "Sigmoid"]
    assert block.outputs == ("mask",) and block.rewritten == 3


def test_names_doc_strings_and_tensor_encodings_are_no_change():
    teacher = _dense(False, 0.0)
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    for node in student.graph.node:
        node.name, node.doc_string = f"renamed {node.name}", "a graph tool was here"
    weight = student.graph.initializer[0]
    values = numpy_helper.to_array(weight)
    typed = onnx.helper.make_tensor(weight.name, weight.data_type, values.shape, values.ravel())
    weight.CopyFrom(typed)  # float_data instead of raw_data
    assert student_blocks(student, teacher) == []
