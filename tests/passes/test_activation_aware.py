"""Activation-aware fitting (input whitening on calibration data): exact structures stay exact
through the transform and its inverse, for every factorization and every kind of input
factor (dense conv, grouped conv, kh×1 conv, Gemm/MatMul on either side); on correlated
inputs it lowers the layer's error on the data; the record says which error ranked ranks."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes import get_pass

from onnxcompress import activation_scale, graph
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import run_model

N, C, H = 16, 12, 9


def correlated_batches(seed: int, shape: list[int], axis: int, count: int = 3):
    """Inputs whose channels (on `axis`) are strongly correlated and of unequal scale, so
    that whitening is far from the identity."""
    rng = np.random.default_rng(seed)
    channels = shape[axis]
    mixing = rng.standard_normal((channels, channels)) * np.geomspace(1, 0.02, channels)
    batches = []
    for _ in range(count):
        z = rng.standard_normal(shape)
        x = np.moveaxis(np.tensordot(mixing, np.moveaxis(z, axis, 0), axes=1), 0, axis)
        batches.append({"x": x.astype(np.float32)})
    return batches


def model_with(node: onnx.NodeProto, weights: dict, x_shape: list[int]) -> onnx.ModelProto:
    body = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    model = helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def conv_model(weight: np.ndarray, x_shape=(2, C, H, H), **attrs) -> onnx.ModelProto:
    bias = np.linspace(-1, 1, weight.shape[0])
    node = helper.make_node("Conv", ["x", "W", "B"], ["y"], name="conv", **attrs)
    return model_with(node, {"W": weight, "B": bias}, list(x_shape))


def low_rank(rng, rows: int, cols: int, rank: int) -> np.ndarray:
    return rng.standard_normal((rows, rank)) @ rng.standard_normal((rank, cols)) / np.sqrt(cols)


def structured_conv_weight(rng, pass_name: str, variant: str = "plain") -> np.ndarray:
    """A 3×3 weight exactly of the structure `pass_name` recovers at the options below."""
    if pass_name == "fga":  # rank 4 per group of 6 input channels (2 groups)
        blocks = [low_rank(rng, N, (C // 2) * 9, 4).reshape(N, C // 2, 3, 3) for _ in range(2)]
        return np.concatenate(blocks, axis=1)
    if pass_name == "tucker2":  # Tucker rank (5, 4) on the channel modes
        core = rng.standard_normal((5, 4, 3, 3))
        return np.einsum("no,oiab,ci->ncab", rng.standard_normal((N, 5)), core, low_rank_cols(rng))
    if pass_name == "cp":  # CP rank 6
        a, b, v, h = (rng.standard_normal((size, 6)) for size in (N, C, 3, 3))
        return np.einsum("nr,cr,ir,jr->ncij", a, b, v, h) / 6
    # svd, spatial form: the (c·kh) × (n·kw) unfolding has rank 5
    return low_rank(rng, C * 3, N * 3, 5).reshape(C, 3, N, 3).transpose(2, 0, 1, 3)


def low_rank_cols(rng) -> np.ndarray:
    return rng.standard_normal((C, 4))


EXACT_OPTIONS = {
    "fga": {"groups": 2, "rank": 4},
    "tucker2": {"rank_in": 4, "rank_out": 5},
    "cp": {"rank": 6, "l2_reg": 0.0},  # the ridge biases an exact fit
    "svd": {"rank": 5},
}


def compress_with(pass_name: str, model, batches, **options):
    spec = get_pass(pass_name)
    raw = {"never_slower": False, "refit": False, "activation_aware": True, **options}
    shapes = {"x": list(batches[0]["x"].shape)}
    return spec.run(model, spec.make_options(raw), PassContext(shapes, calibration=batches))


def outputs(model, batches) -> np.ndarray:
    return np.concatenate([next(iter(run_model(model, [b]).values())) for b in batches])


def rel_l2(a, b) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.mark.parametrize("pass_name", ["fga", "tucker2", "cp", "svd"])
def test_exact_structure_stays_exact_through_whitening(pass_name):
    rng = np.random.default_rng(3)
    model = conv_model(structured_conv_weight(rng, pass_name), pads=[1, 1, 1, 1])
    batches = correlated_batches(1, [2, C, H, H], axis=1)
    options = {**EXACT_OPTIONS[pass_name], **({"n_iter_max": 2000} if pass_name == "cp" else {})}
    result = compress_with(pass_name, model, batches, **options)
    assert result.changed
    assert result.summary["error_basis"].startswith("calibration data")
    graph.check_model(graph.cleanup_and_sort(result.model))
    before, after = outputs(model, batches), outputs(result.model, batches)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())


def test_fga_block_term_variant_absorbs_a_full_whitening():
    rng = np.random.default_rng(4)
    model = conv_model(structured_conv_weight(rng, "fga"), pads=[1, 1, 1, 1])
    batches = correlated_batches(2, [2, C, H, H], axis=1)
    result = compress_with("fga", model, batches, variant="btd", groups=1, rank=8)
    assert "full" in result.summary["error_basis"]
    plain = compress_with("fga", model, batches, groups=2, rank=4)
    assert "diagonal" in plain.summary["error_basis"]
    assert rel_l2(outputs(model, batches), outputs(result.model, batches)) < 1e-3


def linear_model(side: str, op: str, weight: np.ndarray, x_shape: list[int]):
    inputs = ["x", "W"] if side == "right" else ["W", "x"]
    node = helper.make_node(op, inputs, ["y"], name="linear")
    return model_with(node, {"W": weight}, x_shape)


@pytest.mark.parametrize(
    "side,op,x_shape,axis",
    [
        ("right", "MatMul", [2, 7, C], -1),
        ("right", "Gemm", [7, C], -1),
        ("left", "MatMul", [2, C, 7], -2),
    ],
)
def test_linear_layers_stay_exact_through_whitening(side, op, x_shape, axis):
    rng = np.random.default_rng(5)
    weight = low_rank(rng, C, N, 3) if side == "right" else low_rank(rng, N, C, 3)
    model = linear_model(side, op, weight, x_shape)
    batches = correlated_batches(6, x_shape, axis=axis)
    result = compress_with("svd", model, batches, rank=3)
    assert result.changed
    before, after = outputs(model, batches), outputs(result.model, batches)
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())


@pytest.mark.parametrize(
    "pass_name,options,kernel",
    [("tucker2", {"rank_in": 3, "rank_out": 4}, 3), ("svd", {"rank": 3}, 1)],
)
def test_whitening_lowers_the_error_on_the_calibration_data(pass_name, options, kernel):
    rng = np.random.default_rng(8)
    model = conv_model((rng.standard_normal((N, C, kernel, kernel)) / 6).astype(np.float32))
    batches = correlated_batches(9, [2, C, H, H], axis=1)
    aware = compress_with(pass_name, model, batches, **options)
    plain = compress_with(pass_name, model, batches, activation_aware=False, **options)
    assert plain.summary["error_basis"] == "weights"
    reference = outputs(model, batches)
    aware_error = rel_l2(reference, outputs(aware.model, batches))
    plain_error = rel_l2(reference, outputs(plain.model, batches))
    # Truncated SVD of W·T is optimal for the data error (1×1: no window correlations); Tucker's
    # HOSVD is not optimal either way, so only a clear gain is asked of it.
    assert aware_error < 0.9 * plain_error


def test_grouped_conv_refuses_a_full_transform():
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="g", group=2)
    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "W")
    with pytest.raises(RuntimeError, match="diagonal"):
        activation_scale.restore_inputs([node], [weight], "x", np.tril(np.ones((6, 6))))
