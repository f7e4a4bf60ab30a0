"""validate + calibration: comparison figures against numpy, inputs from random, .npz, images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from onnxcompress.errors import CompressError
from onnxcompress.graph import resolve_input_shapes
from onnxcompress.runtime import make_session, run_model
from onnxcompress.validate import (
    Calibration,
    calibration_inputs,
    compare_models,
    load_images,
    load_npz_inputs,
    parse_preprocess,
    random_inputs,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
CLASSES = 5


def classifier(seed: int = 0, batch: str | int = "N", noise: float = 0.0) -> onnx.ModelProto:
    """Conv(3->4, 3x3, pad 1) -> Relu -> Flatten -> Gemm(64 -> 5) on [batch, 3, 4, 4]."""
    rng = np.random.default_rng(seed)
    conv_w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    conv_b = rng.standard_normal(4).astype(np.float32)
    gemm_w = rng.standard_normal((CLASSES, 64)).astype(np.float32)
    gemm_w += noise * np.random.default_rng(seed + 1).standard_normal(gemm_w.shape).astype(
        np.float32
    )
    gemm_b = rng.standard_normal(CLASSES).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("Flatten", ["relu"], ["flat"]),
        helper.make_node("Gemm", ["flat", "gemm_w", "gemm_b"], ["logits"], transB=1),
    ]
    weights = {"conv_w": conv_w, "conv_b": conv_b, "gemm_w": gemm_w, "gemm_b": gemm_b}
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 4, 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, CLASSES])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    return _model(graph)


def scaled_by_rate(dtype=TensorProto.FLOAT) -> onnx.ModelProto:
    """y = x * float(sr): a batched input next to a scalar int64 one (like silero's 'sr')."""
    nodes = [
        helper.make_node("Cast", ["sr"], ["rate"], to=dtype),
        helper.make_node("Mul", ["x", "rate"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "scaled",
        [
            helper.make_tensor_value_info("x", dtype, ["batch", 4]),
            helper.make_tensor_value_info("sr", TensorProto.INT64, []),
        ],
        [helper.make_tensor_value_info("y", dtype, ["batch", 4])],
    )
    return _model(graph)


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime the project supports
    onnx.checker.check_model(model)
    return model


def numpy_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    return float(np.mean(np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)))


# -- comparison -----------------------------------------------------------------------------


def test_model_compared_with_itself_is_exact():
    model = classifier()
    calibration = calibration_inputs(model, resolve_input_shapes(model), count=6)
    report = compare_models(model, model, calibration)
    logits = report["outputs"]["logits"]
    assert logits["max_abs"] == 0.0
    assert logits["rel_l2"] == 0.0
    assert logits["cosine"] == pytest.approx(1.0)
    assert logits["top1_agreement"] == 1.0
    assert report["worst_rel_l2"] == 0.0
    assert report["samples"] == 6
    assert report["source"] == "random, standard normal N(0, 1), seed 0"


def test_perturbed_model_figures_equal_numpy():
    model, perturbed = classifier(), classifier(noise=0.05)
    shapes = resolve_input_shapes(model, {"x": [4, 3, 4, 4]})
    calibration = calibration_inputs(model, shapes, count=12)
    assert [batch["x"].shape for batch in calibration.batches] == [(4, 3, 4, 4)] * 3
    report = compare_models(model, perturbed, calibration)["outputs"]["logits"]
    a = run_model(model, calibration.batches)["logits"].astype(np.float64)
    b = run_model(perturbed, calibration.batches)["logits"].astype(np.float64)
    assert a.shape == (12, CLASSES)
    assert report["rel_l2"] > 0
    assert report["rel_l2"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a), rel=1e-9)
    assert report["max_abs"] == pytest.approx(np.abs(a - b).max(), rel=1e-9)
    assert report["cosine"] == pytest.approx(numpy_cosine(a, b), rel=1e-9)
    assert report["top1_agreement"] == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))


