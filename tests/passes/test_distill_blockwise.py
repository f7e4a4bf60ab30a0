"""distill block by block (`blockwise`): a damaged factorization is repaired, an exact one is
left alone, runs repeat exactly, `only` trains no end-to-end step, and a model with an op
torch cannot run (an LSTM) trains the blocks around it; a rewritten layer torch cannot run
is refused in one line, by the CLI with exit 2 and nothing written."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes import get_pass
from onnxcompress.passes.distill import BLOCK_SHARE

from models.fixtures import mlp
from onnxcompress import graph
from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import run_model
from tests.conftest import REPO

DISTILL = get_pass("distill")
FAST = {"steps": 60, "lr": 3e-3, "batch_size": 32, "threads": 1}
WIDTH, HIDDEN, LSTM_SIZE, CLASSES = 16, 32, 16, 10


def _batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input": rng.standard_normal((32, WIDTH)).astype(np.float32)} for _ in range(count)]


def _random(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return (rng.standard_normal(shape) / np.sqrt(shape[-2])).astype(np.float32)


def _middle(lstm: bool, weights: dict, rng: np.random.Generator) -> list[onnx.NodeProto]:
    """a1 -> h2: an LSTM over a one-step sequence (torch cannot run it), or a MatMul."""
    if not lstm:
        weights["w2"] = _random(rng, HIDDEN, LSTM_SIZE)
        return [helper.make_node("MatMul", ["a1", "w2"], ["h2"], name="mid")]
    weights["W"] = _random(rng, 1, 4 * LSTM_SIZE, HIDDEN)
    weights["R"] = _random(rng, 1, 4 * LSTM_SIZE, LSTM_SIZE)
    weights["zero"], weights["zero_one"] = np.array([0]), np.array([0, 1])
    return [
        helper.make_node("Unsqueeze", ["a1", "zero"], ["seq"], name="seq"),
        helper.make_node("LSTM", ["seq", "W", "R"], ["y"], hidden_size=LSTM_SIZE, name="lstm"),
        helper.make_node("Squeeze", ["y", "zero_one"], ["h2"], name="last"),
    ]


def _layer(source, weight, out, rank, damage, weights, rng) -> list[onnx.NodeProto]:
    """MatMul `source` @ `weight` -> `out`, split at `rank` into two factors by a truncated
    SVD (None: whole), the first damaged by seeded noise of `damage` times its scale."""
    if rank is None:
        return [helper.make_node("MatMul", [source, weight], [out], name=weight)]
    u, s, vt = np.linalg.svd(weights.pop(weight), full_matrices=False)
    first = u[:, :rank] * s[:rank]
    noise = damage * first.std() * rng.standard_normal(first.shape)
    weights[f"{weight}.a"] = (first + noise).astype(np.float32)
    weights[f"{weight}.b"] = vt[:rank]
    mid = f"{weight}.mid"
    return [
        helper.make_node("MatMul", [source, f"{weight}.a"], [mid], name=f"{weight}.a"),
        helper.make_node("MatMul", [mid, f"{weight}.b"], [out], name=f"{weight}.b"),
    ]


def _model(lstm: bool, ranks=(None, None), noise=(0.0, 0.0)) -> onnx.ModelProto:
    """MatMul w1 -> Relu -> middle -> MatMul w3 with seeded weights; w1 and w3 split at
    `ranks` (16 and 10 split them exactly) and damaged by `noise` (see `_layer`)."""
    rng, damage = np.random.default_rng(0), np.random.default_rng(1)
    weights = {"w1": _random(rng, WIDTH, HIDDEN), "w3": _random(rng, LSTM_SIZE, CLASSES)}
    middle = _middle(lstm, weights, rng)
    first = _layer("input", "w1", "h1", ranks[0], noise[0], weights, damage)
    last = _layer("h2", "w3", "logits", ranks[1], noise[1], weights, damage)
    nodes = [*first, helper.make_node("Relu", ["h1"], ["a1"], name="relu"), *middle, *last]
    body = helper.make_graph(
        nodes,
        "blocks",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", WIDTH])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)])


def _damaged() -> onnx.ModelProto:
    """Both layers split exactly, then their first factors damaged."""
    return _model(False, (16, 10), (0.5, 0.5))


def _distill(student, teacher, progress=None, **options):
    context = PassContext(
        {"input": [32, WIDTH]}, _batches(8, 0), seed=0, threads=1, original=teacher
    )
    if progress is not None:
        context.progress = progress
    return DISTILL.run(student, DISTILL.make_options({**FAST, **options}), context)


def _error(model, teacher) -> float:
    batches = _batches(4, 99)  # inputs neither training nor choosing the weights saw
    ours, theirs = run_model(model, batches)["logits"], run_model(teacher, batches)["logits"]
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def _shapes(model) -> dict[str, tuple]:
    return {init.name: tuple(init.dims) for init in model.graph.initializer}


def _same_structure(result, student) -> None:
    graph.check_model(result)  # full checker and strict shape inference
    assert list(result.graph.node) == list(student.graph.node)
    assert _shapes(result) == _shapes(student)


@pytest.mark.parametrize("blockwise", ["first", "only"])
def test_a_damaged_factorization_is_repaired_block_by_block(blockwise):
    teacher, student = _model(False), _damaged()
    result = _distill(student, teacher, blockwise=blockwise)
    assert result.changed and result.summary["blockwise"] == blockwise
    _same_structure(result.model, student)
    assert _error(result.model, teacher) < 0.8 * _error(student, teacher)
    summary = result.summary
    assert summary["held_out_loss_after"] < summary["held_out_loss_before"]
    assert [block["block"] for block in summary["blocks"]] == ["a1", "logits"]
    rewritten = {r.node for r in result.records if r.status == "rewritten"}
    assert {"w1.a", "w1.b", "w3.a", "w3.b"} <= rewritten


def test_only_trains_no_end_to_end_step(monkeypatch):
    from onnxcompress.train import torch_distill

    def refuse(*args, **kwargs):
        raise AssertionError("an end-to-end step")

    monkeypatch.setattr(torch_distill, "train_student", refuse)
    teacher, student = _model(False), _damaged()
    summary = _distill(student, teacher, blockwise="only").summary
    assert "end_to_end" not in summary
    assert summary["steps"] == summary["block_steps"] == FAST["steps"]


def test_first_gives_the_blocks_their_share_then_trains_end_to_end():
    teacher, student = _model(False), _damaged()
    summary = _distill(student, teacher, blockwise="first").summary
    assert summary["block_steps"] == round(FAST["steps"] * BLOCK_SHARE)
    assert summary["end_to_end"]["steps"] == FAST["steps"] - summary["block_steps"]
    assert summary["steps"] == FAST["steps"]


def test_same_seed_same_weights():
    teacher, student = _model(False), _damaged()
    first, second = (_distill(student, teacher, blockwise="only", steps=20) for _ in range(2))
    a, b = (
        {i.name: numpy_helper.to_array(i) for i in r.model.graph.initializer}
        for r in (first, second)
    )
    assert all(np.array_equal(a[name], b[name]) for name in a)


def test_a_student_equal_to_its_teacher_stays_equal():
    teacher = _model(False)
    assert not _distill(teacher, teacher, blockwise="only").changed
    exact = _model(False, (16, None))  # w1 split at full rank: the same function
    result = _distill(exact, teacher, blockwise="only")
    assert not result.changed and result.model is exact
    (block,) = result.summary["blocks"]
    assert not block["trained"] and "never fell" in block["reason"]
    batches = _batches(2, 5)
    np.testing.assert_allclose(
        run_model(result.model, batches)["logits"],
        run_model(teacher, batches)["logits"],
        rtol=1e-4,
        atol=1e-5,
    )


def test_a_model_torch_cannot_run_whole_trains_the_blocks_around_it():
    from onnxcompress.train import TorchGraph, UnsupportedOps

    teacher, student = _model(True), _model(True, (16, 10), (0.0, 0.5))
    with pytest.raises(UnsupportedOps, match="LSTM"):
        TorchGraph(student)  # what end-to-end training would run
    result = _distill(student, teacher)  # blockwise none: switches by itself
    summary = result.summary
    assert result.changed and summary["blockwise"] == "only"
    assert "LSTM" in summary["note"] and "block by block" in summary["note"]
    _same_structure(result.model, student)
    assert _error(result.model, teacher) < 0.8 * _error(student, teacher)
    exact, damaged = summary["blocks"]  # w1 split exactly: nothing to gain there
    assert not exact["trained"] and "never fell" in exact["reason"]
    assert damaged["trained"] and damaged["block"] == "logits"
    status = {r.node: (r.status, r.reason) for r in result.records}
    assert status["w3.a"][0] == status["w3.b"][0] == "rewritten"
    assert status["w1.a"][0] == "skipped" and "never fell" in status["w1.a"][1]
    assert "lstm" not in status


def test_ctrl_c_stops_the_blocks_and_keeps_the_trained_ones():
    from tests.passes.test_distill import _CtrlCAt

    teacher, student = _model(False), _damaged()
    # blockwise=first: 30 block steps, 15 a block; Ctrl-C at the second block's 5th.
    result = _distill(student, teacher, progress=_CtrlCAt(20), blockwise="first")
    summary = result.summary
    assert summary["stopped_by"] == "interrupted" and "end_to_end" not in summary
    first, second = summary["blocks"]
    assert first["trained"] and first["steps"] == 15 and second["steps"] == 5
    assert result.changed


def test_training_that_raises_the_model_loss_is_not_kept(monkeypatch):
    from onnxcompress.train import torch_blockwise

    losses = iter([0.1, 0.2])  # before, after
    monkeypatch.setattr(torch_blockwise, "output_loss", lambda *args: next(losses))
    teacher, student = _model(False), _damaged()
    result = _distill(student, teacher, blockwise="only")
    assert not result.changed and result.model is student
    assert "did not lower the model's held-out loss" in result.summary["note"]
    assert all(r.status == "skipped" for r in result.records)


def test_a_rewritten_layer_torch_cannot_run_is_refused(tmp_path):
    model, data, out = tmp_path / "mlp.onnx", tmp_path / "calib.npz", tmp_path / "out.onnx"
    onnx.save(mlp(), model)
    rng = np.random.default_rng(1)
    np.savez(data, input=rng.standard_normal((64, 64)).astype(np.float32))
    done = subprocess.run(
        [sys.executable, "-m", "onnxcompress", str(model), "--passes", "int8,distill",
         "--data", str(data), "-o", str(out), "--opt", "distill.steps=2", "--no-bench", "-q"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "DequantizeLinear" in done.stderr and "rewritten layer" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not out.exists()


def test_a_bad_blockwise_value_is_refused():
    with pytest.raises(CompressError, match="blockwise"):
        DISTILL.make_options({"blockwise": "sometimes"})


def test_a_block_whose_output_has_another_shape_is_left_and_says_why(monkeypatch):
    from onnxcompress.train import student_blocks
    from tests.train.test_student_blocks import _two_convs

    monkeypatch.setattr(student_blocks, "_shapes", lambda model: {})  # inference knows nothing
    student, teacher = _two_convs(4), _two_convs(8)
    rng = np.random.default_rng(0)
    batches = [{"input": rng.standard_normal((1, 3, 8, 8)).astype(np.float32)} for _ in range(8)]
    context = PassContext({"input": [1, 3, 8, 8]}, batches, seed=0, threads=1, original=teacher)
    options = DISTILL.make_options({**FAST, "blockwise": "only"})
    narrowed, after = DISTILL.run(student, options, context).summary["blocks"]
    assert (
        not narrowed["trained"]
        and "is [4, 8, 8] a sample, the original's [8, 8, 8]" in (narrowed["reason"])
    )
    assert after["block"] == "out" and after["steps"] > 0


def test_a_block_that_uses_up_its_time_leaves_the_rest_to_the_next():
    teacher, student = _model(False), _damaged()
    result = _distill(student, teacher, blockwise="only", steps=100_000, time_limit=1.0)
    summary = result.summary
    assert summary["stopped_by"] == "time limit"
    assert all(0 < block["steps"] < 50_000 for block in summary["blocks"])
