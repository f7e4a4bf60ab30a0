"""Loading models from disk and writing them back atomically."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import socket
import stat
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import EncodeError

from onnxcompress import graph, model_copies
from onnxcompress.errors import CompressError, first_line
from onnxcompress.input_checks import require_utf8_strings
from onnxcompress.interrupts import signals_held

# protobuf cannot serialise a message of 2 GiB or more; stay clear of the limit.
EXTERNAL_DATA_THRESHOLD = 2_000_000_000
# Tensors of this many bytes or more go to the external data file (onnx's own default).
EXTERNAL_TENSOR_BYTES = 1024
# Temp files carry this tag, the machine and the writer's pid, so that a later run can prove
# a leftover's writer is gone: pids mean something only on the machine (host name and boot)
# that wrote them, not on another host or container sharing the folder.
_TEMP_TAG = "onnxcompress"


def _machine_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
    except OSError:
        boot = ""
    text = f"{socket.gethostname()}-{boot}"
    return hashlib.sha256(text.encode()).hexdigest()[:8]


_HOST = _machine_id()


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read an ONNX model (with external data) or raise CompressError saying what is wrong."""
    path = Path(path)
    if not path.exists():
        raise CompressError(f"{path}: no such file")
    if not path.is_file():
        raise CompressError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise CompressError(f"{path}: file is empty, not an ONNX model")
    if is_onnxc(path):  # a coded model file: decode it transparently
        from onnxcompress.coding import onnxc_reader as onnxc_reader

        model = onnxc_reader.load_onnxc(path)
        require_utf8_strings(model, path)
        return model
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends
        raise CompressError(
            f"{path}: not a readable ONNX model (truncated or not ONNX: {first_line(exc)})"
        ) from exc
    if not model.graph.node and not model.graph.output:
        raise CompressError(f"{path}: not an ONNX model (no graph found in the file)")
    require_utf8_strings(model, path)  # before external data: its file names are strings too
    try:
        onnx.load_external_data_for_model(model, str(path.parent))
    except Exception as exc:
        raise CompressError(f"{path}: cannot read its external data: {first_line(exc)}") from exc
    return model


def model_bytes(model: onnx.ModelProto) -> int:
    """Size the model takes on disk as one protobuf file, nearly (see model_copies.tensor_bytes):
    protobuf's own ByteSize serialises the whole model to count it, which costs twice its
    size in memory and fails past 2 GB."""
    weights = model.graph.initializer  # tensors in subgraphs are counted with their nodes
    shell = model_copies.stub_tensors(model, {tensor.name: [] for tensor in weights})
    return shell.ByteSize() + sum(model_copies.tensor_bytes(tensor) for tensor in weights)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, *, replace: bool = True) -> int:
    """Write the model atomically; returns the bytes written, external data included.

    A model too large for one protobuf keeps its large tensors in `<name>.<digest>.data` beside
    it, named by their content and in place before the `.onnx` is renamed over the old one, so
    neither a reader nor a concurrent writer ever pairs one run's graph with another's weights.
    `replace=False` refuses (OutputTaken) to replace a file that exists when the write ends.
    """
    path = output_file(path)
    if model_bytes(model) >= EXTERNAL_DATA_THRESHOLD:
        return _save_with_external_data(model, path, replace)
    data = model.SerializeToString()
    with _temp_beside(path, ".tmp") as tmp:
        _write_file(tmp, [data])
        # Held signals: the old data goes with the rename, or neither happens.
        with _folder_lock(path), signals_held():
            _publish(tmp, path, replace)
            _remove_own_data(path, keep=None)  # a model written before with external data
    return len(data)


def write_bytes_atomic(data: bytes, path: str | os.PathLike, *, replace: bool = True) -> int:
    """Write bytes atomically (temp file in the same folder + rename); returns bytes written."""
    path = output_file(path)
    with _temp_beside(path, ".tmp") as tmp:
        _write_file(tmp, [data])
        _publish(tmp, path, replace)
    return len(data)


