"""Channel dependency groups on tiny models built here: structure first (groups, producers,
consumers, reasons), then numbers: the pruned graph must compute exactly what the original
computes when its consumers ignore the removed channels (zeroed weight columns)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import graph
from onnxcompress.channels.graph import build_channel_graph
from onnxcompress.channels.importance import keep_mask, kept_count
from onnxcompress.channels.surgery import prune_channels, zero_removed_inputs
from onnxcompress.runtime import run_model
from onnxcompress.validate import random_inputs

SHAPE = [2, 3, 8, 8]


class Tiny:
    """A few ops with seeded weights; every helper returns its output tensor's name."""

    def __init__(self, seed: int = 0, opset: int = 17):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.opset = [], [], opset

    def const(self, name: str, value) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, name: str, inputs: list[str], outputs=None, **attrs) -> str:
        outputs = outputs or [name]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=name, **attrs))
        return outputs[0]

    def conv(self, name, x, cin, cout, k=3, group=1, bias=True, stride=1) -> str:
        w = self.rng.normal(0, 0.3, (cout, cin // group, k, k)).astype(np.float32)
        inputs = [x, self.const(f"{name}.w", w)]
        if bias:
            inputs.append(self.const(f"{name}.b", self.rng.normal(0, 0.1, cout).astype(np.float32)))
        return self.op(
            "Conv",
            name,
            inputs,
            kernel_shape=[k, k],
            pads=[k // 2] * 4,
            group=group,
            strides=[stride, stride],
        )

    def relu(self, name, x) -> str:
        return self.op("Relu", name, [x])

    def gemm(self, name, x, cin, cout, out=None, **attrs) -> str:
        shape = (cout, cin) if attrs.get("transB") else (cin, cout)
        w = self.const(f"{name}.w", self.rng.normal(0, 0.2, shape).astype(np.float32))
        b = self.const(f"{name}.b", self.rng.normal(0, 0.1, cout).astype(np.float32))
        return self.op("Gemm", name, [x, w, b], [out or name], **attrs)

    def head(self, x, channels, out="logits") -> str:
        pooled = self.op("GlobalAveragePool", "pool", [x])
        flat = self.op("Flatten", "flatten", [pooled], axis=1)
        return self.gemm("fc", flat, channels, 5, out=out, transB=1)

    def model(self, outputs: dict[str, list], shape=SHAPE) -> onnx.ModelProto:
        g = helper.make_graph(
            self.nodes,
            "tiny",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()],
            initializer=self.inits,
        )
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)])
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        return m


def groups_by_name(model):
    cg = build_channel_graph(model, {"x": SHAPE})
    return cg, {g.name: g for g in cg.groups}


def node_names(model, indices):
    return [model.graph.node[i].name for i in indices]


def prune_and_compare(model, ratio=0.5, seed=0, only=None):
    """Prune every prunable group (or those named in `only`) with random keep-masks; the result
    must pass the checker and match the zeroed reference; returns (graph, keep, pruned)."""
    cg = build_channel_graph(model, {"x": SHAPE})
    rng = np.random.default_rng(seed)
    keep = {}
    for group in cg.groups:
        if group.prunable and (only is None or group.name in only):
            count = kept_count(group.channels, ratio, round_to=1, blocks=group.blocks)
            keep[group.id] = keep_mask(
                rng.random(group.channels), count, group.blocks, group.keep_ranges
            )
    assert keep, "nothing to prune"
    pruned = graph.cleanup_and_sort(prune_channels(model, cg, keep))
    graph.check_model(pruned)
    reference = zero_removed_inputs(model, cg, keep)
    batches = random_inputs(model, {"x": SHAPE}, count=2, seed=seed)
    expected, got = run_model(reference, batches), run_model(pruned, batches)
    original = run_model(model, batches)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5)
        # the reference really differs from the original: the comparison can fail
        assert not np.allclose(original[name], expected[name], atol=1e-4)
    return cg, keep, pruned


def weight_shape(model, name):
    node = next(n for n in model.graph.node if n.name == name)
    return list(graph.constant_tensors(model)[node.input[1]].shape)


# ---------------------------------------------------------------- the brief's cases