def test_accuracy_with_labels_equals_numpy():
    model, perturbed = classifier(), classifier(noise=0.5)
    shapes = resolve_input_shapes(model)
    batches = calibration_inputs(model, shapes, count=20, seed=3).batches
    a = run_model(model, batches)["logits"]
    b = run_model(perturbed, batches)["logits"]
    labels = np.random.default_rng(0).integers(0, CLASSES, len(a))
    labels[::2] = a.argmax(1)[::2]  # enough hits for a non-trivial accuracy
    report = compare_models(model, perturbed, Calibration(batches, labels, "test"))
    logits = report["outputs"]["logits"]
    accuracy_a = np.mean(a.argmax(1) == labels)
    accuracy_b = np.mean(b.argmax(1) == labels)
    assert logits["accuracy_original"] == pytest.approx(accuracy_a)
    assert logits["accuracy_result"] == pytest.approx(accuracy_b)
    assert logits["accuracy_drop"] == pytest.approx(accuracy_a - accuracy_b)


def test_wrong_label_count_is_an_error():
    model = classifier()
    batches = calibration_inputs(model, resolve_input_shapes(model), count=4).batches
    with pytest.raises(CompressError, match="3 labels for 4 samples"):
        compare_models(model, model, Calibration(batches, np.zeros(3, np.int64), "test"))


def test_session_error_is_one_clear_line():
    model = classifier()
    model.opset_import[0].version = 99
    with pytest.raises(CompressError, match="^onnxruntime cannot run the model: ") as error:
        make_session(model)
    assert "\n" not in str(error.value)


# -- random inputs --------------------------------------------------------------------------


def test_random_inputs_are_seeded():
    model = classifier()
    shapes = resolve_input_shapes(model)
    first = random_inputs(model, shapes, count=2, seed=0)
    again = random_inputs(model, shapes, count=2, seed=0)
    other = random_inputs(model, shapes, count=2, seed=1)
    assert len(first) == 2 and first[0]["x"].shape == (1, 3, 4, 4)
    assert all(np.array_equal(p["x"], q["x"]) for p, q in zip(first, again, strict=True))
    assert not np.array_equal(first[0]["x"], other[0]["x"])
    assert not np.array_equal(first[0]["x"], first[1]["x"])


def test_random_inputs_follow_the_input_dtype():
    model = scaled_by_rate(TensorProto.FLOAT16)
    batches = random_inputs(model, {"x": [2, 4], "sr": []}, fixed={"sr": np.array(16000)})
    assert batches[0]["x"].dtype == np.float16
    assert batches[0]["sr"] == 16000
    assert run_model(model, batches)["y"].dtype == np.float16


def test_random_inputs_refuse_int_inputs():
    with pytest.raises(CompressError, match="'sr'.*--data"):
        random_inputs(scaled_by_rate(), {"x": [1, 4], "sr": []})


# -- .npz files -----------------------------------------------------------------------------


def test_npz_is_cut_into_batches_with_labels(tmp_path):
    model = classifier()
    x = np.random.default_rng(0).standard_normal((10, 3, 4, 4)).astype(np.float32)
    labels = np.arange(10) % CLASSES
    np.savez(tmp_path / "calib.npz", x=x, labels=labels)
    shapes = resolve_input_shapes(model)
    batches, got_labels = load_npz_inputs(tmp_path / "calib.npz", model, shapes, batch_size=4)
    assert [batch["x"].shape[0] for batch in batches] == [4, 4, 2]
    assert np.array_equal(np.concatenate([batch["x"] for batch in batches]), x)
    assert np.array_equal(got_labels, labels)
    calibration = calibration_inputs(model, shapes, data=tmp_path / "calib.npz", count=7)
    assert calibration.source == "file calib.npz (7 samples)"
    assert len(calibration.labels) == 7


