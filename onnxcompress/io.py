"""Loading models from disk and writing them back atomically."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import onnx

from onnxcompress.errors import CompressError, first_line

# protobuf cannot serialise a message of 2 GiB or more; stay clear of the limit.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model (with external data) or raise CompressError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CompressError(f"{path}: no such file")
    if not path.is_file():
        raise CompressError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise CompressError(f"{path}: file is empty, not an ONNX model")
    if _is_onnxc(path):  # a coded model file: decode it transparently
        from onnxcompress import onnxc

        return onnxc.load_onnxc(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise CompressError(
            f"{path}: not a readable ONNX model (truncated or not ONNX: {first_line(exc)})"
        ) from exc
    if not model.graph.node and not model.graph.output:
        raise CompressError(f"{path}: not an ONNX model (no graph found in the file)")
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise CompressError(f"{path}: cannot read its external data: {first_line(exc)}") from exc
    return model


def model_bytes(model: onnx.ModelProto) -> int:
    """Size the model takes on disk as one protobuf file."""
    return model.ByteSize()


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    """Write the model atomically (temp file + rename); returns the bytes written.

    Models too large for one protobuf go to external data in a `<name>.data` file beside it.
    """
    path = Path(path)
    if model.ByteSize() < EXTERNAL_DATA_THRESHOLD:
        return write_bytes_atomic(model.SerializeToString(), path)

    def write_external(tmp: str) -> None:
        onnx.save_model(
            model,
            tmp,
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=path.name + ".data",
            size_threshold=1024,
        )

    _write_atomic(path, write_external)
    return path.stat().st_size


def write_bytes_atomic(data: bytes, path: str | os.PathLike) -> int:
    """Write bytes atomically (temp file in the same folder + rename); returns bytes written."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)

    _write_atomic(Path(path), write)
    return len(data)


def _write_atomic(path: Path, write) -> None:
    """`write(tmp)` into a temp file beside `path`, then rename it over `path`: readers never
    see a half-written file, and a failure leaves no temp file behind."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise CompressError(f"{path}: output folder {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise CompressError(f"{path}: output folder {directory} is not writable")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        _default_permissions(tmp)
        os.replace(tmp, path)
    except OSError as exc:
        raise CompressError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _default_permissions(path: str) -> None:
    # mkstemp creates 0600 files; give the output the permissions a plain open() would.
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def _is_onnxc(path: Path) -> bool:
    from onnxcompress.onnxc import MAGIC

    with open(path, "rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC
