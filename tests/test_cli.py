"""The CLI end to end: the README command, reports, exit codes, and every bad input → exit 2."""

import json
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import io, passes
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
    assert run_cli("--list-passes", "fold_bn") == 0
    listing = capsys.readouterr().out
    assert "fold_bn: " in listing and "  mul_add (default " in listing


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
        passes.all_passes(),
        "noise",
        PassSpec("noise", _noise_pass, NoiseOptions, "test-only lossy pass"),
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
    # The README's own run may have left its output here: compare, do not assume a clean tree.
    listed = sorted((REPO / "models").iterdir())
    for name, argv, words in _bad_inputs(tmp_path):
        code = run_cli(*argv, "--no-bench", "-q") if name != "unknown flag" else run_cli(*argv)
        line = one_error_line(capsys)
        assert code == 2, (name, line)
        assert words in line, (name, line)
    assert io.file_sha256(FIXTURE) == before
    assert sorted((REPO / "models").iterdir()) == listed, "a refused run wrote nothing"


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


# -- option ranges and bad-input refusals (issue 27) ------------------------------------------


def _out_of_range():
    from onnxcompress.cli_args import usable_cores

    cores = usable_cores()
    return [
        (["--max-rel-l2", "nan"], "argument --max-rel-l2: expected a finite number >= 0, got nan"),
        (["--max-rel-l2", "-1"], "argument --max-rel-l2: expected a finite number >= 0, got -1"),
        (["--max-rel-l2", "inf"], "expected a finite number >= 0"),
        (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got 0"),
        (["--batch-size", "-1"], "argument --batch-size: expected an integer >= 1, got -1"),
        (["--calib-count", "0"], "argument --calib-count: expected an integer >= 1, got 0"),
        (["--calib-count", "-1"], "argument --calib-count: expected an integer >= 1, got -1"),
        (["--bench-repeats", "0"], "argument --bench-repeats: expected an integer >= 1, got 0"),
        (["--bench-repeats", "-1"], "argument --bench-repeats: expected an integer >= 1"),
        (["--threads", "0"], f"argument --threads: expected 1 to {cores} (the cores"),
        (["--threads", "-1"], f"argument --threads: expected 1 to {cores} (the cores"),
        (["--threads", str(cores + 1)], f"expected 1 to {cores} (the cores this process may use"),
        (["--threads", "100000"], f"expected 1 to {cores} (the cores this process may use"),
        (["--jobs", "100000"], f"argument --jobs: expected 1 to {cores} (the cores"),
        (["--seed", "-1"], "argument --seed: expected an integer from 0 to 4294967295, got -1"),
        (["--seed", str(2**32)], "argument --seed: expected an integer from 0 to 4294967295"),
        (["--seed", "1e3"], "argument --seed: expected an integer, got '1e3'"),
        (["--opt", "auto.target_latency=0"], "auto: targets are fractions in (0, 1], got 0"),
        (["--opt", "auto.target_macs=0"], "auto: targets are fractions in (0, 1], got 0"),
        (["--opt", "svd.energy=nan"], "option svd.energy='nan': expected a finite number"),
        (["--opt", "cp.seed=-1"], "cp: seed must be from 0 to 4294967295, got -1"),
    ]


@pytest.mark.parametrize(("argv", "words"), _out_of_range())
def test_out_of_range_options_refused_before_the_model_is_read(tmp_path, capsys, argv, words):
    # The model does not exist: an option refused only later would say "no such file".
    pass_name = argv[1].partition(".")[0] if argv[0] == "--opt" else "identity"
    code = run_cli(tmp_path / "missing.onnx", "--passes", pass_name, *argv, "-q")
    line = one_error_line(capsys)
    assert code == 2 and words in line, line
    assert not list(tmp_path.iterdir())


def test_thread_count_refused_by_subprocess_names_the_cores(tmp_path):
    from onnxcompress.cli_args import usable_cores

    out = tmp_path / "o.onnx"
    argv = [str(FIXTURE), "--passes", "identity", "--threads", "100000", "-o", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "onnxcompress", *argv],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"1 to {usable_cores()} (the cores" in done.stderr and not out.exists()


@pytest.mark.parametrize("top", ["-3", "0"])
def test_analyse_top_must_be_positive(capsys, top):
    assert run_cli("analyse", FIXTURE, "--top", top) == 2
    assert f"argument --top: expected an integer >= 1, got {top}" in one_error_line(capsys)


def test_config_that_is_not_utf8_is_one_line(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_bytes(b'passes = ["identity"]\n# caf\xe9 \xff\n')
    code = run_cli(FIXTURE, "--config", config, "-o", tmp_path / "o.onnx", "--no-bench", "-q")
    line = one_error_line(capsys)
    assert code == 2 and f"--config {config}: not UTF-8 text at byte" in line, line
    assert not (tmp_path / "o.onnx").exists()


def _bad_initializer(kind: str) -> onnx.TensorProto:
    weight = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    if kind == "negative dims":
        weight.dims[0] = -4
    elif kind == "short raw_data":
        weight.raw_data = weight.raw_data[:-4]
    else:  # "undefined data_type"
        weight.data_type = TensorProto.UNDEFINED
    return weight


@pytest.mark.parametrize("kind", ["negative dims", "short raw_data", "undefined data_type"])
def test_analyse_refuses_what_the_checker_refuses(tmp_path, capsys, kind):
    """analyse used to exit 0 (negative dims) or crash (the others) on models compress refuses."""
    model = _model(node=helper.make_node("MatMul", ["x", "w"], ["y"]), input_dims=(1, 4))
    model.graph.initializer.append(_bad_initializer(kind))
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    table = tmp_path / "t.json"
    assert run_cli("analyse", path, "--json", table) == 2
    line = one_error_line(capsys)
    assert f"{path}: model fails the ONNX checker" in line, line
    assert not table.exists()
    assert run_cli(path, "--passes", "identity", "-o", tmp_path / "o.onnx") == 2
    assert one_error_line(capsys) == line, "analyse and compress refuse it alike"


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("resize=100000", "sizes are at most 8192 pixels"),
        ("crop=224;9000", "sizes are at most 8192 pixels"),
        ("resize=0", "with sizes >= 1"),
        ("resize=-3", "with sizes >= 1"),
        ("resize=1;2;3", "is not SIZE or HEIGHT;WIDTH"),
        ("std=nan", "'nan' is not a finite number"),
        ("std=1;inf;1", "'inf' is not a finite number"),
        ("mean=nan", "'nan' is not a finite number"),
        ("mean=-inf", "'-inf' is not a finite number"),
        ("scale=nan", "'nan' is not a finite number"),
        ("scale=1e308/1e-10", "is not a finite number"),
        ("scale=0", "scale 0"),
        ("std=0", "std must be > 0"),
        ("std=58;-57;57", "std must be > 0"),
    ],
)
def test_preprocess_nonsense_refused(spec, words):
    from onnxcompress.errors import CompressError
    from onnxcompress.images import parse_preprocess

    with pytest.raises(CompressError, match="preprocess: bad value") as refused:
        parse_preprocess(spec)
    assert words in str(refused.value)


def _image_folder(tmp_path, count=3):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(count):
        Image.new("RGB", (32, 32), (index * 40, 10, 200)).save(folder / f"{index}.png")
    return folder


def test_preprocess_nan_by_cli_is_one_line(tmp_path, capsys):
    images = _image_folder(tmp_path)
    code = run_cli(
        FIXTURE, "--passes", "identity", "-o", tmp_path / "o.onnx", "--no-bench", "-q",
        "--images", images, "--preprocess", "resize=32,std=nan",
    )  # fmt: skip
    line = one_error_line(capsys)
    assert code == 2 and "preprocess: bad value for 'std': 'nan' is not a finite" in line, line


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a text file"),
        (b"1\n2\n\xff\xfe\n", "not a text file"),
        (b"1\n2\n" + b"9" * 30 + b"\n", ":3: expected a class index from 0 to 2147483647, got 999"),
        (b"1\n2\n" + b"9" * 5000 + b"\n", ":3: expected a class index from 0 to 2147483647"),
        (b"1\n-5\n2\n", ":2: expected a class index from 0 to 2147483647, got -5"),
        (b"0.png, 1\n1.png 2\n2.png, 99999999999999999999\n", ":3: expected a class index"),
    ],
    ids=["png", "not utf-8", "30 digits", "5000 digits", "negative", "named, 20 digits"],
)
def test_bad_labels_file_is_one_line(tmp_path, capsys, content, words):
    images = _image_folder(tmp_path)
    labels = tmp_path / "labels.txt"
    labels.write_bytes(content)
    code = run_cli(
        FIXTURE, "--passes", "identity", "-o", tmp_path / "o.onnx", "--no-bench", "-q",
        "--images", images, "--preprocess", "resize=32", "--labels", labels,
    )  # fmt: skip
    line = one_error_line(capsys)
    assert code == 2 and f"{labels}" in line and words in line, line


# -- issue 27: no fidelity figure without held-out samples; random inputs said as such -------


@dataclass(frozen=True)
class ReadOptions:
    pass


