"""The package as users get it: a wheel with one top-level name, `onnxcompress` (the repo's
passes/ folder inside it as onnxcompress.passes), whose CLI runs from any directory."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO

SOURCES = ["pyproject.toml", "README.md", "onnxcompress", "passes"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    # Built from a copy: setuptools leaves build/ and *.egg-info in the tree it builds.
    source = tmp_path_factory.mktemp("source")
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy
        copy(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    done = subprocess.run(
        [*command, "-q", "-w", str(out), str(source)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    (built,) = out.glob("onnxcompress-*.whl")
    return built


def test_the_wheel_has_one_top_level_package(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top = {name.split("/")[0] for name in names}
    assert {name for name in top if not name.endswith(".dist-info")} == {"onnxcompress"}
    assert not any(name.startswith(("passes/", "tests/", "benchmarks/")) for name in names)
    # Every module of the repo's package folders is in the wheel (a package left out of
    # pyproject's list would be missing).
    sources = {
        f"onnxcompress/{p.relative_to(REPO / 'onnxcompress')}" for p in _modules("onnxcompress")
    }
    sources |= {f"onnxcompress/passes/{p.relative_to(REPO / 'passes')}" for p in _modules("passes")}
    assert sources <= set(names), sorted(sources - set(names))


# Runs the CLI in-process, then lists the files of every onnxcompress module it loaded.
_LOADED = """
import sys
from onnxcompress.cli import main
main([{model!r}, "--passes", "svd,prune", "-o", {out!r}, "--no-bench"])
for name, module in sys.modules.items():
    if name.startswith("onnxcompress") and getattr(module, "__file__", None):
        print("loaded " + module.__file__)
"""


def _modules(folder: str):
    return [p for p in (REPO / folder).rglob("*.py") if "__pycache__" not in p.parts]


def test_the_installed_cli_runs_from_another_directory(wheel, tmp_path):
    target = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target"]
    done = subprocess.run([*install, str(target), str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The wheel's copy comes first on the path; the dependencies from this environment.
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = elsewhere / "out.onnx"
    model = REPO / "models" / "mlp.onnx"
    run = [sys.executable, "-m", "onnxcompress", str(model), "--passes", "svd", "-o", str(out)]
    done = subprocess.run(
        [*run, "--no-bench", "-q"], cwd=elsewhere, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert out.is_file()
    # Every onnxcompress module a run loads comes from the wheel, none from this checkout.
    loaded = _LOADED.format(model=str(model), out=str(out))
    where = subprocess.run(
        [sys.executable, "-c", loaded],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
    )
    files = [line[7:] for line in where.stdout.splitlines() if line.startswith("loaded ")]
    assert len(files) > 20 and all(f.startswith(str(target)) for f in files), files
