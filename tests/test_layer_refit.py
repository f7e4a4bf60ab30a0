"""The refit's im2col rows: a Conv computed as weight (n, k·kh·kw) times the patches equals
onnxruntime's Conv for every geometry the factorized layers write."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.layer_refit import conv_patches
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
