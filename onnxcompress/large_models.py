"""Models too large for one protobuf message (2 GB): the ONNX checker, shape inference and
onnxruntime cannot be handed them in memory, since each would serialise the whole model first.
They are given a file instead: the model written once with external data (`written`), then
checked and inferred from its path (`check_file`) and run by sessions made from that path.
Code that needs only a model's structure (shape inference, op counts) works on its skeleton
(`model_copies.skeleton`): every tensor's type and dims, not the bytes of large ones."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx

from onnxcompress import io
from onnxcompress.errors import CompressError, first_line


def too_large(model: onnx.ModelProto) -> bool:
    """Whether the model is too large to hand over in memory (see io.EXTERNAL_DATA_THRESHOLD)."""
    return io.model_bytes(model) >= io.EXTERNAL_DATA_THRESHOLD


@contextlib.contextmanager
def written(model: onnx.ModelProto) -> Iterator[Path]:
    """The model written with external data into a temporary folder, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="onnxcompress-large-") as folder:
        path = Path(folder) / "model.onnx"
        io.save_model(model, path)
        yield path


def check_file(path: str | os.PathLike) -> None:
    """The checks every written model passes (`graph.check_model`), run from its file: the
    checker's full check, then strict shape inference."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        with tempfile.TemporaryDirectory(prefix="onnxcompress-infer-") as folder:
            inferred = os.path.join(folder, "inferred.onnx")  # graph only: data stays external
            onnx.shape_inference.infer_shapes_path(
                str(path), inferred, check_type=True, strict_mode=True
            )
    except Exception as exc:
        raise CompressError(f"model fails the ONNX checker: {first_line(exc)}") from exc
