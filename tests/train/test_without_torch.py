"""Without torch the whole package imports, and `supported` and `write_back` work: a pass can
ask whether a model is trainable before anything heavy loads. The `train` extra's pins are
in the `dev` extra too (CI installs dev)."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import REPO, shared_model

# Every module of the package with torch made unimportable, then the torch-free API.
WITHOUT_TORCH = """
import importlib, pkgutil, sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("torch is not installed here")

sys.meta_path.insert(0, NoTorch())
import onnx, onnxcompress
for info in pkgutil.walk_packages(onnxcompress.__path__, "onnxcompress."):
    if not info.name.startswith(("onnxcompress.train.torch_", "onnxcompress.__main__")):
        importlib.import_module(info.name)
assert "torch" not in sys.modules
from onnxcompress.train import supported
print(supported(onnx.load(sys.argv[1])))
try:
    from onnxcompress.train import TorchGraph
except ImportError:
    print("TorchGraph needs torch")
"""


def test_the_package_imports_and_answers_without_torch():
    model = shared_model("resnet20_cifar10.onnx")
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TORCH, str(model)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "TorchGraph needs torch"]


def test_the_dev_extra_carries_the_train_extra():
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    assert extras["train"] == ["torch==2.13.0"]
    assert set(extras["train"]) <= set(extras["dev"])
