"""What the tool writes never replaces what the user owns: default names pick a free name, the
output must be a regular file, external data is written atomically, and no temp file outlives
SIGTERM, SIGINT or (by the next run) SIGKILL."""

import json
import os
import signal
import stat
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcompress import io
from onnxcompress.cli import main
from onnxcompress.coding import onnxc as onnxc
from onnxcompress.errors import CompressError
from tests.conftest import REPO

FIXTURE = REPO / "models" / "resnet_style.onnx"


def _add_model(values: np.ndarray, op: str = "Add") -> onnx.ModelProto:
    shape = list(values.shape)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    w = numpy_helper.from_array(values.astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node(op, ["x", "w"], ["y"])], "g", [x], [y], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def _hidden(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# ---------------------------------------------------------------- names the tool picks


def test_decode_default_never_replaces_the_original(tmp_path, capsys):
    original = tmp_path / "m.onnx"
    original.write_bytes(b"the user's own model")
    io.save_onnxc(_add_model(np.arange(8.0)), tmp_path / "m.onnxc")
    assert main(["decode", str(tmp_path / "m.onnxc")]) == 0
    assert original.read_bytes() == b"the user's own model"
    assert onnx.load(tmp_path / "m-2.onnx") == _add_model(np.arange(8.0))
    assert "m.onnx exists and was left as it is" in capsys.readouterr().out
    assert main(["decode", str(tmp_path / "m.onnxc")]) == 0  # and the next free name after that
    assert (tmp_path / "m-3.onnx").exists() and original.read_bytes() == b"the user's own model"
    capsys.readouterr()
    assert main(["decode", str(tmp_path / "m.onnxc"), "-o", str(tmp_path / "named.onnx")]) == 0
    assert "left as it is" not in capsys.readouterr().out  # the user chose the name


def test_compress_default_never_replaces_an_existing_file(tmp_path, capsys):
    model = tmp_path / "net.onnx"
    model.write_bytes(FIXTURE.read_bytes())
    earlier = tmp_path / "net.compressed.onnx"
    earlier.write_bytes(b"kept from an earlier run")
    assert main([str(model), "--passes", "identity", "--no-bench", "-q"]) == 0
    assert "net.compressed.onnx exists and was left as it is" in capsys.readouterr().out
    assert earlier.read_bytes() == b"kept from an earlier run"
    onnx.checker.check_model(onnx.load(tmp_path / "net.compressed-2.onnx"), full_check=True)


def test_a_name_taken_during_the_run_is_not_replaced(tmp_path):
    path = tmp_path / "out.onnx"
    path.write_bytes(b"appeared meanwhile")
    with pytest.raises(CompressError, match="appeared during the run and was not replaced"):
        io.save_model(_add_model(np.ones(4)), path, replace=False)
    assert path.read_bytes() == b"appeared meanwhile"
    assert _hidden(tmp_path) == []


# ---------------------------------------------------------------- what -o may name


def _special_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    folder = tmp_path / "folder"
    folder.mkdir()
    yield fifo, "a FIFO"
    yield folder, "a folder"
    if os.geteuid() == 0:  # a device node of our own, never the system's /dev/null
        device = tmp_path / "null"
        os.mknod(device, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        yield device, "a character device"
    link = tmp_path / "link-to-fifo"
    link.symlink_to(fifo)
    yield link, "a FIFO"


@pytest.mark.parametrize("command", ["compress", "decode"])
def test_output_that_is_not_a_regular_file_is_refused(tmp_path, capsys, command):
    source = tmp_path / "m.onnxc"
    io.save_onnxc(_add_model(np.arange(4.0)), source)
    args = (
        ["decode", str(source)] if command == "decode" else [str(FIXTURE), "--passes", "identity"]
    )
    for target, kind in list(_special_files(tmp_path)):
        before = target.lstat()
        assert main([*args, "-o", str(target)]) == 2
        assert f"is {kind}, not a regular file" in _one_error_line(capsys)
        after = target.lstat()
        assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)


@pytest.mark.parametrize("folder", [False, True])
def test_report_path_that_is_a_fifo_is_refused_before_the_run(tmp_path, capsys, folder):
    fifo = tmp_path / "report.json"
    os.mkfifo(fifo)
    report = tmp_path if folder else fifo
    args = [str(FIXTURE), "--passes", "identity", "-o", str(tmp_path / "o.onnx")]
    assert main([*args, "--report", str(report), "--no-bench", "-q"]) == 2
    assert "is a FIFO, not a regular file" in _one_error_line(capsys)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and not (tmp_path / "o.onnx").exists()
    with pytest.raises(CompressError, match="is a FIFO, not a regular file"):
        io.write_bytes_atomic(b"{}", fifo)


def test_symlink_to_a_file_writes_its_target(tmp_path, capsys):
    target = tmp_path / "real.onnx"
    target.write_bytes(b"old")
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    assert main([str(FIXTURE), "--passes", "identity", "-o", str(link), "--no-bench", "-q"]) == 0
    assert link.is_symlink(), "the link stays a link"
    onnx.checker.check_model(onnx.load(target), full_check=True)
    dangling = tmp_path / "dangling.onnx"
    dangling.symlink_to(tmp_path / "nowhere" / "x.onnx")
    assert main([str(FIXTURE), "--passes", "identity", "-o", str(dangling), "-q"]) == 2
    assert "which does not exist" in _one_error_line(capsys)


# ---------------------------------------------------------------- external data


@pytest.fixture
def external(monkeypatch):
    # A 2 GB model is too slow for a test; a lower threshold takes the same path.
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)