def test_npz_constant_input_goes_in_every_batch(tmp_path):
    model = scaled_by_rate()
    x = np.ones((6, 4), np.float32)
    np.savez(tmp_path / "audio.npz", x=x, sr=np.array(16000, np.int64))
    shapes = resolve_input_shapes(model)
    batches, _ = load_npz_inputs(tmp_path / "audio.npz", model, shapes, batch_size=3)
    assert len(batches) == 2 and all(batch["sr"] == 16000 for batch in batches)
    assert np.all(run_model(model, batches)["y"] == 16000)


def test_npz_drops_the_remainder_of_a_fixed_batch(tmp_path):
    model = classifier(batch=2)
    np.savez(tmp_path / "c.npz", x=np.zeros((5, 3, 4, 4), np.float32))
    batches, _ = load_npz_inputs(tmp_path / "c.npz", model, resolve_input_shapes(model))
    assert [batch["x"].shape[0] for batch in batches] == [2, 2]


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"image": np.zeros((2, 3, 4, 4), np.float32)}, "no array for input.*x.*image"),
        ({"x": np.zeros((2, 3, 5, 4), np.float32)}, r"'x' has shape \[2, 3, 5, 4\], expected"),
        ({"x": np.zeros((2, 3, 4, 4), np.float64)}, "'x' takes float32, the file has float64"),
        ({"x": np.zeros((2, 3, 4, 4), np.float32), "labels": np.zeros(3)}, "1-D int"),
        ({"x": np.zeros((2, 3, 4, 4), np.float32), "labels": np.zeros(3, int)}, "3 labels for 2"),
    ],
)
def test_npz_problems_are_named(tmp_path, arrays, message):
    model = classifier()
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(CompressError, match=message):
        load_npz_inputs(tmp_path / "bad.npz", model, resolve_input_shapes(model))


# -- images ---------------------------------------------------------------------------------


def write_images(folder: Path, count: int = 3, size=(4, 4)) -> list[np.ndarray]:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8) for _ in range(count)]
    for index, array in enumerate(pixels):
        Image.fromarray(array).save(folder / f"img{index}.png")
    return pixels


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
def test_image_preprocessing_arithmetic(tmp_path, layout):
    pixels = write_images(tmp_path / "images")
    preprocess = parse_preprocess(f"mean=1;2;3,std=2;4;8,scale=1/2,layout={layout},bgr")
    shape = [1, 3, 4, 4] if layout == "NCHW" else [1, 4, 4, 3]
    images, labels, names = load_images(tmp_path / "images", preprocess, shape)
    assert names == ["img0.png", "img1.png", "img2.png"] and labels is None
    assert images.shape == (3, *shape[1:]) and images.dtype == np.float32
    pixel = pixels[1][2, 3].astype(np.float32)  # row 2, column 3, RGB
    expected = (pixel[::-1] / 2 - np.array([1, 2, 3])) / np.array([2, 4, 8])
    got = images[1, :, 2, 3] if layout == "NCHW" else images[1, 2, 3, :]
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_image_resize_crop_and_dataset_labels(tmp_path):
    write_images(tmp_path / "data", size=(8, 6))
    (tmp_path / "dataset.txt").write_text(
        "./data/img2.png, 7\n./data/img0.png, 5\n./data/img1.png, 6\n./data/other.png, 1\n"
    )
    preprocess = parse_preprocess("resize=4,dtype=float16")
    images, labels, _ = load_images(
        tmp_path / "data", preprocess, [1, 3, 4, 4], labels_path=tmp_path / "dataset.txt"
    )
    assert images.shape == (3, 3, 4, 4) and images.dtype == np.float16
    assert labels.tolist() == [5, 6, 7]
    (tmp_path / "plain.txt").write_text("3\n1\n2\n")
    _, labels, _ = load_images(
        tmp_path / "data", preprocess, [1, 3, 4, 4], limit=2, labels_path=tmp_path / "plain.txt"
    )
    assert labels.tolist() == [3, 1]


