"""A run stopped at any step of its write leaves the output as it was or as the new run made
it, complete, never a mix; SIGKILL's leftovers go with the next run on that path, SIGINT's and
SIGTERM's with the run itself.

The runs are forked from one runner process (imports paid once) that counts the steps that
change the output folder: each open for writing, rename, link, removal and mkdir there (Python's
audit events) and each half of every chunk written to a file. A run stops itself (SIGSTOP)
before step N, drawn at random from all the steps of a whole run, and the runner sends it the
signal from outside, so every kill lands inside the write.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import io
from onnxcompress.interrupts import signals_held
from tests.conftest import REPO

_RUN_TIMEOUT = 120  # seconds; one run takes well under one
_RUNNER = r"""
import json, os, signal, sys
from io import FileIO
from onnxcompress import cli, io, registry
# What a run imports, imported once here: the forked runs start at once.
import onnxcompress.pipeline, onnxcompress.validate, onnxcompress.report.terminal
import onnxcompress.report.files, onnxcompress.coding.onnxc_writer
registry.all_passes()

io.EXTERNAL_DATA_THRESHOLD = 1000  # the small models here take the large models' write path
FOLDER = os.path.realpath(sys.argv[1])
steps = {"done": 0, "stop_at": 0}


def step():
    steps["done"] += 1
    if steps["done"] == steps["stop_at"]:
        os.kill(os.getpid(), signal.SIGSTOP)  # the runner sends the signal while we wait


def inside(path):
    return isinstance(path, (str, bytes)) and os.path.realpath(os.fsdecode(path)).startswith(
        FOLDER + os.sep
    )


def audit(event, args):
    writing = (args[2] or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) if event == "open" else 0
    if writing and inside(args[0]):
        step()
    elif event in ("os.rename", "os.remove", "os.link", "os.mkdir") and inside(args[0]):
        step()