def save_onnxc(model: onnx.ModelProto, path: str | os.PathLike, coded=()) -> int:
    """Write the model as an entropy-coded `.onnxc` file atomically (bytes from onnxc_writer,
    `coded`: weights a pass coded already); returns the bytes written."""
    from onnxcompress.coding import onnxc_writer

    code_all = model_bytes(model) >= EXTERNAL_DATA_THRESHOLD  # its graph must stay small
    return write_bytes_atomic(onnxc_writer.encode_model(model, coded, code_all), path)


def output_file(path: str | os.PathLike) -> Path:
    """The file a write to `path` replaces: a symlink's target. Refuses anything at the path
    that is not a regular file (a folder, a device such as /dev/null, a FIFO, a socket)."""
    path = Path(path)
    if path.is_symlink():
        target = path.resolve()
        if not target.exists():
            raise CompressError(f"{path} is a link to {target}, which does not exist")
        path = target
    if path.exists() and not path.is_file():
        raise CompressError(f"{path} is {_file_kind(path)}, not a regular file; give a file path")
    return path


def free_path(preferred: Path) -> Path:
    """`preferred` if nothing is there, else the first free `<stem>-2<suffix>`, `-3`, ...: a
    name the tool picks itself never replaces a file."""
    for number in range(1, 1000):
        name = preferred.name if number == 1 else f"{preferred.stem}-{number}{preferred.suffix}"
        candidate = preferred.with_name(name)
        if not candidate.exists() and not candidate.is_symlink():
            return candidate
    raise CompressError(f"{preferred} and 998 numbered names beside it exist; give one with -o")


def _save_with_external_data(model: onnx.ModelProto, path: Path, replace: bool) -> int:
    # Top-level weights only: a subgraph's stay in its node (rarely large).
    tensors = [
        tensor
        for tensor in model.graph.initializer
        if tensor.HasField("raw_data")
        and model_copies.tensor_bytes(tensor) >= EXTERNAL_TENSOR_BYTES
    ]
    with _temp_beside(path, ".data.tmp") as data_tmp, _temp_beside(path, ".tmp") as graph_tmp:
        spans, digest = _write_file(data_tmp, (tensor.raw_data for tensor in tensors))
        data_path = path.with_name(f"{path.name}.{digest[:16]}.data")
        _write_file(graph_tmp, [_serialize_with_external(model, tensors, spans, data_path.name)])
        # Data files named as ours are renamed and removed only under this lock: once the
        # graph is in place, every other one is a leftover (of a replaced or killed run).
        # Signals wait: an interrupted run leaves no data file the graph there does not read.
        with _folder_lock(path), signals_held():
            os.replace(data_tmp, data_path)
            try:
                _publish(graph_tmp, path, replace)
            except BaseException:
                if data_path.name not in (_data_locations(path) or {data_path.name}):
                    data_path.unlink(missing_ok=True)  # the file there does not read it
                raise
            _remove_own_data(path, keep=data_path.name)
    return path.stat().st_size + sum(length for _, length in spans)


def _remove_own_data(path: Path, keep: str | None) -> None:
    """Remove the data files named as this tool names those of `path`, but `keep`."""
    own = re.compile(rf"{re.escape(path.name)}\.[0-9a-f]{{16}}\.data")
    for entry in path.parent.iterdir():
        if own.fullmatch(entry.name) and entry.name != keep:
            entry.unlink(missing_ok=True)


def _output_folder(path: Path) -> Path:
    directory = path.parent
    if not directory.is_dir():
        raise CompressError(f"{path}: output folder {directory} does not exist")
    if not os.access(directory, os.W_OK):
        raise CompressError(f"{path}: output folder {directory} is not writable")
    return directory


