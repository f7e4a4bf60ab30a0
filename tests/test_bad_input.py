"""Inputs that used to crash deep inside ("internal error") or eat unbounded memory: each now
ends in one line `error: ...` and exit 2, before anything large is allocated (issue 27)."""

import math
import resource
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress.errors import CompressError
from onnxcompress.input_checks import MAX_RANDOM_BYTES, random_batch_count
from tests.conftest import REPO
from tests.test_cli import one_error_line, run_cli

# Address-space cap for runs that used to allocate without bound: a normal run of these tiny
# models needs well under it, the unbounded ones died far above it.
MEMORY_CAP = 2 << 30


def _relu_model(dims) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(dims))
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _two_layers(kind: str, bad: str | None = None, value=np.nan) -> onnx.ModelProto:
    """fc1/conv1 → Relu → fc2/conv2 → Max with a -inf constant (as attention masks hold);
    `bad` names the weight that gets one non-finite `value`."""
    rng = np.random.default_rng(0)
    if kind == "gemm":
        shapes, dims, out = {"W1": (16, 32), "W2": (32, 8)}, [4, 16], [4, 8]
        op, names, attrs = "Gemm", ("fc1", "fc2"), {}
    else:
        shapes, dims, out = {"W1": (32, 8, 3, 3), "W2": (8, 32, 3, 3)}, [1, 8, 8, 8], [1, 8, 8, 8]
        op, names, attrs = "Conv", ("conv1", "conv2"), {"pads": [1, 1, 1, 1]}
    weights = {
        name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()
    }
    if bad is not None:
        weights[bad].flat[5] = value
    mask = np.array(-np.inf, dtype=np.float32)  # a legitimate -inf: no pass reads it
    nodes = [
        helper.make_node(op, ["x", "W1"], ["h"], name=names[0], **attrs),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node(op, ["r", "W2"], ["z"], name=names[1], **attrs),
        helper.make_node("Max", ["z", "mask"], ["y"], name="masked"),
    ]
    inits = [numpy_helper.from_array(w, n) for n, w in weights.items()]
    inits.append(numpy_helper.from_array(mask, "mask"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _capped_cli(*args):
    """The CLI in a child process whose address space is capped at MEMORY_CAP."""

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))

    return subprocess.run(
        [sys.executable, "-m", "onnxcompress", *map(str, args), "-q", "--no-bench"],
        capture_output=True,
        text=True,
        cwd=REPO,
        preexec_fn=cap,
        timeout=120,
    )


def _one_error(done) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "internal error" not in lines[0]
    return lines[0]


# -- bounds: random calibration and input dims ---------------------------------------------


