"""What the report says about the run itself: its wall time and peak memory, and the warning
that a lossy pass without the user's data was judged on made-up inputs only."""

import json
import time
from pathlib import Path

import numpy as np
import pytest

from onnxcompress import passes, registry
from onnxcompress.cli import main
from onnxcompress.passkit import PassSpec
from tests.test_verdict import ScaleOptions, _linear_model, _scale_pass

MEGABYTE = 2**20
# Python, numpy and onnxruntime alone take more than this: a smaller peak is a wrong unit.
LEAST_PLAUSIBLE_PEAK = 10 * MEGABYTE
PROC_STATUS = Path("/proc/self/status")


def _run(tmp_path, model, *extra):
    out, report = tmp_path / "o.onnx", tmp_path / "report"
    args = [model, "-o", out, "--report", report, "--no-bench", "-q", *extra]
    code = main([str(a) for a in args])
    return code, json.loads((report / "report.json").read_text()), report


def test_wall_time_and_peak_memory_are_reported(tmp_path, capsys):
    model = _linear_model(tmp_path, classes=5)
    started = time.perf_counter()
    code, report, folder = _run(tmp_path, model, "--passes", "identity")
    elapsed = time.perf_counter() - started
    assert code == 0
    resources = report["resources"]
    assert 0 < resources["wall_seconds"] <= elapsed
    assert resources["peak_memory_bytes"] > LEAST_PLAUSIBLE_PEAK
    if PROC_STATUS.exists():  # Linux: no more than the kernel's high-water mark of the process
        peak_kib = next(
            int(line.split()[1])
            for line in PROC_STATUS.read_text().splitlines()
            if line.startswith("VmHWM")
        )
        assert resources["peak_memory_bytes"] <= peak_kib * 1024
    shown = f"this run: {resources['wall_seconds']:.1f} s wall time, peak memory"
    assert shown in capsys.readouterr().out
    for name in ("report.md", "report.html"):
        assert shown in (folder / name).read_text(), name


@pytest.fixture
def lossy_scale(monkeypatch):
    spec = PassSpec("scale", _scale_pass, ScaleOptions, "test-only: scales weights", lossy=True)
    monkeypatch.setitem(passes.all_passes(), "scale", spec)


def test_lossy_pass_without_data_warns_loudly(tmp_path, lossy_scale, capsys):
    model = _linear_model(tmp_path, classes=5)
    factor = ["--passes", "scale", "--opt", "scale.factor=1.01"]
    code, report, folder = _run(tmp_path, model, *factor)
    assert code == 0
    (warning,) = report["warnings"]
    assert warning.startswith("no calibration data: scale changed the weights")
    assert "--data FILE.npz" in warning and "--images DIR --preprocess" in warning
    assert f"warning: {warning}" in capsys.readouterr().err.splitlines()  # without -v
    assert f"warning: {warning}" in (folder / "report.md").read_text()
    assert f"warning: {warning}" in (folder / "report.html").read_text()


def test_no_warning_with_data_or_without_a_change(tmp_path, lossy_scale, capsys):
    model = _linear_model(tmp_path, classes=5)
    data = tmp_path / "x.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32))
    scaled = ["--passes", "scale", "--opt", "scale.factor=1.01"]
    assert _run(tmp_path, model, *scaled, "--data", data)[1]["warnings"] == []
    assert _run(tmp_path, model, "--passes", "identity")[1]["warnings"] == []
    assert "warning: no calibration data" not in capsys.readouterr().err


def test_factorization_and_pruning_passes_are_lossy_and_exact_ones_not():
    lossy = {name for name, spec in registry.all_passes().items() if spec.lossy}
    compressing = {"svd", "cp", "tucker2", "fga", "lrs", "prune", "rdprune", "channels", "blocks"}
    assert compressing | {"auto", "int8"} <= lossy
    assert not lossy & {"identity", "fold_bn", "upcast"}


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_the_peak_is_the_run_s_own_not_its_parent_s():
    # ru_maxrss survives exec: a child of a process holding 300 MB would report 300 MB.
    import subprocess
    import sys

    held = np.ones(300 * 2**20 // 8)  # the parent holds 300 MiB while the child runs
    code = (
        "from onnxcompress.resources import run_resources; "
        "print(run_resources(0.0)['peak_memory_bytes'])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(done.stdout) < 200 * 2**20 and held.nbytes == 300 * 2**20
