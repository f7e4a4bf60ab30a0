"""write_back puts a TorchGraph's parameters into the graph they came from, by tensor name:
an untouched module gives the same bytes, one changed parameter changes one tensor only (in
its type and storage field), weights held in Constant nodes round-trip, and gradients reach
every trainable parameter."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

torch = pytest.importorskip("torch")

from onnxcompress import io  # noqa: E402
from onnxcompress.errors import CompressError  # noqa: E402
from onnxcompress.train import TorchGraph, default_trainable, write_back  # noqa: E402
from tests.conftest import REPO, shared_model  # noqa: E402
from tests.train.torch_check import onnxruntime_outputs, torch_outputs  # noqa: E402

SHARED_NAMES = [
    "resnet20_cifar10.onnx",
    "squeezenet1.0_fp16.onnx",
    "ppocr_mobile_v2.0_cls.onnx",
    "ultraface_rfb_320.onnx",
    "mnist_cntk.onnx",
]


def check_strictly(model: onnx.ModelProto) -> None:
    onnx.checker.check_model(model, full_check=True)
    onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def stored(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    found = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute[0].name == "value":
            found[node.output[0]] = node.attribute[0].t
    return found


@pytest.mark.parametrize("name", SHARED_NAMES)
def test_an_untouched_module_writes_back_the_same_bytes(name):
    model = io.load_model(shared_model(name))
    module = TorchGraph(model)
    assert module.names  # something to write
    assert write_back(model, module).SerializeToString() == model.SerializeToString()


@pytest.mark.parametrize("name", ["resnet20_cifar10.onnx", "squeezenet1.0_fp16.onnx"])
def test_one_changed_parameter_changes_that_initializer_only(name):
    model = io.load_model(shared_model(name))
    module = TorchGraph(model)
    qualified, tensor_name = next(iter(module.names.items()))
    parameter = dict(module.named_parameters())[qualified]
    with torch.no_grad():
        parameter.add_(0.25)
    written = write_back(model, module)
    before, after = stored(model), stored(written)
    changed = [n for n in before if before[n].SerializeToString() != after[n].SerializeToString()]
    assert changed == [tensor_name]
    old, new = numpy_helper.to_array(before[tensor_name]), numpy_helper.to_array(after[tensor_name])
    assert new.dtype == old.dtype and new.shape == old.shape
    np.testing.assert_allclose(new, old.astype(np.float32) + 0.25, rtol=1e-3)
    assert list(written.graph.node) == list(model.graph.node)
    assert [i.name for i in written.graph.initializer] == [i.name for i in model.graph.initializer]
    check_strictly(written)


def test_weights_in_constant_nodes_round_trip():
    """ppocr keeps its weights in Constant nodes: they become parameters, and trained values
    go back into the same Constant nodes, which onnxruntime then runs."""
    model = io.load_model(shared_model("ppocr_mobile_v2.0_cls.onnx"))
    assert not model.graph.initializer
    module = TorchGraph(model)
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    weight = module.parameter(conv.input[1])
    assert weight.requires_grad
    with torch.no_grad():
        weight.mul_(0.5)
    written = write_back(model, module)
    check_strictly(written)
    changed = numpy_helper.to_array(stored(written)[conv.input[1]])
    np.testing.assert_array_equal(changed, weight.detach().numpy())
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 48, 192)).astype("float32")}
    ours = torch_outputs(written, feeds, module)
    theirs = onnxruntime_outputs(written, feeds)
    np.testing.assert_allclose(ours["softmax_0.tmp_0"], theirs["softmax_0.tmp_0"], atol=1e-5)


def test_values_stored_as_typed_lists_stay_typed_lists():
    """A tensor stored in float_data (not raw bytes) keeps that field: same bytes when
    untouched, the new values when changed."""
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    init = helper.make_tensor("w", TensorProto.FLOAT, [2, 3], weight.reshape(-1), raw=False)
    half = helper.make_tensor("h", TensorProto.FLOAT16, [2], np.array([1, 2], np.float16))
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["y"]),
            helper.make_node("Cast", ["h"], ["hc"], to=1),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3]),
            helper.make_tensor_value_info("hc", TensorProto.FLOAT, [2]),
        ],
        [init, half],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    module = TorchGraph(model, trainable={"w", "h"})
    assert write_back(model, module).SerializeToString() == model.SerializeToString()
    with torch.no_grad():
        module.parameter("w").fill_(1.5)
        module.parameter("h").fill_(3.0)
    written = stored(write_back(model, module))
    assert not written["w"].raw_data and list(written["w"].float_data) == [1.5] * 6
    assert numpy_helper.to_array(written["h"]).tolist() == [3.0, 3.0]


def test_write_back_refuses_a_changed_shape():
    model = io.load_model(shared_model("mnist_cntk.onnx"))
    module = TorchGraph(model)
    key = next(iter(module.names)).split(".", 1)[1]
    module.weights[key] = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(CompressError, match="never shapes"):
        write_back(model, module)


@pytest.mark.parametrize("name", ["resnet20_cifar10.onnx", "ppocr_mobile_v2.0_cls.onnx"])
def test_gradients_reach_every_trainable_parameter(name):
    model = io.load_model(shared_model(name))
    module = TorchGraph(model)
    shape = [2, 3, 32, 32] if "resnet" in name else [2, 3, 48, 192]
    x = torch.from_numpy(np.random.default_rng(0).standard_normal(shape).astype("float32"))
    output = module(x)
    weights = torch.from_numpy(
        np.random.default_rng(1).standard_normal(output.shape).astype("float32")
    )
    (output * weights).sum().backward()
    trainable = {q: p for q, p in module.named_parameters() if p.requires_grad}
    assert len(trainable) == len(default_trainable(model))
    silent = [q for q, p in trainable.items() if p.grad is None or not p.grad.abs().sum() > 0]
    assert silent == []
    frozen = [p for p in module.parameters() if not p.requires_grad]
    assert all(p.grad is None for p in frozen)


def test_the_default_rule_trains_layers_not_activation_constants():
    """MiniLM-style: MatMul weight and its bias Add, LayerNorm scale and bias; not GELU's
    0.5 or the attention scale, nor hard-swish's +3 after a BatchNormalization."""
    model = onnx.load(REPO / "models" / "transformer_block.onnx")
    chosen = default_trainable(model)
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul"]
    weights = {n.input[1] for n in matmuls if n.input[1] in chosen}
    assert len(weights) == 6  # q, k, v, output projection, two FFN layers
    divide = next(n for n in model.graph.node if n.op_type == "Div")
    assert divide.input[1] not in chosen
    norms = [n for n in model.graph.node if n.op_type == "LayerNormalization"]
    assert all(n.input[1] in chosen and n.input[2] in chosen for n in norms)
    ppocr = io.load_model(shared_model("ppocr_mobile_v2.0_cls.onnx"))
    chosen = default_trainable(ppocr)
    constants = {n.output[0]: n for n in ppocr.graph.node if n.op_type == "Constant"}
    batch_norms = {n.output[0] for n in ppocr.graph.node if n.op_type == "BatchNormalization"}
    plus_three = [
        n
        for n in ppocr.graph.node
        if n.op_type == "Add" and n.input[0] in batch_norms and n.input[1] in constants
    ]
    assert plus_three and all(n.input[1] not in chosen for n in plus_three)


