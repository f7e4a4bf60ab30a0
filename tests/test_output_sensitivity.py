"""The MAC budget weighs each layer's error by its measured effect on the model's outputs."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes import get_pass

from onnxcompress.passkit import PassContext
from onnxcompress.runtime import run_model

SVD = get_pass("svd")
K, N = 32, 32


def _weight(rng, decay: float | None) -> np.ndarray:
    """K × N, random singular vectors; singular values decay^i (None: a plain random matrix)."""
    if decay is None:
        return rng.standard_normal((K, N)).astype(np.float32)
    u, _ = np.linalg.qr(rng.standard_normal((K, K)))
    v, _ = np.linalg.qr(rng.standard_normal((N, N)))
    return ((u * decay ** np.arange(K)) @ v.T).astype(np.float32)


def _two_branches(rng, decay: float | None = None) -> onnx.ModelProto:
    """y = 100·(x @ W_loud) + 0.01·(x @ W_quiet): the same kind of weight in both branches,
    one of them four orders of magnitude louder at the output."""
    inits = [
        numpy_helper.from_array(_weight(rng, decay), "w_loud"),
        numpy_helper.from_array(_weight(rng, decay), "w_quiet"),
        numpy_helper.from_array(np.float32(100.0), "loud"),
        numpy_helper.from_array(np.float32(0.01), "quiet"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w_loud"], ["a"], name="loud_mm"),
        helper.make_node("MatMul", ["x", "w_quiet"], ["b"], name="quiet_mm"),
        helper.make_node("Mul", ["a", "loud"], ["a2"], name="loud_mul"),
        helper.make_node("Mul", ["b", "quiet"], ["b2"], name="quiet_mul"),
        helper.make_node("Add", ["a2", "b2"], ["y"], name="sum"),
    ]
    graph = helper.make_graph(
        nodes,
        "branches",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, N])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _compress(model, calibration, allocation, target=0.75):
    options = SVD.make_options(
        {
            "target_macs": target,
            "align": 4,
            "never_slower": False,
            "allocation": allocation,
            "keep": "none",
        }
    )
    return SVD.run(model, options, PassContext({"x": [16, K]}, calibration=calibration))


def _ranks(result) -> dict[str, int | None]:
    ranks = {"loud_mm": None, "quiet_mm": None}
    for record in result.records:
        if record.status == "rewritten":
            ranks[record.node] = record.details["rank"]
    return ranks


def test_allocation_by_output_gives_the_budget_to_the_layer_the_outputs_need():
    rng = np.random.default_rng(0)
    model = _two_branches(rng, decay=0.8)  # small errors: no layer collapses the outputs
    calibration = [{"x": rng.standard_normal((16, K)).astype(np.float32)} for _ in range(4)]
    unseen = [{"x": rng.standard_normal((16, K)).astype(np.float32)}]
    (want,) = run_model(model, unseen).values()
    errors, ranks = {}, {}
    for allocation in ("output", "layer"):
        result = _compress(model, calibration, allocation)
        (got,) = run_model(result.model, unseen).values()
        errors[allocation] = np.linalg.norm(got - want) / np.linalg.norm(want)
        ranks[allocation] = _ranks(result)
        assert result.summary["macs_ratio"] <= 0.75
        assert result.summary["probed_layers"] == 2
    # Measured: the quiet branch takes the cut, the loud one is kept whole or nearly.
    loud, quiet = ranks["output"]["loud_mm"], ranks["output"]["quiet_mm"]
    assert quiet is not None and (loud is None or loud > quiet)
    assert errors["output"] < 0.5 * errors["layer"]


def test_a_layer_that_collapses_the_outputs_alone_is_kept_and_says_why():
    rng = np.random.default_rng(3)
    model = _two_branches(rng, decay=1.0)  # flat spectra: any cut of the loud one collapses
    calibration = [{"x": rng.standard_normal((16, K)).astype(np.float32)} for _ in range(4)]
    result = _compress(model, calibration, "layer", target=0.7)
    loud = next(r for r in result.records if r.node == "loud_mm")
    assert loud.status == "skipped" and "moves the model's outputs by relative L2" in loud.reason
    assert _ranks(result)["quiet_mm"] is not None


def test_without_data_the_layer_error_decides():
    rng = np.random.default_rng(1)
    result = _compress(_two_branches(rng), None, "output")
    assert "probed_layers" not in result.summary
    assert all(r.status == "rewritten" for r in result.records if r.node == "loud_mm")


def test_an_unknown_allocation_is_refused_in_one_line():
    import pytest

    from onnxcompress.errors import CompressError

    rng = np.random.default_rng(2)
    with pytest.raises(CompressError, match="allocation='weights'"):
        _compress(_two_branches(rng), None, "weights")


def test_a_target_out_of_reach_once_collapsing_layers_are_kept_names_them():
    import pytest

    from onnxcompress.errors import CompressError

    rng = np.random.default_rng(4)
    calibration = [{"x": rng.standard_normal((16, K)).astype(np.float32)} for _ in range(4)]
    with pytest.raises(CompressError, match="collapse the outputs alone: loud_mm"):
        _compress(_two_branches(rng, decay=1.0), calibration, "layer", target=0.3)


def test_each_layer_is_probed_on_its_downstream_part_with_the_whole_models_numbers(monkeypatch):
    """The probe runs only what the layer reaches (residual adds keep several upstream tensors
    live); each layer's output damage is the one the whole model gives."""
    from models.fixtures import resnet_style
    from onnxcompress import output_sensitivity

    rng = np.random.default_rng(6)
    batches = [{"input": rng.standard_normal((2, 3, 32, 32)).astype(np.float32)} for _ in range(3)]
    context = PassContext({"input": [2, 3, 32, 32]}, batches, seed=0, threads=1)
    spec = get_pass("svd")
    options = spec.make_options({"target_macs": 0.5, "never_slower": "false"})
    probes = {}
    for how in ("part", "whole"):
        if how == "whole":
            monkeypatch.setattr(output_sensitivity, "downstream", lambda *args: None)
        found = spec.run(resnet_style(), options, context)
        probes[how] = {
            r.node: r.details["probe_output_rel_l2"]
            for r in found.records
            if "probe_output_rel_l2" in r.details
        }
    assert len(probes["part"]) >= 5 and probes["part"].keys() == probes["whole"].keys()
    for name, value in probes["part"].items():
        assert value == pytest.approx(probes["whole"][name], abs=2e-4)  # records round to 1e-4
