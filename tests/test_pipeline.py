"""The pipeline keeps held-out samples away from the passes that fit on data."""

import pickle
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxcompress import passes
from onnxcompress.calibration import Calibration
from onnxcompress.errors import CompressError
from onnxcompress.holdout import ReadWatch
from onnxcompress.passkit import PassResult, PassSpec
from onnxcompress.pipeline import CompressOptions, compress, split_holdout
from tests.conftest import REPO


def _calibration(batches, source="file d.npz (8 samples)"):
    data = [{"x": np.full((2, 3), i, np.float32)} for i in range(batches)]
    return Calibration(data, np.arange(2 * batches), source)


def test_holdout_splits_batches_and_labels():
    fit, held = split_holdout(_calibration(4), 0.25)
    assert [b["x"][0, 0] for b in fit.batches] == [0, 1, 2]
    assert [b["x"][0, 0] for b in held.batches] == [3]
    assert list(fit.labels) == [0, 1, 2, 3, 4, 5] and list(held.labels) == [6, 7]
    assert "2 held-out samples" in held.source and "first 6 samples" in fit.source


@pytest.mark.parametrize(
    ("calibration", "holdout"),
    [(_calibration(4), 0.0), (_calibration(1), 0.25), (_calibration(4, "random (seed 0)"), 0.5)],
)
def test_no_split_without_room_or_user_data(calibration, holdout):
    fit, held = split_holdout(calibration, holdout)
    assert fit is calibration and held is calibration


def test_bad_holdout():
    with pytest.raises(CompressError, match="--holdout"):
        split_holdout(_calibration(4), 1.0)


@dataclass(frozen=True)
class SpyOptions:
    pass


def test_passes_never_see_the_held_out_samples(tmp_path, monkeypatch):
    seen = []

    def spy(model, options, context):
        seen.append([float(b["input"].sum()) for b in context.calibration])
        return PassResult(model, False)

    monkeypatch.setitem(passes.all_passes(), "spy", PassSpec("spy", spy, SpyOptions, "spy"))
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    inputs = rng.standard_normal((8, 3, 32, 32)).astype(np.float32)
    np.savez(data, input=inputs)
    options = CompressOptions(
        passes=["spy"], output=str(tmp_path / "o.onnx"), data=str(data), bench=False
    )
    result = compress(REPO / "models" / "vgg_style.onnx", options)
    assert len(seen[0]) == 6  # 8 batches of 1: 6 to fit, 2 held out
    assert seen[0] == pytest.approx([float(x.sum()) for x in inputs[:6]])
    assert result.report["validation"]["samples"] == 2


