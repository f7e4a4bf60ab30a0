"""The progress hook: silent by default, counted by the pipeline (passes, validation,
benchmark), drawn by the CLI with rich on stderr."""

import io
from dataclasses import dataclass

from rich.console import Console

from onnxcompress import passes
from onnxcompress.cli import main
from onnxcompress.passkit import PassContext, PassResult, PassSpec, no_progress, track
from onnxcompress.pipeline import CompressOptions, compress
from onnxcompress.report.progress import TerminalProgress
from tests.conftest import REPO

FIXTURE = REPO / "models" / "vgg_style.onnx"


class Recorder:
    """A progress hook that remembers every task: description, total, advances."""

    def __init__(self):
        self.tasks = []
        self.open = 0

    def __call__(self, description, total=None):
        recorder = self

        class Task:
            def __enter__(self):
                recorder.open += 1
                self.entry = {"description": description, "total": total, "done": 0}
                recorder.tasks.append(self.entry)
                return self

            def __exit__(self, *exc):
                recorder.open -= 1

            def advance(self, n=1):
                self.entry["done"] += n

        return Task()

    def find(self, words):
        return [t for t in self.tasks if words in t["description"]]


@dataclass(frozen=True)
class LoopOptions:
    steps: int = 5


def _looping_pass(model, options, context):
    with context.progress("looping layers", options.steps) as task:
        for _ in range(options.steps):
            task.advance()
    return PassResult(model, False)


def test_default_hook_is_silent_and_usable():
    context = PassContext(input_shapes={})
    assert context.progress is no_progress
    with context.progress("anything", 3) as task:
        task.advance()
        task.advance(2)
    with no_progress("unknown amount") as task:
        task.advance()


def test_track_counts_each_item_after_its_work():
    recorder = Recorder()
    seen = []
    for item in track(recorder, "items", ["a", "b", "c"]):
        seen.append((item, recorder.tasks[0]["done"]))
    assert seen == [("a", 0), ("b", 1), ("c", 2)]
    assert recorder.tasks == [{"description": "items", "total": 3, "done": 3}]
    assert recorder.open == 0


def test_pipeline_reports_pass_validation_and_benchmark(tmp_path, monkeypatch):
    spec = PassSpec("looper", _looping_pass, LoopOptions, "test-only pass with a loop")
    monkeypatch.setitem(passes.all_passes(), "looper", spec)
    recorder = Recorder()
    steps = []
    options = CompressOptions(
        passes=["looper"],
        pass_options={"looper": {"steps": "7"}},
        output=str(tmp_path / "o.onnx"),
        bench_repeats=2,
        calibration_count=6,
        batch_size=2,
    )
    result = compress(FIXTURE, options, on_step=steps.append, progress=recorder)
    assert recorder.open == 0, "every task is closed"
    (loop,) = recorder.find("looping layers")
    assert loop == {"description": "looping layers", "total": 7, "done": 7}
    (validation,) = recorder.find("validation")
    batches = validation["total"]
    assert batches >= 2 and validation["done"] == batches
    assert result.report["validation"]["samples"] == 6
    (bench,) = recorder.find("benchmark")
    assert bench["total"] is None
    assert steps[:2] == ["load", "analyse"] and "benchmark" in steps


def test_terminal_progress_draws_bars():
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    with TerminalProgress(console) as shown:
        shown.step("validate")
        with shown("validation batches", 4) as task:
            task.advance(4)
            shown._progress.refresh()
        with shown("benchmark", None):
            shown._progress.refresh()
    text = buffer.getvalue()
    assert "validate …" in text and "validation batches" in text and "4/4" in text
    assert "benchmark" in text


def test_cli_without_quiet_runs_with_progress(tmp_path, capsys):
    out = tmp_path / "o.onnx"
    assert main([str(FIXTURE), "--passes", "identity", "-o", str(out), "--no-bench"]) == 0
    assert out.exists()
    assert "rel L2" in capsys.readouterr().out  # the tables still go to stdout


def test_an_outlined_pass_gets_one_estimate_of_its_time_left(monkeypatch):
    """Shares 3:1 over two loops; half of the first done after 30 s: 3/8 of the pass is done,
    so 50 s remain, said on the step line; a later step drops the estimate."""
    from onnxcompress.report import progress as progress_module

    clock = iter([0.0, 30.0, 30.0, 60.0, 60.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100)
    with TerminalProgress(console) as shown:
        shown.step("pass auto")
        shown.outline({"first": 3.0, "second": 1.0})
        with shown("first", 4) as task:
            task.advance(2)
            shown._progress.refresh()
            assert "pass auto … about 0:50 left" in buffer.getvalue()
            task.advance(2)  # first done: 3/4 after 30 s -> 10 s left
            shown._progress.refresh()
            assert "about 0:10 left" in buffer.getvalue()
        with shown("inner, not outlined", 3) as task:
            task.advance()  # says nothing new
        shown.step("check")
        shown._progress.refresh()
    assert "check …" in buffer.getvalue()


def test_auto_outlines_loops_it_opens():
    """Each outlined loop is one the search opens by that name."""
    from onnxcompress.auto import rounds, search

    opened = {search.SENSITIVITY_LOOP, search.TIMING_LOOP, search.RETIME_LOOP, rounds.PLANS_LOOP}
    assert set(search.OUTLINE) == opened and abs(sum(search.OUTLINE.values()) - 1) < 1e-9