class HalvedWrites(FileIO):
    # Each chunk lands on disk in two halves, a step before each: a kill can cut a file short.
    def write(self, chunk):
        view = memoryview(chunk).cast("B")
        for part in (view[: len(view) // 2], view[len(view) // 2 :]):
            step()
            while part:  # unbuffered: a write may take less than it is given
                part = part[super().write(part) :]
        return len(view)


def halved_open(path, mode="r", *args, **kwargs):
    if "w" in mode and inside(path):
        return HalvedWrites(path, mode)
    return open(path, mode, *args, **kwargs)


def child(command):
    for fd, name in ((1, "stdout"), (2, "stderr")):
        os.dup2(os.open(command[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    io.open = halved_open
    sys.addaudithook(audit)
    steps["stop_at"] = command["stop_at"]
    try:
        code = cli.main(command["argv"])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    with open(command["steps"], "w") as fh:
        fh.write(str(steps["done"]))
    os._exit(code)


for line in sys.stdin:
    command = json.loads(line)
    pid = os.fork()
    if pid == 0:
        try:
            child(command)
        finally:
            os._exit(99)
    _, status = os.waitpid(pid, os.WUNTRACED)
    stopped = os.WIFSTOPPED(status)
    if stopped:
        os.kill(pid, getattr(signal, command["signal"]))
        os.kill(pid, signal.SIGCONT)
        _, status = os.waitpid(pid, 0)
    print(json.dumps({"stopped": stopped, "code": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Runner:
    """The runner process: `run(argv)` runs the CLI to the end (exit 0) and returns the steps
    it took; `stop(argv, at, signal)` stops it before step `at` and sends it the signal."""

    def __init__(self, folder, scratch):
        self.scratch = scratch
        self.process = subprocess.Popen(
            [sys.executable, "-c", _RUNNER, str(folder)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # a group of its own: the watchdog ends it and its runs
        )

    def _send(self, argv, stop_at, signal_name):
        files = {name: str(self.scratch / name) for name in ("stdout", "stderr", "steps")}
        Path(files["steps"]).unlink(missing_ok=True)
        command = {"argv": argv, "stop_at": stop_at, "signal": signal_name, **files}
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        watchdog = threading.Timer(_RUN_TIMEOUT, os.killpg, (self.process.pid, signal.SIGKILL))
        watchdog.start()
        try:
            answer = self.process.stdout.readline()
        finally:
            watchdog.cancel()
        assert answer, f"the runner died, or a run hung and was killed after {_RUN_TIMEOUT} s"
        return json.loads(answer)

    def run(self, argv) -> int:
        done = self._send(argv, 0, "SIGKILL")
        assert done["code"] == 0, self.stderr()
        return int((self.scratch / "steps").read_text())

    def stop(self, argv, at: int, signal_name: str) -> dict:
        return self._send(argv, at, signal_name)

    def stderr(self) -> str:
        return (self.scratch / "stderr").read_text()

    def close(self):
        self.process.stdin.close()
        self.process.wait(timeout=30)


def _mlp(seed: int, op: str) -> onnx.ModelProto:
    """x -> MatMul -> Add or Sub (bias) -> Relu -> MatMul: two models of one shape whose graph
    (the op) and weights (the seed) both differ, so a graph with another's weights shows."""
    rng = np.random.default_rng(seed)
    weights = {
        "w1": rng.standard_normal((32, 64)),
        "b1": rng.standard_normal(64),
        "w2": rng.standard_normal((64, 8)),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node(op, ["h", "b1"], ["hb"]),
        helper.make_node("Relu", ["hb"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


_FEED = {"x": np.random.default_rng(7).standard_normal((1, 32)).astype(np.float32)}


def _outputs(model_or_path) -> np.ndarray:
    source = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, _FEED)[0]


@pytest.fixture
def setup(tmp_path):
    """Two source models, the output folder (the runner watches it) and a runner."""
    sources, out, scratch = tmp_path / "in", tmp_path / "out", tmp_path / "scratch"
    for folder in (sources, out, scratch):
        folder.mkdir()
    expected = {}
    for name, (seed, op) in {"add": (1, "Add"), "sub": (2, "Sub")}.items():
        model = _mlp(seed, op)
        onnx.save(model, sources / f"{name}.onnx")
        expected[name] = _outputs(model)
    runner = Runner(out, scratch)
    yield sources, out, expected, runner
    runner.close()


def _argv(source, output, report=None):
    argv = [str(source), "--passes", "identity", "-o", str(output), "--no-bench", "-q"]
    return argv + (["--report", str(report)] if report else [])


def _which(path, expected) -> str:
    """Which model the output holds, complete: read as a file, with the data it names, the
    outputs must be those of one of the models (a mix or a short file matches neither)."""
    if path.suffix == ".onnxc":
        got = _outputs(io.load_model(path))
    else:
        got = _outputs(str(path))  # onnxruntime reads the data files itself
    matches = [name for name, want in expected.items() if np.allclose(got, want, atol=1e-5)]
    assert len(matches) == 1, f"{path.name} holds neither model whole"
    return matches[0]


def _referenced_data(path) -> set[str]:
    if path.suffix == ".onnxc":
        return set()
    model = onnx.load(str(path), load_external_data=False)
    return {
        e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"
    }


def _assert_clean(out, path, report=None):
    """Nothing in the folder but the output, the data it reads and the report."""
    present = {p.name for p in out.iterdir()}
    wanted = {path.name} | _referenced_data(path) | ({report.name} if report else set())
    assert present == wanted, f"stray files: {sorted(present - wanted)}"
    if report:
        names = sorted(p.name for p in report.iterdir())
        assert names == ["report.html", "report.json", "report.md"], names


def _assert_report_whole(report, before: dict[str, bytes]):
    """Each report file is the one there before or a whole new one."""
    for file in report.glob("report.*"):  # a SIGKILL's temp files wait for the next run
        text = file.read_bytes()
        if text == before.get(file.name):
            continue
        if file.suffix == ".json":
            json.loads(text)
        else:
            end = b"</html>\n" if file.suffix == ".html" else b"\n"
            assert text.endswith(end) and len(text) > 1000, f"{file.name} cut short"


def _kill_rounds(setup, output_name, kills, seed, with_report):
    sources, out, expected, runner = setup
    path = out / output_name
    report = out / "report" if with_report else None
    rng = random.Random(seed)
    argv = {name: _argv(sources / f"{name}.onnx", path, report) for name in expected}
    runner.run(argv["add"])
    # Steps of a whole run, by what it replaces (a model with other weights has data to remove).
    steps = {"sub": runner.run(argv["sub"]), "add": runner.run(argv["add"])}
    outcomes = {"old": 0, "new": 0}
    for _ in range(kills):
        old = _which(path, expected)
        new = "sub" if old == "add" else "add"
        reports = {f.name: f.read_bytes() for f in report.iterdir()} if report else {}
        stop = runner.stop(argv[new], rng.randint(1, steps[new]), "SIGKILL")
        assert stop["stopped"] and stop["code"] == -signal.SIGKILL, stop
        left = _which(path, expected)
        assert left in (old, new)
        outcomes["old" if left == old else "new"] += 1
        if report:
            _assert_report_whole(report, reports)
        runner.run(argv[rng.choice(list(expected))])  # the next run removes what was left
        _assert_clean(out, path, report)
    return outcomes


@pytest.mark.parametrize(
    ("output_name", "kills", "with_report"),
    [("model.onnx", 30, False), ("model.onnx", 4, True), ("model.onnxc", 6, False)],
)
def test_sigkill_anywhere_in_the_write_leaves_one_whole_model(
    setup, output_name, kills, with_report
):
    outcomes = _kill_rounds(setup, output_name, kills, seed=kills, with_report=with_report)
    assert sum(outcomes.values()) == kills
    if kills >= 30:  # some kills come before the graph's rename, some after (removing old data)
        assert outcomes["old"] and outcomes["new"], outcomes


@pytest.mark.parametrize(
    ("signal_name", "code", "words"),
    [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated")],
)
def test_sigint_and_sigterm_at_every_write_step_leave_no_stray_file(
    setup, signal_name, code, words
):
    sources, out, expected, runner = setup
    path = out / "model.onnx"
    argv = {name: _argv(sources / f"{name}.onnx", path) for name in expected}
    runner.run(argv["add"])
    steps = {"sub": runner.run(argv["sub"]), "add": runner.run(argv["add"])}
    for at in range(1, steps["sub"] + 1):
        old = _which(path, expected)
        new = "sub" if old == "add" else "add"
        stop = runner.stop(argv[new], min(at, steps[new]), signal_name)
        assert stop["stopped"] and stop["code"] == code, (at, stop, runner.stderr())
        assert runner.stderr() == f"error: {words}\n", at
        assert _which(path, expected) in (old, new)
        _assert_clean(out, path)


def test_sigterm_in_the_report_write_leaves_no_stray_file(setup):
    sources, out, expected, runner = setup
    path, report = out / "model.onnx", out / "report"
    argv = {name: _argv(sources / f"{name}.onnx", path, report) for name in expected}
    runner.run(argv["add"])
    steps = runner.run(argv["sub"])
    reports = {f.name: f.read_bytes() for f in report.iterdir()}
    for at in random.Random(0).sample(range(1, steps + 1), 2):
        stop = runner.stop(argv["add"], at, "SIGTERM")
        assert stop["stopped"] and stop["code"] == 143, (at, stop, runner.stderr())
        assert runner.stderr() == "error: terminated\n"
        _assert_report_whole(report, reports)
        _assert_clean(out, path, report)


def test_a_signal_in_a_held_block_acts_at_its_end():
    before, went_on = signal.getsignal(signal.SIGINT), []
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            went_on.append("the rest of the block")
    assert went_on == ["the rest of the block"]
    assert signal.getsignal(signal.SIGINT) is before