def test_image_calibration_follows_the_model(tmp_path):
    write_images(tmp_path / "images", count=5)
    model = classifier()
    shapes = resolve_input_shapes(model)
    calibration = calibration_inputs(
        model, shapes, images=tmp_path / "images", preprocess="scale=1/255", batch_size=2
    )
    assert [batch["x"].shape[0] for batch in calibration.batches] == [2, 2, 1]
    assert calibration.source.endswith("(5 files)")
    assert 0 <= calibration.batches[0]["x"].min() and calibration.batches[0]["x"].max() <= 1


def test_image_problems_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CompressError, match="no image files"):
        load_images(tmp_path / "empty", parse_preprocess(""), [1, 3, 4, 4])
    write_images(tmp_path / "images", size=(6, 6))
    with pytest.raises(CompressError, match="4 channel.*layout NCHW"):
        load_images(tmp_path / "images", parse_preprocess(""), [1, 4, 4, 3])
    with pytest.raises(CompressError, match="2x2 .*takes 4x4"):
        load_images(tmp_path / "images", parse_preprocess("resize=2"), [1, 3, 4, 4])


def test_parse_preprocess():
    preprocess = parse_preprocess("resize=256,crop=224;200,mean=0.5,std=1/4,bgr,layout=nhwc")
    assert preprocess.resize == 256 and preprocess.crop == (224, 200)
    assert preprocess.mean == (0.5,) and preprocess.std == (0.25,)
    assert preprocess.bgr and not preprocess.grayscale and preprocess.layout == "NHWC"
    with pytest.raises(CompressError, match="unknown key 'size'; valid keys: resize, crop"):
        parse_preprocess("size=224")
    with pytest.raises(CompressError, match="bad value for 'layout'"):
        parse_preprocess("layout=CHW")
    with pytest.raises(CompressError, match="divides by 0"):
        parse_preprocess("scale=1/0")


@pytest.mark.skipif(not (SHARED / "models").is_dir(), reason="no ../shared data")
def test_squeezenet_on_real_images():
    model = onnx.load(str(SHARED / "models" / "squeezenet1.0_fp16.onnx"))
    folder = SHARED / "data" / "imagenet_val_1300"
    calibration = calibration_inputs(
        model,
        resolve_input_shapes(model),
        images=folder / "data",
        preprocess="resize=224,mean=104;117;123,bgr",
        labels=folder / "dataset.txt",
        count=8,
    )
    assert calibration.batches[0]["data_0"].dtype == np.float16
    assert len(calibration.batches) == 8 and len(calibration.labels) == 8
    report = compare_models(model, model, calibration)["outputs"]["softmaxout_1"]
    assert report["top1_agreement"] == 1.0
    assert 0.0 <= report["accuracy_original"] <= 1.0
    assert report["accuracy_drop"] == 0.0


def test_normalised_embeddings_get_cosine_but_no_top1():
    from onnxcompress.validate import _OutputStats

    rng = np.random.default_rng(0)
    before = rng.standard_normal((6, 16))
    before /= np.linalg.norm(before, axis=1, keepdims=True)
    after = before + 0.01 * rng.standard_normal(before.shape)
    stats = _OutputStats("embedding")
    stats.add(before, after)
    summary = stats.summary(None)
    assert "top1_agreement" not in summary and summary["cosine"] > 0.99
    logits = _OutputStats("logits")
    logits.add(3 * before, 3 * after)  # same shape, not unit rows: class scores
    assert "top1_agreement" in logits.summary(None)
    probabilities = _OutputStats("softmax")  # a confident softmax has L2 norm ≈ 1: still scores
    confident = np.full((6, 16), 1e-6)
    confident[:, 3] = 1 - 15e-6
    probabilities.add(confident, confident)
    assert "top1_agreement" in probabilities.summary(None)


# -- issue 27: what validation and random inputs rest on ------------------------------------