def _reading_pass(model, options, context):
    """Reads every calibration batch, as a refit does, and changes nothing."""
    assert sum(len(batch["x"]) for batch in context.calibration) > 0
    return PassResult(model, False)


def _batch_model(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_model(input_dims=("batch", 4)), path)
    return path


def test_zero_sample_data_is_refused(tmp_path, capsys):
    data = tmp_path / "x.npz"
    np.savez(data, x=np.zeros((0, 4), np.float32))
    out = tmp_path / "o.onnx"
    args = ["--data", data, "-o", out, "--max-rel-l2", "0.01", "--no-bench", "-q"]
    assert run_cli(_batch_model(tmp_path), "--passes", "identity", *args) == 2
    assert one_error_line(capsys) == (
        "error: x.npz holds 0 samples; give at least one sample per input"
    )
    assert not out.exists()


@pytest.mark.parametrize(("samples", "holdout"), [(1, "0.25"), (8, "0")])
def test_samples_the_passes_fit_on_do_not_validate(tmp_path, monkeypatch, capsys, samples, holdout):
    spec = PassSpec("reader", _reading_pass, ReadOptions, "test-only pass that reads the data")
    monkeypatch.setitem(passes.all_passes(), "reader", spec)
    data, out, report = tmp_path / "x.npz", tmp_path / "o.onnx", tmp_path / "report"
    np.savez(data, x=np.ones((samples, 4), np.float32))
    args = ["--data", data, "--holdout", holdout, "-o", out, "--report", report, "--no-bench"]
    code = run_cli(_batch_model(tmp_path), "--passes", "reader", *args, "--max-rel-l2", "0.01")
    captured = capsys.readouterr()
    assert code == 1 and out.exists()
    (line,) = captured.err.strip().splitlines()
    assert line.startswith("error: --max-rel-l2 0.01 cannot pass: not validated: no held-out")
    assert "not validated: no held-out samples" in captured.out
    assert "rel L2" not in captured.out and "cosine" not in captured.out
    validation = json.loads((report / "report.json").read_text())["validation"]
    assert validation["validated"] is False and validation["worst_rel_l2"] is None
    assert validation["status"] == "not validated: no held-out samples"
    assert validation["fit_samples"]["samples"] == samples
    for name in ("report.md", "report.html"):
        text = (report / name).read_text()
        assert "not validated: no held-out samples" in text and "max abs" not in text


def test_holdout_zero_validates_when_the_passes_read_nothing(tmp_path, capsys):
    data, report = tmp_path / "x.npz", tmp_path / "r.json"
    np.savez(data, x=np.ones((8, 4), np.float32))
    args = ["--data", data, "--holdout", "0", "-o", tmp_path / "o.onnx", "--report", report]
    code = run_cli(_batch_model(tmp_path), "--passes", "identity", *args, "--no-bench", "-q")
    assert code == 0
    validation = json.loads(report.read_text())["validation"]
    assert validation["validated"] is True and validation["samples"] == 8
    assert validation["status"] == (
        "validated on samples the passes did not read (no held-out samples)"
    )


def test_random_inputs_are_described_and_ranged(tmp_path, capsys):
    report = tmp_path / "r.json"
    args = ["-o", tmp_path / "o.onnx", "--report", report, "--no-bench", "-q"]
    assert run_cli(_batch_model(tmp_path), "--passes", "identity", *args) == 0
    stated = json.loads(report.read_text())
    assert stated["calibration"] == "random, standard normal N(0, 1), seed 0"
    assert stated["validation"]["status"].startswith("validated on random inputs")
    assert "standard normal N(0, 1), seed 0" in capsys.readouterr().out.replace("\n", " ")
    ranged = ["--input-range=x:-1,1", "--seed", "5"]
    assert run_cli(_batch_model(tmp_path), "--passes", "identity", *args, *ranged) == 0
    assert json.loads(report.read_text())["calibration"] == "random, uniform in [-1, 1], seed 5"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1,-1", "--input-range 1,-1: expected finite numbers LO < HI"),
        ("x:nan,1", "expected finite numbers LO < HI"),
        ("y:0,1", "'y' is not an input; random inputs are drawn for x"),
        ("x:0", "expected [NAME:]LO,HI"),
        ("x:a,b", "expected [NAME:]LO,HI"),
    ],
)
def test_bad_input_range_is_refused(tmp_path, capsys, value, message):
    args = ["--input-range=" + value, "-o", tmp_path / "o.onnx", "--no-bench", "-q"]
    assert run_cli(_batch_model(tmp_path), "--passes", "identity", *args) == 2
    assert message in one_error_line(capsys)
    assert not (tmp_path / "o.onnx").exists()
