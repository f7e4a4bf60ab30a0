"""Padding-aware calibration rows: with an `attention_mask` input, the layer refit, the
activation second moments and the lrs data solver fit real tokens only. The models here put
real tokens in a rank-3 subspace and fill padding positions with large full-rank garbage, so
fits that count the padding rows visibly lose accuracy on the real tokens."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes import get_pass

from onnxcompress.activation_scale import input_second_moments
from onnxcompress.analyse import analyse
from onnxcompress.layer_refit import RefitSite, refit_layers
from onnxcompress.linear_layers import linear_layers
from onnxcompress.passkit import PassContext
from onnxcompress.patch_moments import input_moments
from onnxcompress.runtime import run_model
from onnxcompress.token_rows import MASK_INPUT, token_row_mask, token_rows

BATCH, SEQ, K, N, RANK = 4, 10, 8, 6, 3
SHAPES = {"x": [BATCH, SEQ, K], MASK_INPUT: [BATCH, SEQ]}


# -- the mask function ---------------------------------------------------------------------


def test_mask_is_the_flattened_attention_mask():
    mask = np.array([[1, 1, 0], [1, 0, 0]], dtype=np.int64)
    activation = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    got = token_row_mask({MASK_INPUT: mask}, activation)
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, [True, True, False, True, False, False])
    rows = token_rows({MASK_INPUT: mask}, activation)
    np.testing.assert_array_equal(rows, activation.reshape(-1, 4)[[0, 1, 3]])
    bool_mask = token_row_mask({MASK_INPUT: mask.astype(bool)}, activation)
    np.testing.assert_array_equal(bool_mask, got)


@pytest.mark.parametrize(
    "batch, shape",
    [
        ({}, (2, 3, 4)),  # no mask input
        ({"mask": np.ones((2, 3), np.int64)}, (2, 3, 4)),  # another name
        ({MASK_INPUT: np.ones((2, 3), np.int64)}, (6, 4)),  # 2-D activation (Gemm)
        ({MASK_INPUT: np.ones((2, 3), np.int64)}, (2, 3, 4, 5)),  # attention heads, conv
        ({MASK_INPUT: np.ones((2, 3), np.int64)}, (2, 4, 4)),  # dims differ
        ({MASK_INPUT: np.ones((2, 3), np.float32)}, (2, 3, 4)),  # float (additive) mask
        ({MASK_INPUT: np.full((2, 3), 2, np.int64)}, (2, 3, 4)),  # not 0/1
        ({MASK_INPUT: np.ones(6, np.int64)}, (2, 3, 4)),  # 1-D
    ],
)
def test_no_mask_when_the_batch_does_not_give_one(batch, shape):
    activation = np.zeros(shape, np.float32)
    assert token_row_mask(batch, activation) is None
    np.testing.assert_array_equal(token_rows(batch, activation), activation.reshape(-1, shape[-1]))


# -- a tiny token model --------------------------------------------------------------------


def _info(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def _model(weights: dict[str, np.ndarray], nodes, mask_name: str = MASK_INPUT):
    """x [B, S, K] and the 0/1 mask in; `y` (the layer) and the float mask out."""
    nodes = [*nodes, helper.make_node("Cast", [mask_name], ["mask_out"], to=TensorProto.FLOAT)]
    body = helper.make_graph(
        nodes,
        "tokens",
        [_info("x", TensorProto.FLOAT, SHAPES["x"]), _info(mask_name, TensorProto.INT64, None)],
        [_info("y", TensorProto.FLOAT, None), _info("mask_out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    body.input[1].type.tensor_type.shape.dim.add().dim_value = BATCH
    body.input[1].type.tensor_type.shape.dim.add().dim_value = SEQ
    model = helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return onnx.shape_inference.infer_shapes(model)


def _original(rng, mask_name=MASK_INPUT):
    w, b = rng.standard_normal((K, N)), rng.standard_normal(N)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="layer"),
        helper.make_node("Add", ["h", "bias"], ["y"], name="layer.bias"),
    ]
    return _model({"w": w, "bias": b}, nodes, mask_name), w


def _truncated(w, mask_name=MASK_INPUT):
    """x @ B @ A + bias with the rank-3 truncated SVD of W and a zero bias."""
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    nodes = [
        helper.make_node("MatMul", ["x", "b_factor"], ["z"], name="first"),
        helper.make_node("MatMul", ["z", "a_factor"], ["h"], name="second"),
        helper.make_node("Add", ["h", "bias"], ["y"], name="second.bias"),
    ]
    weights = {"b_factor": u[:, :RANK], "a_factor": s[:RANK, None] * vt[:RANK], "bias": np.zeros(N)}
    return _model(weights, nodes, mask_name)


def _batches(rng, count=2, mask_name=MASK_INPUT):
    """Real tokens x = u·P (rank 3, one P for all), padding rows 20× larger and full rank."""
    mixing = rng.standard_normal((RANK, K))
    batches = []
    for _ in range(count):
        lengths = rng.integers(3, SEQ, size=BATCH)
        mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
        real = rng.standard_normal((BATCH, SEQ, RANK)) @ mixing
        garbage = 20 * rng.standard_normal((BATCH, SEQ, K))
        x = np.where(mask[..., None] == 1, real, garbage).astype(np.float32)
        batches.append({"x": x, mask_name: mask})
    return batches


def _renamed(batches, name="mask"):
    return [{"x": b["x"], name: b[MASK_INPUT]} for b in batches]


def _valid_error(reference, candidate, batches, mask_name=MASK_INPUT) -> float:
    """Relative L2 of `candidate`'s y against `reference`'s on the real tokens only."""
    want, got = run_model(reference, batches)["y"], run_model(candidate, batches)["y"]
    valid = np.concatenate([b[mask_name].reshape(-1) for b in batches]).astype(bool)
    want, got = want.reshape(-1, N)[valid], got.reshape(-1, N)[valid]
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _refit(mask_name: str, batches):
    original, w = _original(np.random.default_rng(1), mask_name)
    rewritten = _truncated(w, mask_name)
    site = RefitSite("z", "y", "a_factor", "bias", "matmul")
    refit_layers(original, rewritten, [site], PassContext(SHAPES, calibration=batches))
    return original, rewritten, site


def test_refit_with_mask_recovers_the_real_token_outputs():
    batches = _batches(np.random.default_rng(0))
    original, rewritten, site = _refit(MASK_INPUT, batches)
    real_tokens = sum(int(b[MASK_INPUT].sum()) for b in batches)
    assert site.result["rows"] == real_tokens < 2 * BATCH * SEQ
    # On real tokens the layer is rank 3 in x, so the refit of A and the bias is exact.
    assert _valid_error(original, rewritten, batches) < 1e-4

    unmasked = _renamed(batches)
    original, plain, site = _refit("mask", unmasked)
    assert site.result["rows"] == 2 * BATCH * SEQ  # every position counted
    assert _valid_error(original, plain, unmasked, "mask") > 1e-2


def test_second_moments_count_real_tokens_only():
    batches = _batches(np.random.default_rng(0))
    model, _ = _original(np.random.default_rng(1))
    layers, _ = linear_layers(model, analyse(model, SHAPES))
    context = PassContext(SHAPES, calibration=batches)
    rows = np.concatenate([b["x"].reshape(-1, K)[b[MASK_INPUT].reshape(-1) == 1] for b in batches])
    expected = rows.astype(np.float64).T @ rows / len(rows)
    moment = input_second_moments(model, layers, context)["layer"]
    np.testing.assert_allclose(moment, expected, rtol=1e-5, atol=1e-6)
    # Real tokens span 3 dims: their moment has rank 3 (with padding it would be full rank).
    assert np.linalg.matrix_rank(moment, tol=1e-6 * np.abs(moment).max()) == RANK
    lrs_moment, _ = input_moments(model, layers, context)
    np.testing.assert_allclose(lrs_moment["layer"], expected, rtol=1e-5, atol=1e-6)


def test_second_moments_without_mask_count_every_position():
    batches = _renamed(_batches(np.random.default_rng(0)))
    model, _ = _original(np.random.default_rng(1), "mask")
    layers, _ = linear_layers(model, analyse(model, {"x": SHAPES["x"], "mask": [BATCH, SEQ]}))
    context = PassContext({"x": SHAPES["x"], "mask": [BATCH, SEQ]}, calibration=batches)
    rows = np.concatenate([b["x"].reshape(-1, K) for b in batches]).astype(np.float64)
    moment = input_second_moments(model, layers, context)["layer"]
    np.testing.assert_allclose(moment, rows.T @ rows / len(rows), rtol=1e-5, atol=1e-6)
    assert np.linalg.matrix_rank(moment) == K


@pytest.mark.parametrize("name", ["svd", "lrs"])
def test_passes_fit_real_tokens_with_the_mask(name):
    """End to end: the same rank-3 rewrite, calibrated with and without the mask."""
    options = {"rank": RANK, "never_slower": False}
    if name == "svd":
        options["activation_aware"] = True
    else:
        options["sparsity"] = 1.0  # plain low rank, fitted on the data second moments
    errors = {}
    for mask_name in (MASK_INPUT, "mask"):
        batches = _batches(np.random.default_rng(0), mask_name=mask_name)
        shapes = {"x": SHAPES["x"], mask_name: [BATCH, SEQ]}
        original, _ = _original(np.random.default_rng(1), mask_name)
        spec = get_pass(name)
        context = PassContext(shapes, calibration=batches)
        result = spec.run(original, spec.make_options(options), context)
        assert result.changed
        errors[mask_name] = _valid_error(original, result.model, batches, mask_name)
    assert errors[MASK_INPUT] < 1e-3
    assert errors["mask"] > 10 * errors[MASK_INPUT]
