"""Training an ONNX graph with torch (the foundation of the `distill` pass): `TorchGraph`
runs a graph as a torch module, `write_back` puts its trained weights into the same graph.

Only this subpackage imports torch, and only when `TorchGraph` is first used: `supported`,
`UnsupportedOps` and `write_back` work without it, so a pass can check a model first."""

from __future__ import annotations

from typing import Any

from onnxcompress.train.coverage import SUPPORTED_OPS, UnsupportedOps, supported
from onnxcompress.train.tensors import default_trainable
from onnxcompress.train.write_back import write_back

__all__ = [
    "SUPPORTED_OPS",
    "TorchGraph",
    "UnsupportedOps",
    "default_trainable",
    "supported",
    "write_back",
]


def __getattr__(name: str) -> Any:
    if name == "TorchGraph":  # imports torch: only when asked for
        from onnxcompress.train.torch_graph import TorchGraph

        return TorchGraph
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