def test_plain_chain_one_group_per_conv_and_head_unprunable():
    t = Tiny()
    y = t.relu("r1", t.conv("c1", "x", 3, 8))
    y = t.relu("r2", t.conv("c2", y, 8, 16))
    model = t.model({t.head(y, 16): [2, 5]})
    cg, groups = groups_by_name(model)
    assert sorted(groups) == ["c1", "c2", "fc"]
    assert node_names(model, groups["c1"].consumers) == ["c2"]
    assert node_names(model, groups["c2"].consumers) == ["fc"]
    assert groups["c1"].prunable and groups["c2"].prunable
    assert groups["fc"].reasons == ["reaches graph output 'logits'"]
    _, _, pruned = prune_and_compare(model)
    assert weight_shape(pruned, "c1") == [4, 3, 3, 3]
    assert weight_shape(pruned, "c2") == [8, 4, 3, 3]
    assert weight_shape(pruned, "fc") == [5, 8]


def test_residual_add_ties_both_producers_into_one_group():
    t = Tiny()
    a = t.conv("a", "x", 3, 8)
    b = t.relu("rb", t.conv("b2", t.relu("rb1", t.conv("b1", "x", 3, 4)), 4, 8))
    y = t.relu("r", t.op("Add", "add", [a, b]))
    model = t.model({t.head(t.conv("c", y, 8, 8), 8): [2, 5]})
    _, groups = groups_by_name(model)
    assert sorted(groups) == ["a+b2", "b1", "c", "fc"]
    assert node_names(model, groups["a+b2"].producers) == ["a", "b2"]
    assert node_names(model, groups["a+b2"].consumers) == ["c"]
    _, _, pruned = prune_and_compare(model)
    assert weight_shape(pruned, "a")[0] == weight_shape(pruned, "b2")[0] == 4


def test_depthwise_conv_ties_its_input_and_output_channels():
    t = Tiny()
    y = t.relu("r1", t.conv("c1", "x", 3, 8))
    y = t.relu("r2", t.conv("dw", y, 8, 8, group=8))
    model = t.model({t.head(t.conv("c2", y, 8, 8, k=1), 8): [2, 5]})
    _, groups = groups_by_name(model)
    assert "dw" not in groups  # not a producer: its channels are c1's
    assert node_names(model, groups["c1"].consumers) == ["c2"]
    assert model.graph.node[2].name == "dw" and 2 in groups["c1"].nodes
    _, _, pruned = prune_and_compare(model, only={"c1"})
    dw = next(n for n in pruned.graph.node if n.name == "dw")
    assert weight_shape(pruned, "dw") == [4, 1, 3, 3]
    assert graph.node_attributes(dw)["group"] == 4


def test_concat_maps_each_input_to_its_channel_offsets():
    t = Tiny()
    a = t.relu("ra", t.conv("a", "x", 3, 4))
    b = t.relu("rb", t.conv("b", "x", 3, 8))
    y = t.op("Concat", "cat", [a, "x", b], axis=1)  # x: 3 channels no group owns
    model = t.model({t.head(t.conv("c", y, 15, 8), 8): [2, 5]})
    cg, groups = groups_by_name(model)
    segments = cg.layouts["cat"].segments
    assert [(s.start, s.length) for s in segments] == [(0, 4), (0, 3), (0, 8)]
    assert segments[1].space is None
    assert node_names(model, groups["a"].consumers) == node_names(model, groups["b"].consumers)
    _, keep, pruned = prune_and_compare(model)
    kept = int(keep[groups["a"].id].sum() + keep[groups["b"].id].sum())
    assert weight_shape(pruned, "c")[1] == kept + 3


