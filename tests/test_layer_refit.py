"""The refit's im2col rows: a Conv computed as weight (n, k·kh·kw) times the patches equals
onnxruntime's Conv for every geometry the factorized layers write."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.maths.patches import conv_patches
from onnxcompress.runtime import run_model

GEOMETRIES = [
    ((3, 3), {"strides": [1, 1], "pads": [1, 1, 1, 1], "dilations": [1, 1]}),
    ((1, 5), {"strides": [1, 2], "pads": [0, 2, 0, 1], "dilations": [1, 1]}),
    ((3, 1), {"strides": [2, 1], "pads": [2, 0, 1, 0], "dilations": [2, 1]}),
    ((2, 3), {"strides": [2, 3], "pads": [0, 1, 1, 0], "dilations": [1, 2]}),
]


@pytest.mark.parametrize("kernel, geometry", GEOMETRIES)
def test_patches_times_weight_is_the_conv(kernel, geometry):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 9, 11)).astype(np.float32)
    w = rng.standard_normal((5, 4, *kernel)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=list(kernel), **geometry)
    body = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)])
    expected = run_model(onnx.shape_inference.infer_shapes(model), [{"x": x}])["y"]
    patches = conv_patches(x.astype(np.float64), kernel, geometry)
    got = np.einsum("nf,bfhw->bnhw", w.reshape(5, -1).astype(np.float64), patches)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def _refit_svd(model, batches, monkeypatch, how: str):
    """The svd pass at half the MACs with its refit reading tensors `how`."""
    from onnxcompress.passes import get_pass

    from onnxcompress import layer_refit, refit_stream
    from onnxcompress.passkit import PassContext

    with monkeypatch.context() as patch:
        if how == "cut":
            patch.setattr(layer_refit, "RefitStream", _no_stream)
        if how == "restarted":  # every stream outgrows its budget: each site cut, then again
            patch.setattr(refit_stream, "LIVE_BYTES", 1)
        spec = get_pass("svd")
        options = spec.make_options(
            {"target_macs": 0.5, "never_slower": "false", "keep_collapsing": "false"}
        )
        context = PassContext({"input": [2, 3, 32, 32]}, batches, seed=0, threads=1)
        return spec.run(model, options, context)


def _no_stream(*args, **kwargs):
    raise ValueError("not streamed")


@pytest.mark.parametrize("how", ["streamed", "restarted"])
def test_streamed_refit_reads_what_cutting_from_the_inputs_reads(how, monkeypatch):
    """Residual adds and a projection shortcut keep several tensors live between layers."""
    from models.fixtures import resnet_style

    model = resnet_style()
    rng = np.random.default_rng(5)
    batches = [{"input": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)} for _ in range(4)]
    reference = _refit_svd(model, batches, monkeypatch, "cut")
    result = _refit_svd(model, batches, monkeypatch, how)
    # Every layer refitted: a wrong tensor read would show in the outputs.
    assert result.summary["refit"]["improved"] == result.summary["refit"]["layers"] >= 5
    want, got = run_model(reference.model, batches), run_model(result.model, batches)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("relu_aware", [True, False])
def test_layers_feeding_a_relu_get_the_relu_aware_step_and_only_they(relu_aware):
    from onnxcompress.passes import get_pass

    from models.fixtures import resnet_style
    from onnxcompress.passkit import PassContext
    from onnxcompress.relu_refit import relu_fed

    rng = np.random.default_rng(6)
    batches = [{"input": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)} for _ in range(6)]
    context = PassContext({"input": [2, 3, 32, 32]}, batches, seed=0, threads=1)
    fold = get_pass("fold_bn")  # Conv → Relu, as exported models have it
    model = fold.run(resnet_style(), fold.make_options({}), context).model
    spec = get_pass("svd")
    raw = {"target_macs": 0.5, "never_slower": "false", "keep_collapsing": "false"}
    options = spec.make_options({**raw, "relu_aware": str(relu_aware).lower()})
    result = spec.run(model, options, context)
    outputs = {n.name: n.output[0] for n in model.graph.node}
    fed, other = 0, 0
    for record in (r for r in result.records if r.status == "rewritten"):
        refit = record.details["refit"]
        if relu_aware and relu_fed(model, outputs[record.node]):
            fed += 1
            after = refit["relu_held_out_rel_error_after"]
            assert after <= refit["relu_held_out_rel_error_before"]
        else:
            other += 1
            assert not any(key.startswith("relu") for key in refit)
    assert fed >= 2 if relu_aware else fed == 0
    assert other >= 2