def test_trainable_by_names_or_predicate():
    model = io.load_model(shared_model("resnet20_cifar10.onnx"))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    only_head = TorchGraph(model, trainable={gemm.input[1], gemm.input[2]})
    assert sum(p.requires_grad for p in only_head.parameters()) == 2
    assert only_head.parameter(gemm.input[1]).requires_grad
    none = TorchGraph(model, trainable=lambda name: False)
    assert not any(p.requires_grad for p in none.parameters())
    with pytest.raises(CompressError, match="not a float weight"):
        TorchGraph(model, trainable={"no such tensor"})


def test_a_trained_module_written_back_runs_in_onnxruntime_as_trained():
    """The distill loop in small: a few optimizer steps on svd's ResNet-20 towards the
    original's logits, write_back, and onnxruntime on the written graph gives the trained
    module's outputs; only the trained tensors changed."""
    from onnxcompress.passkit import PassContext
    from onnxcompress.registry import get_pass

    teacher = io.load_model(shared_model("resnet20_cifar10.onnx"))
    spec = get_pass("svd")
    context = PassContext({"input": [2, 3, 32, 32]})
    student = spec.run(teacher, spec.make_options({"target_macs": 0.5}), context).model
    teacher_module, module = TorchGraph(teacher), TorchGraph(student)
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype("f4"))
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-3)
    with torch.no_grad():
        target = teacher_module(x)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(module(x), target).backward()
        optimizer.step()
    written = write_back(student, module)
    check_strictly(written)
    feeds = {"input": x.numpy()}
    theirs = onnxruntime_outputs(written, feeds)["logits"]
    with torch.no_grad():
        ours = module(x).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not np.allclose(theirs, onnxruntime_outputs(student, feeds)["logits"], atol=1e-6)
    before, after = stored(student), stored(written)
    changed = {n for n in before if before[n].SerializeToString() != after[n].SerializeToString()}
    assert changed and changed <= default_trainable(student)