def test_split_on_channels_keeps_a_channel_in_each_part():
    t = Tiny()
    y = t.relu("r", t.conv("c1", "x", 3, 12))
    sizes = t.const("sizes", np.array([4, 8], dtype=np.int64))
    t.op("Split", "split", [y, sizes], ["left", "right"], axis=1)
    left, right = "left", "right"
    y = t.op("Concat", "cat", [t.conv("cl", left, 4, 8), t.conv("cr", right, 8, 8)], axis=1)
    model = t.model({t.head(y, 16): [2, 5]})
    cg, groups = groups_by_name(model)
    assert node_names(model, groups["c1"].consumers) == ["cl", "cr"]
    assert groups["c1"].keep_ranges == [(0, 4), (4, 8)]
    assert cg.layouts["right"].segments[0].start == 4
    _, keep, pruned = prune_and_compare(model, only={"c1"}, ratio=0.75)
    mask = keep[groups["c1"].id]
    split = next(n for n in pruned.graph.node if n.op_type == "Split")
    new_sizes = graph.constant_tensors(pruned)[split.input[1]].tolist()
    assert new_sizes == [int(mask[:4].sum()), int(mask[4:].sum())] and min(new_sizes) >= 1


def test_flatten_to_gemm_removes_blocks_of_columns():
    t = Tiny()
    y = t.relu("r", t.conv("c1", "x", 3, 6, stride=2))  # [2, 6, 4, 4]
    flat = t.op("Flatten", "flat", [y], axis=1)
    model = t.model({t.gemm("fc", flat, 96, 5, out="logits"): [2, 5]})
    cg, groups = groups_by_name(model)
    assert cg.layouts["flat"].repeat == 16
    assert node_names(model, groups["c1"].consumers) == ["fc"]
    _, keep, pruned = prune_and_compare(model)
    assert weight_shape(pruned, "fc") == [16 * int(keep[groups["c1"].id].sum()), 5]


def test_reshape_that_flattens_is_followed_and_its_shape_rewritten():
    t = Tiny()
    y = t.relu("r", t.conv("c1", "x", 3, 6, stride=2))
    flat = t.op("Reshape", "flat", [y, t.const("shape", np.array([-1, 96], np.int64))])
    model = t.model({t.gemm("fc", flat, 96, 5, out="logits"): [2, 5]})
    _, keep, pruned = prune_and_compare(model)
    reshape = next(n for n in pruned.graph.node if n.op_type == "Reshape")
    kept = int(next(iter(keep.values())).sum())
    assert graph.constant_tensors(pruned)[reshape.input[1]].tolist() == [-1, 16 * kept]


def test_reshape_that_is_not_a_flatten_makes_the_group_unprunable():
    t = Tiny()
    y = t.conv("c1", "x", 3, 8)
    y = t.op("Reshape", "split_heads", [y, t.const("shape", np.array([2, 2, 4, 64], np.int64))])
    y = t.op("Reshape", "back", [y, t.const("back_shape", np.array([2, 8, 8, 8], np.int64))])
    model = t.model({t.head(t.conv("c2", y, 8, 8), 8): [2, 5]})
    _, groups = groups_by_name(model)
    assert not groups["c1"].prunable
    assert (
        "Reshape 'split_heads': it is not a flatten of the channel axis" in groups["c1"].reasons[0]
    )
    assert groups["c2"].prunable


def test_a_path_to_a_graph_output_makes_the_group_unprunable():
    t = Tiny()
    y = t.relu("r1", t.conv("c1", "x", 3, 8))
    features = t.op("Identity", "features", [y])
    model = t.model({t.head(t.conv("c2", y, 8, 8), 8): [2, 5], features: [2, 8, 8, 8]})
    _, groups = groups_by_name(model)
    assert groups["c1"].reasons == ["reaches graph output 'features'"]


def test_per_channel_mul_and_add_constants_are_sliced():
    t = Tiny()
    y = t.conv("c1", "x", 3, 8)
    y = t.op(
        "Mul", "scale", [y, t.const("s", np.linspace(0.5, 2, 8, dtype=np.float32)[:, None, None])]
    )
    y = t.op("Add", "shift", [t.const("h", np.arange(8, dtype=np.float32).reshape(1, 8, 1, 1)), y])
    y = t.op("Mul", "half", [y, t.const("k", np.array(0.5, np.float32))])  # scalar: untouched
    model = t.model({t.head(t.conv("c2", t.relu("r", y), 8, 8), 8): [2, 5]})
    _, _, pruned = prune_and_compare(model, only={"c1"})
    constants = graph.constant_tensors(pruned)
    by_name = {n.name: n for n in pruned.graph.node}
    assert constants[by_name["scale"].input[1]].shape == (4, 1, 1)
    assert constants[by_name["shift"].input[0]].shape == (1, 4, 1, 1)
    assert constants[by_name["half"].input[1]].shape == ()