def test_huge_calib_count_refused_with_the_count_that_fits(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(_relu_model([1, 65536]), model)
    done = _capped_cli(
        model, "--passes", "identity", "--calib-count", 10**12, "-o", tmp_path / "o.onnx"
    )
    line = _one_error(done)
    fits = MAX_RANDOM_BYTES // (65536 * 4)
    assert f"--calib-count {fits}" in line and str(10**12) in line


def test_calib_count_that_fits_still_runs(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(_relu_model([1, 16]), model)
    out = tmp_path / "o.onnx"
    assert run_cli(model, "--passes", "identity", "--calib-count", 9, "-o", out, "--no-bench") == 0


def test_default_random_batches_shrink_to_fit_and_a_count_over_the_limit_is_refused():
    sizes = {"x": MAX_RANDOM_BYTES // 3}
    assert random_batch_count(sizes, None, rows=1, default=4) == 3
    assert random_batch_count(sizes, 2, rows=1, default=4) == 2
    with pytest.raises(CompressError, match="--calib-count 3 or less"):
        random_batch_count(sizes, 4, rows=1, default=4)


@pytest.mark.parametrize(
    ("dims", "pin", "shape"),
    [
        ([10**9, 16], None, [10**9, 16]),
        ([1, 3, "h", "w"], "x:1,3,100000,100000", [1, 3, 100000, 100000]),
    ],
    ids=["fixed dim 1e9", "input-shape 1e5 x 1e5"],
)
def test_huge_input_dims_refused_before_allocating(tmp_path, dims, pin, shape):
    model = tmp_path / "m.onnx"
    onnx.save(_relu_model(dims), model)
    extra = ["--input-shape", pin] if pin else []
    done = _capped_cli(model, "--passes", "identity", *extra, "-o", tmp_path / "o.onnx")
    line = _one_error(done)
    gib = math.prod(shape) * 4 / 2**30  # float32
    assert "'x'" in line and f"{gib:,.1f} GiB per batch" in line


# -- non-finite weights and data -----------------------------------------------------------

# Without data channels has no default ratio (docs/decisions.md#weight-only-default-budgets).
GIVEN_BUDGET = {"svd": {}, "channels": {"ratio": 0.3}}


def _budget_args(pass_name: str) -> list[str]:
    return [
        a for k, v in GIVEN_BUDGET[pass_name].items() for a in ("--opt", f"{pass_name}.{k}={v}")
    ]


@pytest.mark.parametrize("value", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("pass_name", ["svd", "channels"])
@pytest.mark.parametrize("kind", ["gemm", "conv"])
def test_non_finite_weight_of_a_rewritten_layer_refused(tmp_path, capsys, kind, pass_name, value):
    model = tmp_path / "m.onnx"
    onnx.save(_two_layers(kind, bad="W1", value=value), model)
    budget = _budget_args(pass_name)
    code = run_cli(
        model, "--passes", pass_name, *budget, "-o", tmp_path / "o.onnx", "--no-bench", "-q"
    )
    line = one_error_line(capsys)
    layer = "fc1" if kind == "gemm" else "conv1"
    assert code == 2 and "'W1'" in line and f"'{layer}'" in line


@pytest.mark.parametrize("pass_name", ["svd", "channels"])
@pytest.mark.parametrize("kind", ["gemm", "conv"])
def test_the_pass_itself_refuses_a_non_finite_weight(kind, pass_name):
    # The pipeline refuses first when the outputs turn NaN; a pass called on its own must too.
    from onnxcompress.passes import get_pass

    from onnxcompress.passkit import PassContext

    model, spec = _two_layers(kind, bad="W1", value=np.inf), get_pass(pass_name)
    shapes = {"x": [4, 16] if kind == "gemm" else [1, 8, 8, 8]}
    layer = "fc1" if kind == "gemm" else "conv1"
    with pytest.raises(CompressError, match=f"{pass_name}: weight 'W1' of node '{layer}'"):
        spec.run(model, spec.make_options(GIVEN_BUDGET[pass_name]), PassContext(shapes))


@pytest.mark.parametrize("pass_name", ["svd", "channels"])
def test_minus_inf_constant_no_pass_reads_is_accepted(tmp_path, pass_name):
    model = tmp_path / "m.onnx"
    onnx.save(_two_layers("gemm"), model)
    out = tmp_path / "o.onnx"
    budget = _budget_args(pass_name)
    assert run_cli(model, "--passes", pass_name, *budget, "-o", out, "--no-bench", "-q") == 0


@pytest.mark.parametrize("pass_name", ["svd", "channels"])
@pytest.mark.parametrize("value", [np.nan, -np.inf], ids=["nan", "-inf"])
def test_non_finite_calibration_data_refused_at_load(tmp_path, capsys, pass_name, value):
    model, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(_two_layers("gemm"), model)
    x = np.random.default_rng(1).standard_normal((32, 16)).astype(np.float32)
    x[7, 3] = value
    np.savez(data, x=x)
    args = ["--passes", pass_name, "--data", data, "-o", tmp_path / "o.onnx", "--no-bench", "-q"]
    code = run_cli(model, *args)
    line = one_error_line(capsys)
    assert code == 2 and "'x'" in line and "d.npz" in line


# -- names that are not UTF-8 --------------------------------------------------------------


def _with_bad_utf8(model: onnx.ModelProto, marker: str, count: int, path) -> None:
    """Write `model` with its `count` `marker`s replaced by invalid UTF-8 of the same length."""
    data = model.SerializeToString()
    assert data.count(marker.encode()) == count
    path.write_bytes(data.replace(marker.encode(), b"\xff" * len(marker)))


@pytest.mark.parametrize("where", ["node", "tensor"])
@pytest.mark.parametrize("command", ["compress", "analyse"])
def test_invalid_utf8_names_refused_at_load(tmp_path, capsys, where, command):
    model = _two_layers("gemm")
    marker = "~bad name~"
    if where == "node":
        model.graph.node[0].name = marker
    else:
        model.graph.node[1].output[0] = model.graph.node[2].input[0] = marker
    path = tmp_path / "m.onnx"
    _with_bad_utf8(model, marker, 1 if where == "node" else 2, path)
    if command == "analyse":
        code = run_cli("analyse", path)
    else:
        code = run_cli(path, "--passes", "channels", "-o", tmp_path / "o.onnx", "--no-bench")
    line = one_error_line(capsys)
    assert code == 2 and "not valid UTF-8" in line and "m.onnx" in line


@pytest.mark.parametrize("pass_name", ["svd", "channels", "lrs"])
def test_nan_constant_before_the_layers_is_refused_by_the_outputs(tmp_path, capsys, pass_name):
    # A NaN no pass reads still turns the activations the passes fit on into NaN.
    rng = np.random.default_rng(0)
    scale = np.ones(16, np.float32)
    scale[3] = np.nan
    nodes = [
        helper.make_node("Mul", ["x", "c"], ["m"], name="scale"),
        helper.make_node("Gemm", ["m", "W1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W2"], ["y"], name="fc2"),
    ]
    inits = [
        numpy_helper.from_array(scale, "c"),
        numpy_helper.from_array(rng.standard_normal((16, 64)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal((64, 8)).astype(np.float32), "W2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    model, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    np.savez(data, x=rng.standard_normal((64, 16)).astype(np.float32))
    out = tmp_path / "o.onnx"
    code = run_cli(model, "--passes", pass_name, "--data", data, "-o", out, "--no-bench", "-q")
    line = one_error_line(capsys)
    assert code == 2 and "output 'y' is NaN" in line and "weight 'c'" in line and "'scale'" in line
    assert not out.exists()


def _mis_sized(where: str) -> onnx.ModelProto:
    """y = x + w where w says dims [3] but holds 8 values (as a fuzzed dims field leaves it)."""
    w = numpy_helper.from_array(np.arange(8, dtype=np.float32), "w")
    if where == "float_data":
        w = helper.make_tensor("w", TensorProto.FLOAT, [8], list(range(8)))
    del w.dims[:]
    w.dims.append(3)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [3])
    nodes = [helper.make_node("Add", ["x", "w"], ["y"])]
    inits = [w]
    if where == "constant":
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=w))
        inits = []
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_tensor_of_a_type_onnx_does_not_define_is_refused(tmp_path, capsys):
    model = _mis_sized("raw_data")
    model.graph.initializer[0].data_type = 99
    onnx.save(model, tmp_path / "m.onnx")
    assert run_cli("analyse", tmp_path / "m.onnx") == 2
    assert "tensor 'w' has data type 99, which ONNX does not define" in one_error_line(capsys)


@pytest.mark.parametrize("where", ["raw_data", "float_data", "constant"])
@pytest.mark.parametrize("command", ["analyse", "compress"])
def test_tensor_holding_more_values_than_its_dims_is_refused(tmp_path, capsys, where, command):
    model = tmp_path / "m.onnx"
    onnx.save(_mis_sized(where), model)
    args = ["analyse", model] if command == "analyse" else [model, "--passes", "identity"]
    assert run_cli(*args) == 2
    line = one_error_line(capsys)
    assert "tensor 'w' holds 8 values for dims [3] (3)" in line