def two_inputs() -> onnx.ModelProto:
    """y = a + b on two float inputs [batch, 4]."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", 4]) for n in "ab"],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    return _model(graph)


def test_random_inputs_drawn_in_the_given_range():
    model, shapes = two_inputs(), {"a": [64, 4], "b": [64, 4]}
    batches = random_inputs(model, shapes, ranges={"a": (-1.0, 1.0)})
    a = np.concatenate([batch["a"] for batch in batches])
    b = np.concatenate([batch["b"] for batch in batches])
    assert a.min() >= -1 and a.max() <= 1 and a.min() < -0.9 and a.max() > 0.9
    assert np.abs(b).max() > 1.5, "b keeps the standard normal"
    mixed = calibration_inputs(model, shapes, ranges={"a": (-1.0, 1.0)})
    assert mixed.source == "random, seed 0: a uniform in [-1, 1], b standard normal N(0, 1)"
    every = calibration_inputs(model, shapes, seed=3, ranges={"": (0.0, 255.0)})
    assert every.source == "random, uniform in [0, 255], seed 3"
    assert all(0 <= batch["b"].min() and batch["b"].max() <= 255 for batch in every.batches)


@pytest.mark.parametrize(
    ("ranges", "message"),
    [
        ({"c": (-1.0, 1.0)}, "'c' is not an input"),
        ({"a": (1.0, -1.0)}, "finite numbers LO < HI"),
        ({"a": (1.0, 1.0)}, "finite numbers LO < HI"),
        ({"": (float("nan"), 1.0)}, "finite numbers LO < HI"),
        ({"": (0.0, float("inf"))}, "finite numbers LO < HI"),
        ({"a": (0.0, 1e39)}, "beyond what the input's type holds"),
    ],
)
def test_input_range_problems_are_named(ranges, message):
    with pytest.raises(CompressError, match=message):
        random_inputs(two_inputs(), {"a": [1, 4], "b": [1, 4]}, ranges=ranges)


def test_input_range_of_an_int_input_is_refused(tmp_path):
    model, shapes = scaled_by_rate(), {"x": [1, 4], "sr": []}
    with pytest.raises(CompressError, match="'sr' is an input random data cannot stand in for"):
        random_inputs(model, shapes, fixed={"sr": np.array(16)}, ranges={"sr": (0.0, 1.0)})
    np.savez(tmp_path / "d.npz", x=np.ones((2, 4), np.float32), sr=np.array(16))
    with pytest.raises(CompressError, match="--input-range .* drop it"):
        calibration_inputs(model, shapes, data=tmp_path / "d.npz", ranges={"": (0.0, 1.0)})


def test_npz_with_zero_samples_is_refused(tmp_path):
    np.savez(tmp_path / "empty.npz", x=np.zeros((0, 3, 4, 4), np.float32))
    model = classifier()
    with pytest.raises(CompressError, match="empty.npz holds 0 samples"):
        calibration_inputs(model, resolve_input_shapes(model), data=tmp_path / "empty.npz")


def test_no_samples_give_no_figures():
    model = classifier()
    empty = Calibration([{"x": np.zeros((0, 3, 4, 4), np.float32)}], None, "file e.npz")
    with pytest.raises(CompressError, match="no samples to validate on"):
        compare_models(model, classifier(noise=1.0), empty)


@pytest.mark.parametrize("empty_first", [True, False])
def test_an_output_empty_for_every_sample_is_not_taken_for_no_samples(empty_first):
    # A detector that finds nothing: boxes [0, 4] in both models, next to a real output.
    from onnxcompress.calibration import Calibration

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    boxes = helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [0, 4])
    starts, ends = (numpy_helper.from_array(np.array([v]), n) for n, v in (("s", 0), ("e", 0)))
    nodes = [
        helper.make_node("Relu", ["x"], ["y"]),
        helper.make_node("Slice", ["x", "s", "e"], ["boxes"]),
    ]
    outputs = [boxes, y] if empty_first else [y, boxes]
    graph = helper.make_graph(nodes, "g", [x], outputs, [starts, ends])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    batches = [{"x": np.ones((2, 4), np.float32)} for _ in range(3)]
    result = compare_models(model, model, Calibration(batches, None, "test"))
    assert result["samples"] == 6
    assert result["outputs"]["boxes"].get("empty") is True
    assert "empty" not in result["outputs"]["y"]