# ---------------------------------------------------------------- more couplings and refusals


def test_batchnorm_prelu_pool_and_pad_pass_channels_through():
    t = Tiny()
    y = t.conv("c1", "x", 3, 8)
    bn = [
        t.const(f"bn.{k}", v)
        for k, v in (
            ("g", np.linspace(0.5, 1.5, 8)),
            ("b", np.linspace(-0.1, 0.1, 8)),
            ("m", np.linspace(-0.2, 0.2, 8)),
            ("v", np.linspace(0.5, 2, 8)),
        )
    ]
    y = t.op("BatchNormalization", "bn", [y, *[n for n in bn]])
    y = t.op("PRelu", "prelu", [y, t.const("slope", np.full((8, 1, 1), 0.1, np.float32))])
    y = t.op("MaxPool", "pool2", [y], kernel_shape=[2, 2], strides=[2, 2])
    y = t.op("Pad", "pad", [y, t.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))])
    model = t.model({t.head(t.conv("c2", y, 8, 8), 8): [2, 5]})
    for init in model.graph.initializer:
        if init.name.startswith("bn."):
            init.CopyFrom(
                numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float32), init.name)
            )
    _, _, pruned = prune_and_compare(model, only={"c1"})
    assert weight_shape(pruned, "c2")[1] == 4


def test_grouped_conv_prunes_the_same_count_in_every_group():
    t = Tiny()
    y = t.relu("r1", t.conv("c1", "x", 3, 8))
    y = t.relu("r2", t.conv("g2", y, 8, 8, group=2))
    model = t.model({t.head(t.conv("c3", y, 8, 8), 8): [2, 5]})
    _, groups = groups_by_name(model)
    assert groups["c1"].blocks == 2 and groups["g2"].blocks == 2
    _, keep, pruned = prune_and_compare(model)
    for name in ("c1", "g2"):
        mask = keep[groups[name].id]
        assert mask[:4].sum() == mask[4:].sum() == 2
    assert weight_shape(pruned, "g2") == [4, 2, 3, 3]


def test_slice_transpose_and_matmul_follow_the_channel_axis():
    t = Tiny()
    y = t.relu("r", t.conv("c1", "x", 3, 12))
    y = t.op(
        "Slice",
        "slice",
        [
            y,
            t.const("st", np.array([2], np.int64)),
            t.const("en", np.array([10], np.int64)),
            t.const("ax", np.array([1], np.int64)),
        ],
    )
    y = t.op("GlobalAveragePool", "gap", [y])
    y = t.op("Transpose", "nhwc", [y], perm=[0, 2, 3, 1])  # [2, 1, 1, 8]
    w = t.const("proj", np.random.default_rng(1).normal(0, 0.3, (8, 5)).astype(np.float32))
    model = t.model({t.op("MatMul", "proj_mm", [y, w], ["out"]): [2, 1, 1, 5]})
    cg, groups = groups_by_name(model)
    assert cg.layouts["nhwc"].axis == 3
    assert groups["c1"].keep_ranges == [(2, 8)]
    _, keep, pruned = prune_and_compare(model, only={"c1"})
    assert weight_shape(pruned, "proj_mm")[0] == int(keep[groups["c1"].id][2:10].sum())


def test_unknown_op_non_constant_weight_and_graph_input_add_are_refused():
    t = Tiny()
    y = t.op("LRN", "lrn", [t.conv("c1", "x", 3, 8)], size=3)
    z = t.op("Add", "add_input", [t.conv("c2", "x", 3, 3, k=1), "x"])
    w = t.op("Identity", "w_copy", [t.const("w3", np.ones((4, 3, 1, 1), np.float32))])
    u = t.op("Conv", "c3", [t.relu("r", t.conv("c4", z, 3, 3, k=1)), w], kernel_shape=[1, 1])
    outputs = {t.head(t.conv("c5", y, 8, 8), 8): [2, 5], u: [2, 4, 8, 8]}
    model = t.model(outputs)
    _, groups = groups_by_name(model)
    assert "LRN 'lrn', an op the walk does not understand" in groups["c1"].reasons[0]
    assert "ties these channels to 'x'" in groups["c2"].reasons[0]
    assert "Conv 'c3': its weight is not constant" in groups["c4"].reasons[0]
    assert "c3" not in groups  # a producer with a computed weight starts no group


