"""distill pass: the graph keeps its structure, a student equal to its teacher is left alone,
a damaged factorization recovers on held-out inputs, runs repeat exactly, refusals are one
line, and the CLI writes a valid model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxcompress.passes import get_pass
from onnxcompress.passes.distill import DEFAULT_STEPS, steps_for
from scipy.special import log_softmax

from models.fixtures import LOGITS, mlp
from onnxcompress import graph
from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import run_model
from onnxcompress.samples import ArraySource
from onnxcompress.samples.npz_stream import NpzStream
from onnxcompress.samples.training_set import training_source
from tests.conftest import REPO
from tests.passes.mlp_training import SHAPES, batches, held_out_error, training_context, weights
from tests.test_cli import one_error_line, run_cli

DISTILL = get_pass("distill")
SVD = get_pass("svd")
FAST = {"steps": 60, "lr": 3e-3, "batch_size": 32, "threads": 1}


@pytest.fixture(scope="module")
def damaged():
    """(teacher, student): mlp and its SVD at rank 4 without refit, a deliberately poor fit."""
    teacher = mlp()
    options = SVD.make_options({"rank": 4, "refit": False, "never_slower": False})
    student = SVD.run(teacher, options, PassContext(SHAPES)).model
    return teacher, graph.cleanup_and_sort(student)


def _distill(student, teacher, calibration=None, training=None, **options):
    context = training_context(teacher, calibration, training=training)
    return DISTILL.run(student, DISTILL.make_options({**FAST, **options}), context)


def test_structure_is_kept_and_only_weights_change(damaged):
    teacher, student = damaged
    result = _distill(student, teacher)
    assert result.changed
    graph.check_model(result.model)  # full checker and strict shape inference
    assert list(result.model.graph.node) == list(student.graph.node)
    before, after = weights(student), weights(result.model)
    assert {n: v.shape for n, v in after.items()} == {n: v.shape for n, v in before.items()}
    assert any(not np.array_equal(before[n], after[n]) for n in before)
    summary = result.summary
    assert summary["held_out_loss_after"] < summary["held_out_loss_before"]
    assert summary["steps"] == FAST["steps"] and summary["trained_params"] > 0
    assert all(r.status == "rewritten" for r in result.records) and result.records


def test_distillation_lowers_the_error_on_held_out_inputs(damaged):
    teacher, student = damaged
    result = _distill(student, teacher)
    assert held_out_error(result.model, teacher) < 0.8 * held_out_error(student, teacher)


def test_a_student_equal_to_its_teacher_stays_equal():
    teacher = mlp()
    copy = onnx.ModelProto()
    copy.CopyFrom(teacher)
    result = _distill(copy, teacher)
    assert not result.changed and result.model is copy
    assert "nothing to recover" in result.summary["note"]


def test_same_seed_same_weights(damaged):
    teacher, student = damaged
    first, second = (_distill(student, teacher, steps=20) for _ in range(2))
    a, b = weights(first.model), weights(second.model)
    assert all(np.array_equal(a[name], b[name]) for name in a)


def test_new_trains_only_the_weights_the_teacher_lacks(damaged):
    teacher, student = damaged
    result = _distill(student, teacher, trainable="new", steps=20)
    old = {init.name for init in teacher.graph.initializer}
    before, after = weights(student), weights(result.model)
    assert all(np.array_equal(before[n], after[n]) for n in before if n in old)
    assert result.summary["trained_tensors"] == sum(
        1 for n in before if n not in old and before[n].ndim >= 1
    )


def test_features_loss_matches_rewritten_layer_outputs(damaged):
    teacher, student = damaged
    result = _distill(student, teacher, loss="features", steps=20)
    assert result.summary["features"] >= 1 and result.changed


def test_a_time_limit_stops_early_and_keeps_the_best(damaged):
    teacher, student = damaged
    result = _distill(student, teacher, steps=100_000, time_limit=1.0)
    assert result.summary["stopped_by"] == "time limit"
    assert result.summary["steps"] < 100_000


def test_the_clock_paces_the_learning_rate_under_a_time_limit():
    pytest.importorskip("torch")
    from onnxcompress.train.torch_distill import Schedule, _progress

    by_steps = Schedule(steps=100, lr=1e-3, batch_size=8, seed=0, threads=1)
    timed = Schedule(steps=100, lr=1e-3, batch_size=8, seed=0, threads=1, time_limit=10.0)
    assert _progress(25, by_steps, elapsed=9.0) == 0.25
    assert _progress(25, timed, elapsed=5.0) == 0.5  # the clock is further than the steps
    assert _progress(80, timed, elapsed=5.0) == 0.8
    assert _progress(30, timed, elapsed=12.0) == 1.0  # time is up: the decay has ended


class _CtrlCAt:
    """A progress task that raises KeyboardInterrupt (as Ctrl-C does) at its n-th step."""

    def __init__(self, at: int):
        self.at, self.count = at, 0

    def __call__(self, description, total=None):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def advance(self, n=1):
        self.count += n
        if self.count == self.at:
            raise KeyboardInterrupt


def test_ctrl_c_stops_and_keeps_the_best_weights_so_far(damaged):
    teacher, student = damaged
    context = PassContext(
        SHAPES, batches(8, 0), seed=0, threads=1, original=teacher, progress=_CtrlCAt(10)
    )
    result = DISTILL.run(student, DISTILL.make_options(FAST), context)
    assert result.summary["stopped_by"] == "interrupted" and result.summary["steps"] == 10
    assert result.changed and "stopped (interrupted)" in result.summary["note"]
    graph.check_model(result.model)


def test_refuses_without_data(damaged):
    teacher, student = damaged
    with pytest.raises(CompressError, match="needs calibration data") as caught:
        _distill(student, teacher, calibration=[])
    assert "\n" not in str(caught.value)


def test_refuses_without_torch(damaged, monkeypatch):
    import onnxcompress.train as train

    teacher, student = damaged
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    for name in ("onnxcompress.train.torch_distill", "onnxcompress.train.torch_graph"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delattr(train, "torch_distill", raising=False)
    with pytest.raises(CompressError, match=r"pip install 'onnxcompress\[train\]'") as caught:
        _distill(student, teacher)
    assert "\n" not in str(caught.value)


def _softsign_model(scale: float) -> onnx.ModelProto:
    weight = numpy_helper.from_array(np.eye(64, dtype=np.float32) * scale, "w")
    nodes = [
        helper.make_node("MatMul", ["input", "w"], ["y"], name="mm"),
        helper.make_node("Softsign", ["y"], ["logits"], name="soft"),
    ]
    body = helper.make_graph(
        nodes,
        "softsign",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 64])],
        [weight],
    )
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)])


def test_an_op_torch_cannot_run_after_the_changed_layer_is_no_refusal():
    # Not refused: the changed MatMul trains on its own (tests/passes/test_distill_blockwise.py
    # checks what that achieves).
    result = _distill(_softsign_model(0.5), _softsign_model(1.0))
    assert result.summary["blockwise"] == "only" and "Softsign" in result.summary["note"]
    (block,) = result.summary["blocks"]
    assert block["block"] == "y" and block["steps"] == FAST["steps"]


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"steps": 0}, "steps"),
        ({"loss": "kl"}, "loss"),
        ({"output_loss": "ce"}, "output_loss"),
        ({"holdout": 1.0}, "holdout"),
        ({"augment": "rotate"}, "augment"),
        ({"steps": 100, "epochs": 2}, "steps or epochs, not both"),
        ({"epochs": 0}, "epochs"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_options_are_refused(raw, words):
    with pytest.raises(CompressError, match=words):
        DISTILL.make_options(raw)


def test_cli_svd_then_distill(tmp_path):
    model, data, out = tmp_path / "mlp.onnx", tmp_path / "calib.npz", tmp_path / "out.onnx"
    onnx.save(mlp(), model)
    np.savez(data, input=np.concatenate([b["input"] for b in batches(4, 1)]))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxcompress",
            str(model),
            "--passes",
            "svd,distill",
            "--data",
            str(data),
            "-o",
            str(out),
            "--opt",
            "svd.rank=8",
            "--opt",
            "svd.never_slower=false",
            "--opt",
            "distill.steps=10",
            "--opt",
            "distill.threads=1",
            "--no-bench",
            "-q",
            "--max-rel-l2",
            "10",
        ],  # fmt: skip
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    graph.check_model(onnx.load(out))


def test_the_augment_option_reaches_the_training(damaged, monkeypatch):
    from onnxcompress.train import torch_distill

    seen = []
    real = torch_distill.augmented
    monkeypatch.setattr(
        torch_distill,
        "augmented",
        lambda batch, kinds, rng: seen.append(kinds) or real(batch, kinds, rng),
    )
    teacher, student = damaged
    _distill(student, teacher, steps=2, augment="flip,shift")
    assert seen == [("flip", "shift")] * 2


def test_augmentations_touch_only_images():
    from onnxcompress.train.torch_distill import augmented

    rng = np.random.default_rng(0)
    images = rng.standard_normal((16, 3, 8, 8)).astype(np.float32)
    rows = rng.standard_normal((16, 64)).astype(np.float32)
    batch = {"image": images, "rows": rows}
    flipped = augmented(batch, ("flip",), np.random.default_rng(1))
    assert flipped["rows"] is rows and flipped["image"].shape == images.shape
    mirrored = [
        np.array_equal(f, i[:, :, ::-1]) for f, i in zip(flipped["image"], images, strict=True)
    ]
    kept = [np.array_equal(f, i) for f, i in zip(flipped["image"], images, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True)) and any(mirrored) and any(kept)
    shifted = augmented(batch, ("shift",), np.random.default_rng(1))["image"]
    assert shifted.shape == images.shape and not np.array_equal(shifted, images)
    assert np.array_equal(augmented(batch, (), rng)["image"], images)


def _softmax_kl(model, teacher) -> float:
    unseen = batches(4, 99)
    ours, theirs = run_model(model, unseen)["logits"], run_model(teacher, unseen)["logits"]
    log_p, log_q = log_softmax(ours, axis=1), log_softmax(theirs, axis=1)
    return float(np.mean(np.sum(np.exp(log_q) * (log_q - log_p), axis=1)))


def test_kl_output_loss_matches_the_class_probabilities(damaged):
    teacher, student = damaged
    result = _distill(student, teacher, output_loss="kl")
    assert result.changed
    assert _softmax_kl(result.model, teacher) < 0.8 * _softmax_kl(student, teacher)


@pytest.mark.parametrize("output_loss", ["kl", "mse"])
def test_the_output_loss_option_reaches_the_training(damaged, monkeypatch, output_loss):
    from onnxcompress.train import torch_distill

    seen = []
    real = torch_distill.softmax_kl
    monkeypatch.setattr(
        torch_distill, "softmax_kl", lambda p, t: seen.append(p.shape) or real(p, t)
    )
    teacher, student = damaged
    _distill(student, teacher, steps=2, output_loss=output_loss)
    # Two training steps on batches of 32, and the held-out choice: all by KL, or none.
    assert (seen.count((32, 10)) >= 2) if output_loss == "kl" else not seen


def test_softmax_kl_is_zero_when_the_classes_agree_and_ignores_a_shift():
    torch = pytest.importorskip("torch")
    from onnxcompress.train.torch_distill import softmax_kl

    logits = torch.randn(6, 10)
    assert float(softmax_kl(logits, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(softmax_kl(logits + 3.0, logits)) == pytest.approx(0.0, abs=1e-5)
    assert float(softmax_kl(torch.randn(6, 10), logits)) > 0.01


def test_epochs_give_the_steps():
    def steps(count, **raw):
        return steps_for(DISTILL.make_options(raw), count)

    assert steps(100, epochs=2.5, batch_size=32) == 8  # ceil(2.5 · 100 / 32)
    assert steps(10, epochs=2, batch_size=64) == 2  # a batch is at most every sample
    assert steps(100, steps=7) == 7 and steps(100) == DEFAULT_STEPS


def test_epochs_reach_the_training(damaged):
    teacher, student = damaged
    result = _distill(student, teacher, steps=None, epochs=1)
    summary = result.summary
    assert summary["steps"] == -(-summary["train_samples"] // FAST["batch_size"])
    assert 1 <= summary["epochs"] < 1 + FAST["batch_size"] / summary["train_samples"]


def test_the_device_is_chosen_and_cuda_refused_without_a_gpu(monkeypatch):
    torch = pytest.importorskip("torch")
    from onnxcompress.train.torch_distill import device_for

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert device_for("auto") == "cpu" and device_for("cpu") == "cpu"
    with pytest.raises(CompressError, match="device=cuda, but torch sees no GPU") as caught:
        device_for("cuda")
    assert "\n" not in str(caught.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert [device_for(choice) for choice in ("auto", "cpu", "cuda")] == ["cuda", "cpu", "cuda"]


def test_cuda_without_a_gpu_ends_the_pass_in_one_line(damaged, monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    teacher, student = damaged
    with pytest.raises(CompressError, match="no GPU"):
        _distill(student, teacher, device="cuda")
    assert _distill(student, teacher, steps=2).summary["device"] == "cpu"  # auto


def _npz_parts(folder, counts, seed=5) -> list:
    """.npz files of mlp inputs, `counts` samples each."""
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for index, count in enumerate(counts):
        paths.append(folder / f"part{index}.npz")
        np.savez(paths[-1], input=rng.standard_normal((count, 64)).astype(np.float32))
    return paths


def _stream(paths) -> NpzStream:
    return NpzStream(paths, {"input": np.dtype(np.float32)}, SHAPES)


def test_trains_on_a_stream_of_npz_files_and_chooses_on_held_out_calibration(damaged, tmp_path):
    teacher, student = damaged
    stream = _stream(_npz_parts(tmp_path, [150, 90, 130]))
    result = _distill(student, teacher, training=stream)
    summary = result.summary
    assert summary["train_samples"] == 370 and "3 .npz" in summary["training_data"]
    assert summary["held_out_samples"] == round(8 * 32 * DISTILL.make_options({}).holdout)
    assert held_out_error(result.model, teacher) < 0.8 * held_out_error(student, teacher)
    again = _distill(student, teacher, training=stream)
    a, b = weights(result.model), weights(again.model)
    assert all(np.array_equal(a[name], b[name]) for name in a)  # same seed, same weights


def test_one_npz_file_trains_as_the_same_samples_in_memory(damaged, tmp_path):
    teacher, student = damaged
    (path,) = _npz_parts(tmp_path, [200])
    with np.load(path) as archive:
        memory = ArraySource({"input": archive["input"]})
    streamed = _distill(student, teacher, training=_stream([path]), steps=20)
    held = _distill(student, teacher, training=memory, steps=20)
    assert streamed.changed and held.changed
    a, b = weights(streamed.model), weights(held.model)
    assert all(np.array_equal(a[name], b[name]) for name in a)


def _tiny_cnn() -> onnx.ModelProto:
    """Conv 3→4 (3x3, pads 1) → Relu → global pooling → Gemm on 4x4 RGB images."""
    from models.fixtures import GraphBuilder, _tensor

    b = GraphBuilder(0)
    x = b.relu("relu", b.conv("conv", "input", 3, 4))
    logits = b.classifier_head(x, 4)
    return b.model("tiny_cnn", 0, [_tensor("input", ["batch", 3, 4, 4])], [_tensor(logits, LOGITS)])


def test_an_image_folder_trains_as_the_same_images_decoded_up_front(tmp_path):
    from onnxcompress.images import load_images, parse_preprocess
    from tests.test_validate import write_images

    teacher = _tiny_cnn()
    student = onnx.ModelProto()
    student.CopyFrom(teacher)
    conv = next(init for init in student.graph.initializer if init.dims[:1] == [4])
    conv.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(conv) * 0.5, conv.name))
    write_images(tmp_path / "images", count=20)
    shapes = {"input": [1, 3, 4, 4]}
    spec = "scale=1/255"
    images, _, _ = load_images(tmp_path / "images", parse_preprocess(spec), shapes["input"])
    rng = np.random.default_rng(0)
    calibration = [{"input": rng.random((10, 3, 4, 4), dtype=np.float32)}]
    results = []
    for source in (
        training_source(teacher, shapes, [tmp_path / "images"], spec),
        ArraySource({"input": images}),
    ):
        context = PassContext(
            shapes, calibration, seed=0, threads=1, original=teacher, training=source
        )
        options = DISTILL.make_options({**FAST, "steps": 6, "batch_size": 8})
        result = DISTILL.run(student, options, context)
        assert result.changed
        results.append(weights(result.model))
    assert all(np.array_equal(results[0][name], results[1][name]) for name in results[0])


def _cli_files(tmp_path):
    model, data = tmp_path / "mlp.onnx", tmp_path / "calib.npz"
    onnx.save(mlp(), model)
    np.savez(data, input=np.concatenate([b["input"] for b in batches(2, 1)]))
    return model, data, _npz_parts(tmp_path / "train", [40, 30])


def test_cli_trains_on_train_data_and_reports_it(tmp_path):
    model, data, _ = _cli_files(tmp_path)
    code = run_cli(
        model, "--passes", "svd,distill", "--data", data, "--train-data", tmp_path / "train",
        "-o", tmp_path / "out.onnx", "--opt", "svd.rank=8", "--opt", "svd.never_slower=false",
        "--opt", "distill.steps=5", "--opt", "distill.threads=1", "--no-bench", "-q",
        "--report", tmp_path / "report.json",
    )  # fmt: skip
    assert code in (0, 1)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["training_data"] == "2 .npz file(s) (70 samples)"
    assert report["passes"][1]["summary"]["train_samples"] == 70
    assert not any("--train-data" in warning for warning in report["warnings"])


def test_cli_warns_when_no_pass_reads_the_train_data(tmp_path):
    model, data, _ = _cli_files(tmp_path)
    run_cli(
        model, "--passes", "fold_bn", "--data", data, "--train-data", tmp_path / "train",
        "-o", tmp_path / "out.onnx", "--no-bench", "-q", "--report", tmp_path / "report.json",
    )  # fmt: skip
    report = json.loads((tmp_path / "report.json").read_text())
    assert any("--train-data" in warning for warning in report["warnings"])


def test_cli_refuses_train_data_that_does_not_fit_the_model(tmp_path, capsys):
    model, data, _ = _cli_files(tmp_path)
    np.savez(tmp_path / "bad.npz", input=np.zeros((5, 32), np.float32))
    code = run_cli(
        model, "--passes", "svd,distill", "--data", data, "--train-data", tmp_path / "bad.npz",
        "-o", tmp_path / "out.onnx", "--no-bench",
    )  # fmt: skip
    assert code == 2
    assert "array 'input' has shape [5, 32], expected ['N', 64]" in one_error_line(capsys)
    assert not (tmp_path / "out.onnx").exists()


def test_pruned_zeros_stay_zero_and_the_rest_still_recovers():
    teacher = mlp()
    prune = get_pass("prune")
    options = prune.make_options({"sparsity": 0.7, "keep": "none"})
    student = prune.run(teacher, options, PassContext(SHAPES)).model
    result = _distill(student, teacher)
    before, after = weights(student), weights(result.model)
    zeros = {name: value == 0 for name, value in before.items() if np.any(value == 0)}
    assert zeros and result.summary["held_zeros"] == sum(int(z.sum()) for z in zeros.values())
    for name, zero in zeros.items():
        assert np.array_equal(after[name][zero].view(np.uint32), before[name][zero].view(np.uint32))
        assert not np.array_equal(after[name][~zero], before[name][~zero])  # the rest trained
    assert held_out_error(result.model, teacher) < 0.8 * held_out_error(student, teacher)


def test_labels_train_a_cross_entropy_and_choose_the_weights_by_it_too(damaged):
    teacher, student = damaged
    calibration = batches(8, 0)
    logits = run_model(teacher, calibration)["logits"]
    context = training_context(teacher, calibration, labels=logits.argmax(axis=1))
    options = DISTILL.make_options({**FAST, "labels": True})
    with_labels = DISTILL.run(student, options, context)
    without = _distill(student, teacher, calibration)
    assert with_labels.summary["labels"] and not without.summary["labels"]
    # the held-out loss holds the cross-entropy on the held-out labels: above the MSE alone
    before = with_labels.summary["held_out_loss_before"]
    assert before > without.summary["held_out_loss_before"] + 0.01
    assert with_labels.changed
    assert held_out_error(with_labels.model, teacher) < held_out_error(student, teacher)


def test_a_model_that_fixes_its_batch_at_one_still_trains_in_batches():
    teacher = mlp()
    for value in (*teacher.graph.input, *teacher.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = 1  # as SqueezeNet's file does
    options = SVD.make_options({"rank": 4, "refit": False, "never_slower": False})
    student = graph.cleanup_and_sort(
        SVD.run(teacher, options, PassContext({"input": [1, 64]})).model
    )
    one_by_one = [{"input": row[None]} for batch in batches(2, 0) for row in batch["input"]]
    context = training_context(teacher, one_by_one)
    result = DISTILL.run(student, DISTILL.make_options({**FAST, "batch_size": 16}), context)
    assert result.changed
    singles = [{"input": row[None]} for batch in batches(1, 99) for row in batch["input"]]
    ours, theirs = run_model(result.model, singles), run_model(teacher, singles)
    before = run_model(student, singles)
    error = np.linalg.norm(ours["logits"] - theirs["logits"])
    assert error < np.linalg.norm(before["logits"] - theirs["logits"])