def _relu_model(path, batch="batch"):
    """y = Relu(x) on x [batch, 4]: a model whose batch the data may cut (or not, when fixed)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _spy_on_rows(monkeypatch, seen):
    def spy(model, options, context):
        seen.append(sum(len(batch["x"]) for batch in context.calibration))
        seen.append(len(context.labels))
        return PassResult(model, False)

    monkeypatch.setitem(passes.all_passes(), "spy", PassSpec("spy", spy, SpyOptions, "spy"))


def test_one_batch_is_split_by_samples(tmp_path, monkeypatch):
    seen = []
    _spy_on_rows(monkeypatch, seen)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.arange(32, dtype=np.float32).reshape(8, 4), labels=np.arange(8))
    options = CompressOptions(
        passes=["spy"], output=str(tmp_path / "o.onnx"), data=str(data), batch_size=8, bench=False
    )
    result = compress(_relu_model(tmp_path / "m.onnx"), options)
    assert seen == [6, 6], "one batch of 8: the passes get 6 samples and 6 labels"
    validation = result.report["validation"]
    assert validation["samples"] == 2 and validation["validated"] is True
    assert "held-out" in validation["status"]


def test_holdout_cuts_a_batch_and_keeps_arrays_given_once():
    state = np.zeros((2, 1, 5), np.float32)  # pinned shape, the same for every batch
    batch = {"x": np.arange(24.0).reshape(8, 3), "h": np.ones((2, 8, 5)), "s": state}
    batch["sr"] = np.array(16)
    axes = {"x": 0, "h": 1, "s": 1, "sr": None}
    calibration = Calibration([batch], np.arange(8), "file d.npz (8 samples)", axes, False)
    fit, held = split_holdout(calibration, 0.25)
    (head,), (tail,) = fit.batches, held.batches
    assert head["x"].shape == (6, 3) and tail["x"].shape == (2, 3)
    assert head["h"].shape == (2, 6, 5) and tail["h"].shape == (2, 2, 5)
    assert head["s"] is state and tail["s"] is state and tail["sr"] is batch["sr"]
    assert list(tail["x"][:, 0]) == [18.0, 21.0]
    assert list(fit.labels) == [0, 1, 2, 3, 4, 5] and list(held.labels) == [6, 7]


def test_fixed_batch_is_held_out_only_in_whole_batches():
    def calibration(batches):
        data = [{"x": np.full((4, 3), i, np.float32)} for i in range(batches)]
        return Calibration(data, None, f"file d.npz ({4 * batches} samples)", {"x": 0}, True)

    one = calibration(1)
    assert split_holdout(one, 0.25) == (one, one)
    fit, held = split_holdout(calibration(2), 0.25)
    assert len(fit.batches) == len(held.batches) == 1 and held.batches[0]["x"][0, 0] == 1


def test_read_watch_counts_reading_not_asking():
    watched = ReadWatch([{"x": np.zeros(2)}])
    assert watched and len(watched) == 1 and not watched.read  # asking whether there is data
    first = ReadWatch(watched)
    assert first[0] is watched[0] and first.read
    shipped = ReadWatch(watched)
    assert type(pickle.loads(pickle.dumps(shipped))) is list and shipped.read  # to a worker
    looped = ReadWatch(watched)
    assert [batch for batch in looped] and looped.read


def test_an_array_given_once_with_a_dynamic_dim_is_never_cut(tmp_path):
    # 'table' [?, 16] pinned to [8, 16] and given once: its 8 rows outvoted x's 4 per batch,
    # and x went whole into both halves (validated on the rows the passes fit on).
    from onnxcompress.calibration import calibration_inputs

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])
    table = helper.make_tensor_value_info("table", TensorProto.FLOAT, ["k", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x, table], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = tmp_path / "d.npz"
    np.savez(data, x=np.arange(12.0, dtype=np.float32).reshape(4, 3), table=np.ones((8, 16), "f"))
    for x_pin, batch_size in (4, None), (1, 4):  # x as pinned (the named batch), x differing
        shapes = {"x": [x_pin, 3], "table": [8, 16]}
        calibration = calibration_inputs(model, shapes, data=data, batch_size=batch_size)
        fit, held = split_holdout(calibration, 0.25)
        assert [b["x"].shape for b in fit.batches] == [(3, 3)]
        assert [b["x"].shape for b in held.batches] == [(1, 3)]
        assert all(b["table"].shape == (8, 16) for b in fit.batches + held.batches)


def _contract_case(kind: str):
    """A pass breaking the contract in one way (`kind`), on a copy of the Relu model."""
    from onnxcompress.passkit import NodeRecord

    def run(model, options, context):
        if kind == "in_place":
            model.graph.node[0].name = "renamed"
            return PassResult(model, True)
        changed = onnx.ModelProto()
        changed.CopyFrom(model)
        changed.graph.node[0].name = "renamed"
        if kind == "unchanged_but_changed":
            return PassResult(changed, False)
        status, reason = ("done", "x") if kind == "bad_status" else ("skipped", "")
        return PassResult(model, False, [NodeRecord("r", "Relu", status, reason)])

    return run


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        ("unchanged_but_changed", "says changed=False but changed the model"),
        ("in_place", "changed the model it was given in place"),
        ("bad_status", "has status 'done'"),
        ("skip_without_reason", "skipped r without a reason"),
    ],
)
def test_run_passes_enforces_the_pass_contract(tmp_path, kind, words):
    from onnxcompress.pass_contract import PassContractError
    from onnxcompress.passkit import PassContext
    from onnxcompress.pipeline import run_passes

    model = onnx.load(_relu_model(tmp_path / "m.onnx"))
    spec = PassSpec("breaker", _contract_case(kind), SpyOptions, "breaks the contract")
    with pytest.raises(PassContractError, match=words):
        run_passes(model, [spec], {"breaker": SpyOptions()}, PassContext({}), lambda _: None)


def test_run_passes_hands_the_passes_the_model_it_started_from(tmp_path):
    from onnxcompress.passkit import PassContext
    from onnxcompress.pipeline import run_passes

    model = onnx.load(_relu_model(tmp_path / "m.onnx"))
    seen = []

    def spy(given, options, context):
        seen.append(context.original)
        return PassResult(model=given, changed=False)

    spec = PassSpec("spy", spy, SpyOptions, "records the context's original")
    context = PassContext({})
    run_passes(model, [spec, spec], {"spy": SpyOptions()}, context, lambda _: None)
    assert seen == [model, model] and seen[0] is model
    assert context.original is None  # the caller's context is left as it was
    other = onnx.ModelProto()
    context = PassContext({}, original=other)
    run_passes(model, [spec], {"spy": SpyOptions()}, context, lambda _: None)
    assert seen[-1] is other


# A second run of each pass on its own output: small settings (the contract, not the method,
# is under test); upcast needs a float16 model, auto a quick one.
TWICE_OPTIONS = {
    "auto": {"target_macs": 0.6, "methods": "svd", "sensitivity_samples": 4},
    "blocks": {"count": 1},
}


def _twice_model(name):
    from models.fixtures import half_precision, mlp, resnet_style

    if name == "upcast":
        return half_precision(resnet_style()), {"input": [1, 3, 32, 32]}
    if name == "auto":
        return mlp(), {"input": [4, 64]}
    return resnet_style(), {"input": [1, 3, 32, 32]}


def _all_pass_names():
    from onnxcompress.registry import all_passes

    return sorted(all_passes())


@pytest.mark.parametrize("name", _all_pass_names())
def test_a_second_run_keeps_the_contract_and_an_idempotent_pass_changes_nothing(name):
    """Run twice, every pass keeps the contract (`run_passes` checks it on both runs); an
    idempotent pass changes nothing the second time; any other pass either writes a valid
    model again (its budget is of the model it is given) or refuses in one line."""
    from onnxcompress import graph
    from onnxcompress.errors import CompressError
    from onnxcompress.passkit import PassContext
    from onnxcompress.pipeline import run_passes
    from onnxcompress.registry import get_pass

    spec = get_pass(name)
    model, shapes = _twice_model(name)
    rng = np.random.default_rng(0)
    calibration = [
        {"input": rng.standard_normal([4, *shapes["input"][1:]]).astype(np.float32)}
        for _ in range(2)
    ]
    if name == "upcast":
        calibration = [{"input": b["input"].astype(np.float16)} for b in calibration]
    context = PassContext(shapes, calibration, seed=0, threads=1)
    args = ([spec], {name: spec.make_options(TWICE_OPTIONS.get(name, {}))}, context)
    once, first = run_passes(model, *args, lambda _: None)
    # distill's teacher is the model the run started from: run first, nothing to recover.
    assert first[0]["changed"] is (name not in ("identity", "distill"))
    try:
        twice, second = run_passes(once, *args, lambda _: None)
    except CompressError as exc:
        assert not spec.idempotent, f"{name} is idempotent but refused its own output: {exc}"
        assert "\n" not in str(exc) and str(exc).startswith(f"{name}:")
        return
    if spec.idempotent:
        assert second[0]["changed"] is False and twice == once
    else:
        graph.check_model(twice)
