"""Screenshots of report.html for a deployable, a lossy and a broken run, as a user makes them:
ResNet-20 (../shared/models) on 1,000 CIFAR-10 test images with labels (a quarter held out),
`int8`, `svd` at its defaults, and `fga` at 0.45 of the MACs without refit; each report is
rendered by headless Chromium (Debian package `chromium`).

    python benchmarks/report_screenshots.py --out /tmp/shots

Prints each run's exit code and verdict line; the PNGs are `<out>/{deployable,lossy,broken}.png`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))

from benchmarks.factorization import CIFAR_MEAN, CIFAR_STD  # noqa: E402

RUNS = {
    "deployable": ["--passes", "int8"],
    "lossy": ["--passes", "svd"],
    "broken": [
        "--passes", "fga", "--opt", "fga.target_macs=0.45", "--opt", "fga.refit=false",
        "--opt", "fga.never_slower=false", "--opt", "fga.keep_collapsing=false",
        "--opt", "fga.align=8",
    ],
}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("error: no chromium on PATH (Debian: apt-get install chromium)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = _cifar_npz(out / "cifar1000.npz")
    model = SHARED / "models" / "resnet20_cifar10.onnx"
    for name, options in RUNS.items():
        report = out / f"report_{name}"
        command = [sys.executable, "-m", "onnxcompress", str(model), *options, "--data", str(data)]
        command += ["-q", "-o", str(out / f"{name}.onnx"), "--report", str(report)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        verdict = next((x for x in done.stderr.splitlines() if x.startswith("verdict")), "")
        verdict = verdict or next((x for x in done.stdout.splitlines() if "verdict" in x), "")
        print(f"{name}: exit {done.returncode}; {verdict}")
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--screenshot={out / f'{name}.png'}", "--window-size=1280,1800",
             (report / "report.html").resolve().as_uri()],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip


def _cifar_npz(path: Path) -> Path:
    """1,000 seeded CIFAR-10 test images, normalised as ResNet-20 was trained, with labels."""
    sys.path.insert(0, str(SHARED / "data"))
    import load

    (_, _), (x_test, y_test) = load.cifar10()
    pick = np.random.default_rng(0).permutation(len(x_test))[:1000]
    x = ((x_test[pick].astype(np.float32) - CIFAR_MEAN) / CIFAR_STD).transpose(0, 3, 1, 2)
    np.savez(path, input=np.ascontiguousarray(x), labels=y_test[pick])
    return path


if __name__ == "__main__":
    main()