def test_add_of_misaligned_channel_ranges_is_refused():
    t = Tiny()
    a, b = t.conv("a", "x", 3, 4), t.conv("b", "x", 3, 4)
    cat = t.op("Concat", "cat", [a, b], axis=1)
    y = t.op("Add", "add", [cat, t.conv("c", "x", 3, 8)])
    model = t.model({t.head(t.conv("d", y, 8, 8), 8): [2, 5]})
    _, groups = groups_by_name(model)
    for name in ("a", "b", "c"):
        assert "ties channel ranges that do not line up" in groups[name].reasons[0]


@pytest.mark.parametrize("opset", [11, 17])
def test_equal_split_without_sizes_and_old_opsets(opset):
    t = Tiny(opset=opset)
    y = t.relu("r", t.conv("c1", "x", 3, 8))
    t.op("Split", "split", [y], ["left", "right"], axis=1)
    left, right = "left", "right"
    y = t.op("Add", "add", [t.conv("cl", left, 4, 4), t.conv("cr", right, 4, 4)])
    model = t.model({t.head(y, 4): [2, 5]})
    _, groups = groups_by_name(model)
    assert groups["cl+cr"].prunable and groups["c1"].prunable
    prune_and_compare(model, ratio=0.5, seed=3)


def test_conv_transpose_resize_instance_norm_and_unsqueeze():
    t = Tiny()
    y = t.relu("r1", t.conv("c1", "x", 3, 8, stride=2))  # [2, 8, 4, 4]
    w = t.const("up.w", np.random.default_rng(2).normal(0, 0.3, (8, 6, 2, 2)).astype(np.float32))
    y = t.op(
        "ConvTranspose",
        "up",
        [y, w, t.const("up.b", np.zeros(6, np.float32))],
        strides=[2, 2],
        kernel_shape=[2, 2],
    )  # [2, 6, 8, 8]
    y = t.op(
        "InstanceNormalization",
        "inorm",
        [y, t.const("in.s", np.ones(6, np.float32)), t.const("in.b", np.full(6, 0.1, np.float32))],
    )
    y = t.op(
        "Resize",
        "resize",
        [y, "", "", t.const("sizes", np.array([2, 6, 16, 16], np.int64))],
        mode="nearest",
    )
    y = t.op("Unsqueeze", "unsq", [y, t.const("ax", np.array([2], np.int64))])  # [2, 6, 1, 16, 16]
    y = t.op("Squeeze", "sq", [y, t.const("ax2", np.array([2], np.int64))])
    model = t.model({t.head(t.conv("c2", y, 6, 8), 8): [2, 5]})
    cg, groups = groups_by_name(model)
    assert node_names(model, groups["c1"].consumers) == ["up"]
    assert node_names(model, groups["up"].consumers) == ["c2"]
    assert cg.layouts["unsq"].axis == 1 and cg.layouts["unsq"].rank == 5
    _, keep, pruned = prune_and_compare(model)
    resize = next(n for n in pruned.graph.node if n.op_type == "Resize")
    kept = int(keep[groups["up"].id].sum())
    assert graph.constant_tensors(pruned)[resize.input[3]].tolist() == [2, kept, 16, 16]
    assert weight_shape(pruned, "up") == [4, kept, 2, 2]


def test_gemm_with_transposed_input_reads_channels_on_axis_zero():
    t = Tiny()
    y = t.relu("r", t.conv("c1", "x", 3, 8))
    y = t.op("Flatten", "flat", [t.op("GlobalAveragePool", "gap", [y])], axis=1)  # [2, 8]
    y = t.op("Transpose", "t", [y], perm=[1, 0])  # [8, 2]
    model = t.model({t.gemm("fc", y, 8, 5, out="logits", transA=1, transB=1): [2, 5]})
    _, groups = groups_by_name(model)
    assert node_names(model, groups["c1"].consumers) == ["fc"]
    _, _, pruned = prune_and_compare(model)
    assert weight_shape(pruned, "fc") == [5, 4]
