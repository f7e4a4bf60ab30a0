"""The CLI end to end: the README command, reports, exit codes, and every bad input → exit 2."""

import json
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import passes
from onnxcompress import io
from onnxcompress.cli import main
from onnxcompress.passkit import PassResult, PassSpec
from tests.conftest import REPO

FIXTURE = REPO / "models" / "resnet_style.onnx"


def run_cli(*args):
    return main([str(a) for a in args])


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: ")
    assert "Traceback" not in err[0]
    return err[0]


def _model(opset=17, input_dims=(1, 4), node=None, extra_opsets=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(input_dims))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(input_dims))
    node = node or helper.make_node("Relu", ["x"], ["y"])
    opsets = [helper.make_opsetid("", opset), *extra_opsets]
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=opsets)


def test_identity_writes_equal_model_and_report(tmp_path, capsys):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    before = io.file_sha256(FIXTURE)
    code = run_cli(
        FIXTURE, "--passes", "identity", "-o", out, "--report", report, "--bench-repeats", "3", "-q"
    )
    assert code == 0
    assert io.file_sha256(FIXTURE) == before, "the input file must never change"
    data = json.loads(report.read_text())
    assert data["validation"]["worst_rel_l2"] == 0.0
    assert data["before"]["total_macs"] == data["after"]["total_macs"] > 0
    assert data["benchmark"]["speedup"] > 0
    assert data["passes"][0]["name"] == "identity" and data["passes"][0]["changed"] is False
    onnx.checker.check_model(onnx.load(out), full_check=True)
    stdout = capsys.readouterr().out
    assert "MACs" in stdout and "rel L2" in stdout


def test_default_output_beside_input(tmp_path):
    model = tmp_path / "net.onnx"
    model.write_bytes(FIXTURE.read_bytes())
    assert run_cli(model, "--passes", "identity", "--no-bench", "-q") == 0
    assert (tmp_path / "net.compressed.onnx").exists()