def _data_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".data"))


def test_rerun_to_the_same_output_replaces_its_data(tmp_path, external):
    path = tmp_path / "big.onnx"
    for values in (np.arange(4096.0), np.arange(4096.0), -np.arange(4096.0)):
        written = io.save_model(_add_model(values), path)
        assert len(_data_files(tmp_path)) == 1, _data_files(tmp_path)
        data = tmp_path / _data_files(tmp_path)[0]
        assert data.stat().st_size == 4096 * 4, "rewritten, never appended to"
        assert written == path.stat().st_size + data.stat().st_size
        loaded = io.load_model(path)
        np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), values)
    assert _hidden(tmp_path) == []


def test_report_counts_external_data_in_both_file_sizes(tmp_path, external):
    source, out, report = tmp_path / "in.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    io.save_model(_add_model(np.arange(4096.0)), source)
    args = [str(source), "--passes", "identity", "-o", str(out), "--report", str(report)]
    assert main([*args, "--no-bench", "-q"]) == 0
    sizes = json.loads(report.read_text())
    for key, path in (("input_bytes", source), ("output_bytes", out)):
        (data,) = tmp_path.glob(f"{path.name}.*.data")
        assert sizes[key] == path.stat().st_size + data.stat().st_size == io.stored_bytes(path)


def test_the_data_just_written_stays_when_the_graph_cannot_be_read_back(
    tmp_path, external, monkeypatch
):
    # Publishing never asks the file it wrote which data it reads (a large graph, a parse
    # failure): it knows.
    monkeypatch.setattr(io, "_data_locations", lambda path: None)
    path = tmp_path / "big.onnx"
    for values in (np.arange(4096.0), -np.arange(4096.0)):
        io.save_model(_add_model(values), path)
        assert len(_data_files(tmp_path)) == 1
        loaded = io.load_model(path)
        np.testing.assert_array_equal(numpy_helper.to_array(loaded.graph.initializer[0]), values)


def test_a_small_model_over_a_large_one_removes_its_data(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 1000)
    io.save_model(_add_model(np.arange(4096.0)), path)
    assert len(_data_files(tmp_path)) == 1
    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD", 2_000_000_000)
    io.save_model(_add_model(np.arange(4096.0)), path)
    assert _data_files(tmp_path) == [] and _hidden(tmp_path) == []


def test_a_default_name_taken_during_the_run_moves_to_the_next_free_one(tmp_path):
    from onnxcompress.pipeline import default_output, save_result

    source = tmp_path / "net.onnx"
    taken = default_output(source)
    taken.write_bytes(b"made by someone else while the run went on")
    written, path = save_result(_add_model(np.ones(4)), taken, source, named=False)
    assert path == tmp_path / "net.compressed-2.onnx" and path.stat().st_size == written
    assert taken.read_bytes() == b"made by someone else while the run went on"
    with pytest.raises(io.OutputTaken):
        io.save_model(_add_model(np.ones(4)), taken, replace=False)