@contextlib.contextmanager
def _folder_lock(path: Path):
    """An exclusive advisory lock on the folder `path` goes in (flock on the folder itself:
    no lock file)."""
    fd = os.open(_output_folder(path), os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _initializers(body: onnx.GraphProto):
    """Initializers of a graph and of every subgraph under it."""
    yield from body.initializer
    for node in body.node:
        for subgraph in graph.subgraphs(node):
            yield from _initializers(subgraph)


def _serialize_with_external(
    model: onnx.ModelProto, tensors: list, spans: list[tuple[int, int]], location: str
) -> bytes:
    """The model's bytes with `tensors` pointing into the data file (a copy without their
    bytes is serialised: the model is left as it was)."""
    locations = {
        tensor.name: [("location", location), ("offset", str(offset)), ("length", str(length))]
        for tensor, (offset, length) in zip(tensors, spans, strict=True)
    }
    try:
        return model_copies.stub_tensors(model, locations).SerializeToString()
    except (ValueError, EncodeError) as exc:  # protobuf's limit, met by what stays inline
        raise CompressError(f"the model's graph is too large to write: {first_line(exc)}") from exc


def stored_bytes(path: str | os.PathLike) -> int:
    """Bytes a model takes on disk: its file and the external data files it reads."""
    path = Path(path)
    folder = path.parent
    # A file this large keeps its weights inline: not parsed again just to find data files.
    names = _data_locations(path) if path.stat().st_size < 256 << 20 else None
    names = names or set()
    data = {folder / name for name in names if (folder / name).is_file()}
    return path.stat().st_size + sum(file.stat().st_size for file in data)


def _data_locations(path: Path) -> set[str] | None:
    """The external data locations the model file at `path` names; None if it cannot tell
    (no readable model there)."""
    try:
        existing = onnx.load(str(path), load_external_data=False)
    except Exception:  # not a model, or gone
        return None
    return {
        entry.value
        for tensor in _initializers(existing.graph)
        for entry in tensor.external_data
        if entry.key == "location"
    }


def _write_file(path: str, chunks) -> tuple[list[tuple[int, int]], str]:
    """Write chunks one after another and flush them to disk; returns each chunk's (offset,
    length) and the sha256 of all of them."""
    digest, spans, offset = hashlib.sha256(), [], 0
    try:
        with open(path, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                digest.update(chunk)
                spans.append((offset, len(chunk)))
                offset += len(chunk)
            fh.flush()
            os.fsync(fh.fileno())  # renamed into place only once it is on disk
    except OSError as exc:
        raise CompressError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    _default_permissions(path)
    return spans, digest.hexdigest()


@contextlib.contextmanager
def _temp_beside(path: Path, suffix: str):
    """A temp file beside `path`, removed on any failure or interruption. Its name carries this
    process's id, so a later run can prove a leftover (after SIGKILL) is a dead run's own."""
    directory = _output_folder(path)
    remove_stale_temps(path)
    prefix = _temp_prefix(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    except OSError as exc:
        raise CompressError(f"{path}: cannot write: {exc.strerror or exc}") from exc
    os.close(fd)
    try:
        yield tmp
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _publish(tmp: str, path: Path, replace: bool) -> None:
    """Move the finished temp file to `path` in one step; without `replace`, only if nothing
    is there (a hard link fails on an existing name, where a rename would replace it)."""
    try:
        if replace:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise OutputTaken(path) from None
        except OSError:  # a file system without hard links
            if path.exists():
                raise OutputTaken(path) from None
            os.replace(tmp, path)
    except OSError as exc:
        raise CompressError(f"{path}: cannot write: {exc.strerror or exc}") from exc


class OutputTaken(CompressError):
    """A file appeared at an output path the tool picked itself, which it never replaces."""

    def __init__(self, path: Path):
        super().__init__(f"{path} appeared during the run and was not replaced")
        self.path = path


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{_TEMP_TAG}-{_HOST}-{os.getpid()}-"


def remove_stale_temps(path: Path) -> list[Path]:
    """Remove the temp files that runs on this machine writing `path` left when killed (their
    process is gone); returns them. Another machine's (a shared folder) are never touched."""
    pattern = re.compile(
        rf"\.{re.escape(path.name)}\.{_TEMP_TAG}-{re.escape(_HOST)}-(\d+)-\w+(\.data)?\.tmp"
    )
    removed = []
    for entry in path.parent.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and not _process_alive(int(match.group(1))) and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _file_kind(path: Path) -> str:
    mode = path.stat().st_mode
    kinds = [
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((words for test, words in kinds if test(mode)), "not a regular file")


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


def is_onnxc(path: Path) -> bool:
    from onnxcompress.coding.onnxc import MAGIC

    with open(path, "rb") as fh:
        return fh.read(len(MAGIC)) == MAGIC
