"""The run's verdict: the Wilson interval, the thresholds, and what the CLI, the JSON and the
Markdown/HTML reports say and exit with."""

import json
import math
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy.stats import binomtest

from onnxcompress import passes, verdict
from onnxcompress.cli import main
from onnxcompress.passkit import PassResult, PassSpec
from onnxcompress.verdict import judge, wilson_interval


@pytest.mark.parametrize(("successes", "total"), [(0, 10), (3, 3), (198, 200), (81, 263), (1, 2)])
def test_wilson_interval_matches_scipy(successes, total):
    expected = binomtest(successes, total).proportion_ci(confidence_level=0.95, method="wilson")
    low, high = wilson_interval(successes, total)
    assert low == pytest.approx(expected.low, abs=1e-12)
    assert high == pytest.approx(expected.high, abs=1e-12)


def test_wilson_interval_closed_form_and_shrinks_with_samples():
    z = 1.959963984540054
    assert wilson_interval(0, 10)[1] == pytest.approx(z * z / (10 + z * z))
    widths = [np.subtract(*wilson_interval(n // 2, n)[::-1]) for n in (10, 100, 1000)]
    assert widths[0] > widths[1] > widths[2]
    # Width falls as 1/sqrt(n) once n is large: ten times the samples, ~sqrt(10) narrower.
    assert widths[1] / widths[2] == pytest.approx(math.sqrt(10), rel=0.05)
    with pytest.raises(ValueError):
        wilson_interval(5, 4)


def _validation(samples=1000, rel_l2=0.0, agreement=None, accuracy=None, source="file x.npz"):
    output = {"rel_l2": rel_l2, "max_abs": rel_l2, "cosine": 1.0}
    if agreement is not None:
        output["top1_agreement"] = agreement
    if accuracy is not None:
        output.update(accuracy_original=accuracy[0], accuracy_result=accuracy[1])
    return {
        "validated": True,
        "outputs": {"y": output},
        "worst_rel_l2": rel_l2,
        "samples": samples,
        "source": source,
    }


def test_agreement_threshold_decides_deployable_or_lossy():
    at = judge(_validation(agreement=verdict.DEPLOYABLE_AGREEMENT))
    below = judge(_validation(agreement=verdict.DEPLOYABLE_AGREEMENT - 0.002))
    assert at["kind"] == "deployable" and below["kind"] == "lossy"
    low, high = below["top1_agreement_interval"]
    assert low < below["top1_agreement"] < high
    assert f"{100 * below['top1_agreement']:.1f}%" in below["text"]
    assert below["text"].startswith("lossy: ") and below["uncertain"] is False


def test_labels_decide_by_the_accuracy_drop():
    original = 0.8
    drop = verdict.DEPLOYABLE_ACCURACY_DROP
    # Agreement below its own threshold, but the accuracy the user measures held: deployable.
    kept = _validation(agreement=0.97, accuracy=(original, original - drop / 2))
    lost = _validation(agreement=0.97, accuracy=(original, original - 2 * drop))
    assert judge(kept)["kind"] == "deployable"
    entry = judge(lost)
    assert entry["kind"] == "lossy" and f"{-200 * drop:+.1f} points" in entry["text"]
    assert entry["accuracy_original"] == original


def test_signal_outputs_decide_by_relative_l2():
    middle = (verdict.DEPLOYABLE_REL_L2 + verdict.BROKEN_REL_L2) / 2
    assert judge(_validation(rel_l2=verdict.DEPLOYABLE_REL_L2))["kind"] == "deployable"
    assert judge(_validation(rel_l2=middle))["kind"] == "lossy"
    assert judge(_validation(rel_l2=verdict.BROKEN_REL_L2))["kind"] == "broken"
    for bad in (math.inf, math.nan):
        assert judge(_validation(rel_l2=bad))["kind"] == "broken"


def test_class_scores_far_in_l2_but_agreeing_are_judged_by_their_predictions():
    # A flattened softmax: far from the original's scores, the same top-1 almost everywhere.
    far = judge(_validation(rel_l2=2 * verdict.BROKEN_REL_L2, agreement=0.97))
    assert far["kind"] == "lossy"
    assert judge(_validation(rel_l2=math.nan, agreement=1.0))["kind"] == "broken"


def test_collapsed_agreement_or_accuracy_is_broken_only_with_evidence():
    collapsed = verdict.BROKEN_AGREEMENT / 2
    assert judge(_validation(agreement=collapsed))["kind"] == "broken"
    # One sample of two changed: the interval reaches well over the limit, so not broken.
    few = judge(_validation(samples=2, agreement=collapsed))
    assert few["kind"] == "lossy" and few["uncertain"] is True
    assert few["top1_agreement_interval"][1] > verdict.BROKEN_AGREEMENT
    assert f"under {verdict.UNCERTAIN_BELOW}: uncertain" in few["text"]
    original = 0.9
    halved = (original, original * verdict.BROKEN_ACCURACY_KEPT * 0.8)
    assert judge(_validation(agreement=0.9, accuracy=halved))["kind"] == "broken"


def test_only_proportions_under_the_sample_floor_are_called_uncertain():
    few = verdict.UNCERTAIN_BELOW - 1
    assert judge(_validation(samples=few, agreement=1.0))["uncertain"] is True
    assert judge(_validation(samples=verdict.UNCERTAIN_BELOW, agreement=1.0))["uncertain"] is False
    signal = judge(_validation(samples=few, rel_l2=0.0))
    assert signal["uncertain"] is False and "uncertain" not in signal["text"]


def test_not_validated_says_so():
    entry = judge({"validated": False, "status": "not validated: x", "detail": "no held-out"})
    assert entry["kind"] == "not validated" and entry["text"] == "not validated: no held-out"


# -- through the CLI ------------------------------------------------------------------------


@dataclass(frozen=True)
class ScaleOptions:
    factor: float = 1.0


def _scale_pass(model, options, context):
    """Multiplies every weight by `factor`: a linear model's output then moves by exactly
    |factor - 1| in relative L2 (factor -1: the output negated, argmax becomes argmin)."""
    scaled = onnx.ModelProto()
    scaled.CopyFrom(model)
    for init in scaled.graph.initializer:
        value = numpy_helper.to_array(init) * np.float32(options.factor)
        init.CopyFrom(numpy_helper.from_array(value, init.name))
    return PassResult(scaled, True)


@pytest.fixture
def scale_pass(monkeypatch):
    spec = PassSpec("scale", _scale_pass, ScaleOptions, "test-only: scales the weights")
    monkeypatch.setitem(passes.all_passes(), "scale", spec)


def _linear_model(tmp_path, classes):
    rng = np.random.default_rng(0)
    weight = numpy_helper.from_array(rng.standard_normal((8, classes)).astype(np.float32), "w")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", classes])
    matmul = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([matmul], "linear", [x], [y], [weight])
    path = tmp_path / f"linear{classes}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _run(tmp_path, model, factor, *extra):
    out, report = tmp_path / "o.onnx", tmp_path / "report"
    args = [model, "--passes", "scale", "--opt", f"scale.factor={factor}", "-o", out]
    code = main([str(a) for a in [*args, "--report", report, "--no-bench", "-q", *extra]])
    assert out.exists() and (report / "report.json").exists()
    return code, json.loads((report / "report.json").read_text()), report


def test_negated_outputs_are_broken_and_exit_1(tmp_path, scale_pass, capsys):
    code, report, folder = _run(tmp_path, _linear_model(tmp_path, classes=5), -1)
    assert code == 1 and report["passed"] is False
    stated = report["verdict"]
    assert stated["kind"] == "broken" and stated["worst_rel_l2"] == pytest.approx(2.0)
    assert stated["top1_agreement"] == 0.0
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == f"verdict: {stated['text']}"
    (error,) = captured.err.strip().splitlines()[-1:]
    assert error.startswith("error: the result is broken: outputs far from the original's")
    assert "written anyway" in error
    for name in ("report.md", "report.html"):
        head = (folder / name).read_text().split("Summary")[0]
        assert f"verdict: {stated['text']}".replace("'", "&#x27;") in head or (
            f"verdict: {stated['text']}" in head
        )


def test_own_tolerance_decides_alone(tmp_path, scale_pass):
    model = _linear_model(tmp_path, classes=5)
    code, report, _ = _run(tmp_path, model, -1, "--max-rel-l2", "3")
    assert code == 0 and report["verdict"]["kind"] == "broken" and report["passed"] is True


def test_identity_is_deployable(tmp_path, scale_pass):
    code, report, folder = _run(tmp_path, _linear_model(tmp_path, classes=5), 1)
    assert code == 0 and report["verdict"]["kind"] == "deployable"
    assert report["verdict"]["worst_rel_l2"] == 0.0
    assert "**verdict: deployable: " in (folder / "report.md").read_text()


def test_scaled_signal_is_lossy_by_how_much(tmp_path, scale_pass):
    error = (verdict.DEPLOYABLE_REL_L2 + verdict.BROKEN_REL_L2) / 2
    code, report, _ = _run(tmp_path, _linear_model(tmp_path, classes=1), 1 + error)
    stated = report["verdict"]
    assert code == 0 and stated["kind"] == "lossy"
    assert stated["worst_rel_l2"] == pytest.approx(error, rel=1e-5)
    assert f"worst relative L2 {error:.3g}" in stated["text"]