def test_external_data_has_the_permissions_of_a_plain_file(tmp_path, external):
    path = tmp_path / "big.onnx"
    io.save_model(_add_model(np.arange(4096.0)), path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("big.onnx", *_data_files(tmp_path)):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_the_model_in_memory_is_left_as_it_was(tmp_path, external):
    model = _add_model(np.arange(4096.0))
    io.save_model(model, tmp_path / "big.onnx")
    assert model == _add_model(np.arange(4096.0))


def test_a_full_disk_leaves_nothing_behind(tmp_path, external, monkeypatch):
    path = tmp_path / "big.onnx"
    io.save_model(_add_model(np.arange(4096.0)), path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_open = open

    class FullDisk:
        def __init__(self, name, mode):
            self.fh = real_open(name, mode)

        def write(self, chunk):
            self.fh.write(chunk[: len(chunk) // 2])
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(io, "open", FullDisk, raising=False)
    with pytest.raises(CompressError, match="No space left on device"):
        io.save_model(_add_model(-np.arange(4096.0)), path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


# Two runs' models differ in graph (Add or Sub) and weights (+w or -w): a model that pairs one
# run's graph with the other's weights computes x + (-w) or x - (+w).
_RUNS = {"Add": 1.0, "Sub": -1.0}


def _graph_matches_weights(path) -> bool:
    model = io.load_model(path)
    weights = numpy_helper.to_array(model.graph.initializer[0])
    sign = _RUNS[model.graph.node[0].op_type]
    return np.array_equal(weights, sign * np.arange(len(weights), dtype=np.float32))


def test_a_write_overtaken_by_another_keeps_its_own_weights(tmp_path, external, monkeypatch):
    path = tmp_path / "big.onnx"
    real = io._serialize_with_external
    calls = []

    def overtaken(*args):
        calls.append(1)
        if len(calls) == 1:  # run A has its data in place; run B writes all of its model now
            io.save_model(_add_model(-np.arange(4096.0), "Sub"), path)
        return real(*args)

    monkeypatch.setattr(io, "_serialize_with_external", overtaken)
    io.save_model(_add_model(np.arange(4096.0), "Add"), path)
    assert io.load_model(path).graph.node[0].op_type == "Add", "A renamed its graph last"
    assert _graph_matches_weights(path)
    assert len(_data_files(tmp_path)) == 1 and _hidden(tmp_path) == []


_WRITER = """
import sys
import numpy as np
from onnxcompress import io
from tests.test_output_safety import _add_model, _RUNS
io.EXTERNAL_DATA_THRESHOLD = 1000
op = sys.argv[2]
model = _add_model(_RUNS[op] * np.arange(1_000_000.0), op)
for _ in range(int(sys.argv[3])):
    io.save_model(model, sys.argv[1])
"""


def test_concurrent_writers_never_mix_graph_and_weights(tmp_path):
    path = tmp_path / "big.onnx"
    runs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, str(path), op, "10"], cwd=REPO)
        for op in _RUNS
    ]
    assert [run.wait(timeout=120) for run in runs] == [0, 0]
    assert _graph_matches_weights(path)
    (data,) = _data_files(tmp_path)
    assert (tmp_path / data).stat().st_size == 4_000_000, "one model's weights, none appended"
    assert _hidden(tmp_path) == []


# ---------------------------------------------------------------- signals and leftovers

# Runs the CLI with the model write stopped half-way by a signal sent to itself.
_SIGNALLED = """
import os, signal, sys
from onnxcompress import cli, io
real = io._write_file
def write_then_signal(path, chunks):
    real(path, chunks)
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
io._write_file = write_then_signal
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize(
    ("name", "code", "words"), [("SIGTERM", 143, "terminated"), ("SIGINT", 130, "interrupted")]
)
def test_a_signal_while_writing_removes_the_temp_file(tmp_path, name, code, words):
    out = tmp_path / "out.onnx"
    args = [str(FIXTURE), "--passes", "identity", "-o", str(out), "--no-bench", "-q"]
    done = subprocess.run(
        [sys.executable, "-c", _SIGNALLED, name, *args], cwd=REPO, capture_output=True, text=True
    )
    assert done.returncode == code, done.stderr
    assert done.stderr.strip() == f"error: {words}"
    assert list(tmp_path.iterdir()) == []


def test_the_next_run_removes_what_a_killed_run_left(tmp_path):
    out = tmp_path / "out.onnx"
    args = [str(FIXTURE), "--passes", "identity", "-o", str(out), "--no-bench", "-q"]
    killed = subprocess.run([sys.executable, "-c", _SIGNALLED, "SIGKILL", *args], cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    (left,) = _hidden(tmp_path)
    assert left.startswith(".out.onnx.onnxcompress-")
    assert left.startswith(io._temp_prefix(out).rsplit("-", 2)[0])
    living = tmp_path / f"{io._temp_prefix(out)}abc.tmp"  # a run of this process, still going
    foreign = tmp_path / ".out.onnx.x1y2.tmp"  # not named as this tool names its temp files
    dead_pid = left.split("-")[-2]
    elsewhere = tmp_path / f".out.onnx.onnxcompress-0badc0de-{dead_pid}-abc.tmp"  # other host
    for path in (living, foreign, elsewhere):
        path.write_bytes(b"not ours to remove")
    assert main(args) == 0
    assert _hidden(tmp_path) == sorted([living.name, foreign.name, elsewhere.name])


def test_temp_names_carry_the_writer_pid(tmp_path, monkeypatch):
    seen = []
    real = io._write_file

    def spy(path, chunks):
        seen.append(os.path.basename(path))
        return real(path, chunks)

    monkeypatch.setattr(io, "_write_file", spy)
    io.save_model(_add_model(np.ones(4)), tmp_path / "m.onnx")
    assert seen and seen[0].startswith(f".m.onnx.onnxcompress-{io._HOST}-{os.getpid()}-")


def test_signal_handler_is_restored_after_main(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    main([str(FIXTURE), "--passes", "identity", "-o", str(tmp_path / "o.onnx"), "--no-bench"])
    assert signal.getsignal(signal.SIGTERM) is before
