"""What the report says about the run itself: its wall time and peak memory."""

import json
import time
from pathlib import Path

from onnxcompress.cli import main
from tests.test_verdict import _linear_model

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
