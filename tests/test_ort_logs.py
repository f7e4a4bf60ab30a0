"""onnxruntime's own log lines (coloured, timestamped `[E:onnxruntime:...]`) never reach stderr:
broken models that pass the ONNX checker and fail inside onnxruntime end in one `error:` line.

The cases are built in code and run through `analyse`, `identity`, `svd` and `int8` in one
subprocess, stderr captured at the file descriptor (where onnxruntime's C++ logger writes). A
control run with onnxruntime's log level lowered shows the cases do make onnxruntime speak.
"""

import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.fuzz_inputs import RUN_CAPTURED
from tests.conftest import REPO

# Runs every (command, model) in one process; argv: the JSON list of runs, then "loud" to
# let onnxruntime log its warnings and errors (the control).
_CASES = (
    r"""
import sys
if sys.argv[2] == "loud":
    from onnxcompress import errors
    errors.ORT_LOG_SEVERITY = 2
"""
    + RUN_CAPTURED
    + "print(json.dumps([run(argv) for argv in json.loads(sys.argv[1])]))"
)

_X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])


def _model(nodes, initializers, output_shape, opset=17, x=_X) -> onnx.ModelProto:
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)
    graph = helper.make_graph(nodes, "case", [x], [y], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _weight(name, shape, seed=0):
    values = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return numpy_helper.from_array(values, name)


def _conv(output_shape=(1, 4, 6, 6), **attributes) -> onnx.ModelProto:
    """A 3x3 Conv with a broken attribute; its declared output shape is what a sound Conv
    would give, so the ONNX checker passes it on to onnxruntime."""
    node = helper.make_node("Conv", ["x", "w"], ["y"], **attributes)
    return _model([node], [_weight("w", (4, 3, 3, 3))], list(output_shape))


def _flat(op, extra_inputs, initializers, output_shape, **attributes) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12])
    node = helper.make_node(op, ["x", *extra_inputs], ["y"], **attributes)
    return _model([node], initializers, output_shape, x=x)


def _cycle() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"]),
        helper.make_node("Relu", ["a"], ["b"]),
        helper.make_node("Identity", ["b"], ["y"]),
    ]
    return _model(nodes, [], [1, 3, 8, 8])


def _matmul(output_shape, opset=17) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    return _model([node], [_weight("w", (16, 8))], output_shape, opset=opset, x=x)


# name -> model, or bytes for a file that is not a whole model
CASES = {
    "conv garbage auto_pad": lambda: _conv(auto_pad="GARBAGE"),
    "conv kernel_shape unlike its weight": lambda: _conv(kernel_shape=[5, 5]),
    "conv group that does not divide": lambda: _conv(group=2),
    "conv group 0": lambda: _conv(group=0),
    "conv strides 0": lambda: _conv(strides=[0, 0]),
    "conv negative pads": lambda: _conv(pads=[-5, -5, -5, -5]),
    "conv dilations 0": lambda: _conv(dilations=[0, 0]),
    "reshape to a shape of another size": lambda: _flat(
        "Reshape", ["shape"], [numpy_helper.from_array(np.array([5, -1]), "shape")], [5, 3]
    ),
    "gather index out of range": lambda: _flat(
        "Gather", ["index"], [numpy_helper.from_array(np.array([40]), "index")], [1, 1], axis=1
    ),
    "declared output shape wrong": lambda: _matmul([1, 5]),
    "cycle": _cycle,
    "opset newer than onnxruntime's": lambda: _matmul([1, 8], opset=onnx.defs.onnx_opset_version()),
    "opset 1": lambda: _matmul([1, 8], opset=1),
    "truncated file": lambda: _conv(auto_pad="GARBAGE").SerializeToString()[:150],
}
_RUN = ["--no-bench", "-q", "-o"]
COMMANDS = {
    "analyse": lambda path, out: ["analyse", path],
    "identity": lambda path, out: [path, "--passes", "identity", *_RUN, out],
    "svd": lambda path, out: [path, "--passes", "svd", *_RUN, out],
    # onnxruntime's quantizer makes sessions of its own, and logs through Python's logging
    "int8": lambda path, out: [path, "--passes", "int8", "--data", f"{path}.npz", *_RUN, out],
}


@pytest.fixture(scope="module")
def case_files(tmp_path_factory) -> dict[str, str]:
    """Each case as a file, with calibration data for its input beside it (`<file>.npz`)."""
    folder = tmp_path_factory.mktemp("ort_logs")
    files = {}
    for number, (name, build) in enumerate(CASES.items()):
        made = build()
        path = folder / f"case{number}.onnx"
        path.write_bytes(made if isinstance(made, bytes) else made.SerializeToString())
        shape = [1, 16]
        if not isinstance(made, bytes):
            shape = [d.dim_value for d in made.graph.input[0].type.tensor_type.shape.dim]
        samples = np.random.default_rng(0).standard_normal([8, *shape[1:]]).astype(np.float32)
        np.savez(f"{path}.npz", x=samples)
        files[name] = str(path)
    return files


def _run_all(runs: list[list[str]], mode: str) -> list[tuple[int, str]]:
    done = subprocess.run(
        [sys.executable, "-c", _CASES, json.dumps(runs), mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _runs(case_files, out, extra=()) -> dict[tuple[str, str], list[str]]:
    """(case, command) -> the command line."""
    return {
        (case, command): [*make(path, str(out)), *extra]
        for case, path in case_files.items()
        for command, make in COMMANDS.items()
    }


@pytest.fixture(scope="module")
def quiet_results(case_files, tmp_path_factory) -> dict[tuple[str, str], tuple[int, str]]:
    """(case, command) -> (exit code, stderr) of the tool as users run it."""
    runs = _runs(case_files, tmp_path_factory.mktemp("out") / "out.onnx")
    return dict(zip(runs, _run_all(list(runs.values()), "quiet"), strict=True))


def _ort_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":onnxruntime:" in line]


def test_onnxruntime_never_logs_onto_stderr(quiet_results):
    failures = 0
    for (case, command), (code, stderr) in quiet_results.items():
        where = f"{case}, {command}: exit {code}, stderr {stderr!r}"
        assert not _ort_lines(stderr), where
        lines = stderr.splitlines()
        if code == 0:
            assert lines == [], where
            continue
        failures += 1
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), where
        assert "internal error" not in lines[0], where
        assert not re.search(r"\.(?:h|cc|cpp):\d+", lines[0]), where  # C++ source locations
    assert failures >= len(CASES)  # most commands on most cases fail: the cases are broken


def test_onnxruntime_speaks_on_these_cases_when_let(case_files, tmp_path):
    # The control: with its log level lowered, onnxruntime logs on the cases the test above
    # holds quiet, so that test could fail.
    runs = _runs(case_files, tmp_path / "out.onnx")
    results = dict(zip(runs, _run_all(list(runs.values()), "loud"), strict=True))
    speaking = {case for (case, _), (_, stderr) in results.items() if _ort_lines(stderr)}
    assert len(speaking) >= 5, speaking


def test_verbose_runs_end_in_the_same_exit_code(case_files, quiet_results, tmp_path):
    verbose = _runs(case_files, tmp_path / "out.onnx", extra=["-v"])
    results = _run_all(list(verbose.values()), "quiet")
    for key, (verbose_code, stderr) in zip(verbose, results, strict=True):
        code = quiet_results[key][0]
        assert verbose_code == code, (key, stderr[-500:])
        if code:
            assert stderr.strip().splitlines()[-1].startswith("error: "), (key, stderr[-500:])
