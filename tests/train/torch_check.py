"""Helpers of the torch tests: run a model in TorchGraph and in onnxruntime (graph
optimisations off) on the same inputs and compare. torch is imported by the caller first
(each test module starts with pytest.importorskip("torch"))."""

from __future__ import annotations

import numpy as np
import onnx

from onnxcompress.runtime import make_session

# The architecture's tolerance for exact rewrites (onnx-simplifier's check).
RTOL, ATOL = 1e-4, 1e-5


def torch_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray], module=None) -> dict:
    """The outputs of `model` run as a TorchGraph (or `module`), by output name, as numpy."""
    import torch

    from onnxcompress.train import TorchGraph

    module = module or TorchGraph(model)
    with torch.no_grad():
        result = module(**{name: torch.from_numpy(value) for name, value in feeds.items()})
    results = result if isinstance(result, tuple) else (result,)
    return {name: value.numpy() for name, value in zip(module.output_names, results, strict=True)}


def onnxruntime_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict:
    """onnxruntime's outputs (one thread, graph optimisations off) by output name."""
    session = make_session(model, threads=1)
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def max_difference(
    model: onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    reference: onnx.ModelProto | None = None,
    rtol: float = RTOL,
    atol: float = ATOL,
    reference_feeds: dict[str, np.ndarray] | None = None,
) -> float:
    """Assert that TorchGraph(model) on `feeds` gives onnxruntime's outputs of `reference`
    (default: `model` itself; on `reference_feeds`, default `feeds`) within rtol/atol; the
    largest absolute difference."""
    expected = onnxruntime_outputs(reference or model, reference_feeds or feeds)
    ours = torch_outputs(model, feeds)
    assert set(ours) == set(expected)
    worst = 0.0
    for name, value in ours.items():
        want = expected[name].astype(np.float32) if value.dtype == np.float32 else expected[name]
        assert value.shape == want.shape, (name, value.shape, want.shape)
        np.testing.assert_allclose(value, want, rtol=rtol, atol=atol, err_msg=name)
        if value.size:
            worst = max(worst, float(np.abs(value.astype(np.float64) - want).max()))
    return worst