def test_config_file_and_list_passes(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('passes = ["fold_bn"]\n[fold_bn]\nmul_add = false\n')
    report = tmp_path / "r.json"
    assert (
        run_cli(
            FIXTURE,
            "--config",
            config,
            "-o",
            tmp_path / "o.onnx",
            "--no-bench",
            "-q",
            "--report",
            report,
        )
        == 0
    )
    entry = json.loads(report.read_text())["passes"][0]
    assert entry["name"] == "fold_bn" and entry["options"]["mul_add"] is False
    assert run_cli("--list-passes") == 0
    listing = capsys.readouterr().out
    assert "identity" in listing and "fold_bn.mul_add" in listing


@dataclass(frozen=True)
class NoiseOptions:
    scale: float = 0.1


def _noise_pass(model, options, context):
    noisy = onnx.ModelProto()
    noisy.CopyFrom(model)
    rng = np.random.default_rng(0)
    for init in noisy.graph.initializer:
        w = numpy_helper.to_array(init)
        if w.dtype == np.float32 and w.ndim == 4:
            init.CopyFrom(
                numpy_helper.from_array(
                    w + options.scale * rng.standard_normal(w.shape).astype(np.float32), init.name
                )
            )
    return PassResult(noisy, True)


def test_max_rel_l2_exit_1_still_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(
        passes.PASSES, "noise", PassSpec("noise", _noise_pass, NoiseOptions, "test-only lossy pass")
    )
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code = run_cli(
        FIXTURE,
        "--passes",
        "noise",
        "-o",
        out,
        "--report",
        report,
        "--max-rel-l2",
        "0.001",
        "--no-bench",
        "-q",
    )
    assert code == 1
    assert out.exists() and report.exists()
    assert json.loads(report.read_text())["passed"] is False
    assert "exceeds --max-rel-l2" in capsys.readouterr().err


def test_analyse_subcommand(tmp_path, capsys):
    table = tmp_path / "t.json"
    assert run_cli("analyse", FIXTURE, "--json", table) == 0
    assert "MACs" in capsys.readouterr().out
    data = json.loads(table.read_text())
    assert data["total_macs"] > 0 and len(data["nodes"]) > 0


def _bad_inputs(tmp_path):
    """(name, argv, expected words) for every bad input the issue lists."""
    text = tmp_path / "notes.onnx"
    text.write_text("hello, this is not a model\n")
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(FIXTURE.read_bytes()[: FIXTURE.stat().st_size // 2])
    broken = tmp_path / "broken.onnx"  # Relu reads a tensor that nothing defines
    onnx.save(_model(node=helper.make_node("Relu", ["nowhere"], ["y"])), broken)
    future = tmp_path / "future_opset.onnx"
    onnx.save(_model(opset=99), future)
    custom = tmp_path / "custom_op.onnx"
    onnx.save(
        _model(
            node=helper.make_node("Foo", ["x"], ["y"], domain="com.example"),
            extra_opsets=[helper.make_opsetid("com.example", 1)],
        ),
        custom,
    )
    dynamic = tmp_path / "dynamic.onnx"
    onnx.save(_model(input_dims=("N", 3, "H", "W")), dynamic)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = tmp_path / "o.onnx"
    return [
        ("not a file", [tmp_path / "missing.onnx", "--passes", "identity"], "no such file"),
        ("a folder", [tmp_path, "--passes", "identity"], "not a file"),
        ("not onnx", [text, "--passes", "identity"], "not"),
        ("truncated", [truncated, "--passes", "identity"], "truncated"),
        ("checker", [broken, "--passes", "identity"], "checker"),
        ("opset", [future, "--passes", "identity", "-o", out], "onnxruntime cannot run"),
        ("custom op", [custom, "--passes", "identity", "-o", out], "onnxruntime cannot run"),
        ("dynamic", [dynamic, "--passes", "identity", "-o", out], "--input-shape x:"),
        (
            "opt for other pass",
            [FIXTURE, "--passes", "identity", "--opt", "fold_bn.mul_add=0"],
            "not in --passes",
        ),
        (
            "unknown option",
            [FIXTURE, "--passes", "fold_bn", "--opt", "fold_bn.nope=1"],
            "unknown option fold_bn.nope",
        ),
        (
            "bad option value",
            [FIXTURE, "--passes", "fold_bn", "--opt", "fold_bn.mul_add=maybe"],
            "expected bool",
        ),
        ("unknown pass", [FIXTURE, "--passes", "nosuchpass"], "unknown pass 'nosuchpass'"),
        ("no passes", [FIXTURE], "no pass given"),
        (
            "output unwritable",
            [FIXTURE, "--passes", "identity", "-o", a_file / "o.onnx"],
            "is a file, not a folder",
        ),
        ("output is input", [FIXTURE, "--passes", "identity", "-o", FIXTURE], "is the input"),
        (
            "bad input shape",
            [FIXTURE, "--passes", "identity", "--input-shape", "input:a,b"],
            "--input-shape",
        ),
        (
            "output folder missing",
            [FIXTURE, "--passes", "identity", "-o", tmp_path / "nope" / "o.onnx"],
            "does not exist",
        ),
        ("unknown flag", [FIXTURE, "--passes", "identity", "--frobnicate"], "unrecognized"),
        ("no jobs", [FIXTURE, "--passes", "identity", "--jobs", "0"], "--jobs"),
    ]


def test_every_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    before = io.file_sha256(FIXTURE)
    for name, argv, words in _bad_inputs(tmp_path):
        code = run_cli(*argv, "--no-bench", "-q") if name != "unknown flag" else run_cli(*argv)
        line = one_error_line(capsys)
        assert code == 2, (name, line)
        assert words in line, (name, line)
    assert io.file_sha256(FIXTURE) == before
    assert not (REPO / "models" / "resnet_style.compressed.onnx").exists()


def test_readme_command_by_subprocess(tmp_path):
    out = tmp_path / "o.onnx"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxcompress",
            str(FIXTURE),
            "--passes",
            "fold_bn",
            "-o",
            str(out),
            "--bench-repeats",
            "3",
            "-q",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert out.exists() and "speedup" in done.stdout


def test_bad_input_by_subprocess_has_no_traceback(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage")
    done = subprocess.run(
        [sys.executable, "-m", "onnxcompress", str(bad), "--passes", "identity"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 2
    # exactly one line: no blank line left by the progress display off a terminal
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1


@pytest.mark.parametrize("flag", ["-v"])
def test_verbose_shows_details(tmp_path, capsys, flag):
    assert run_cli(tmp_path / "missing.onnx", "--passes", "identity", flag) == 2
    assert "no such file" in capsys.readouterr().err
