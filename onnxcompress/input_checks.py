"""Input the tool cannot compute on or hold, refused up front with one line naming what is
wrong: names that are not UTF-8; NaN or ±inf in calibration data or in the weights a pass
decomposes or scores (SVD and eigen-solvers fail deep inside on them; norms rank at random);
inputs to make up (random, images) larger than MAX_RANDOM_BYTES."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable

import numpy as np
import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from onnxcompress import model_copies
from onnxcompress.errors import CompressError
from onnxcompress.graph import dim_values, runtime_inputs

log = logging.getLogger(__name__)

# Inputs the tool makes up (random, resized images) are held whole in memory and copied again
# into onnxruntime: past 1 GiB a request is far more likely a typo (--calib-count 10**12, a dim
# of 10**9) than a need, so it is refused before anything is allocated.
MAX_RANDOM_BYTES = 1 << 30


def non_finite_count(array: np.ndarray) -> int:
    """How many NaN or ±inf values `array` holds (0 for integer and bool arrays)."""
    if not np.issubdtype(array.dtype, np.inexact):
        return 0
    return int(array.size - np.count_nonzero(np.isfinite(array)))


def require_input_arrays(path: object, arrays: Iterable[str], inputs: Iterable[str]) -> None:
    """Refuse a data file (`path`, holding the arrays named `arrays`) without an array for
    each of the model's `inputs`, naming what is missing and what the file has."""
    arrays = set(arrays)
    missing = [name for name in inputs if name not in arrays]
    if missing:
        raise CompressError(
            f"{path}: no array for input(s) {', '.join(missing)}; the file has "
            f"{', '.join(sorted(arrays)) or 'no arrays'} (arrays are named after the inputs)"
        )


def require_finite_weights(weights: Iterable[tuple[np.ndarray, str, str]], pass_name: str) -> None:
    """Refuse the run if one of the (value, tensor, node) weights `pass_name` is about to
    decompose or score holds NaN or ±inf. Only those: other constants may rightly hold -inf
    (attention masks)."""
    for value, tensor, node in weights:
        bad = non_finite_count(value)
        if bad:
            raise CompressError(
                f"{pass_name}: weight '{tensor}' of node '{node}' holds {bad} NaN or infinite "
                f"value(s), which {pass_name} cannot work on; fix the model's weights or leave "
                "this pass out"
            )


def non_utf8_string(message: Message) -> tuple[str, bytes] | None:
    """(field, raw value) of the first string field in `message`, at any depth, that is not
    valid UTF-8; None if there is none. (protobuf hands such strings back as bytes, which
    crash whatever formats or joins names later.) Bytes fields (tensor data) are not read."""
    for field in message.DESCRIPTOR.fields:
        if field.type not in (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_MESSAGE):
            continue
        repeated = _repeated(field)
        if not repeated and not message.HasField(field.name):
            continue  # reading an unset message field would build it, and recurse forever
        values = getattr(message, field.name)
        for value in values if repeated else [values]:
            if isinstance(value, Message):
                found = non_utf8_string(value)
                if found is not None:
                    return found
            elif isinstance(value, bytes):
                return f"{message.DESCRIPTOR.name}.{field.name}", value
    return None


def _repeated(field: FieldDescriptor) -> bool:
    # protobuf 7 dropped `label`; older versions may lack `is_repeated`.
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == FieldDescriptor.LABEL_REPEATED


def require_utf8_strings(model: Message, source: object) -> None:
    """Refuse a model (read from `source`) holding a name or other string that is not UTF-8."""
    found = non_utf8_string(model)
    if found is not None:
        field, raw = found
        raise CompressError(
            f"{source}: node or tensor names are not valid UTF-8 ({field} {raw[:40]!r}); "
            "re-export the model with UTF-8 names"
        )


def require_sized_tensors(model: onnx.ModelProto, source: object) -> None:
    """Refuse a model whose initializer or Constant holds more or fewer values than its dims
    say (the checker lets some through; reading them fails deep inside)."""
    constants = (
        attribute.t
        for node in model.graph.node
        if node.op_type == "Constant"
        for attribute in node.attribute
        if attribute.type == onnx.AttributeProto.TENSOR
    )
    known = set(onnx.TensorProto.DataType.values())
    for tensor in (*model.graph.initializer, *constants):
        if tensor.data_type not in known:
            raise CompressError(
                f"{source}: tensor '{tensor.name}' has data type {tensor.data_type}, which ONNX "
                "does not define: the file is damaged or was not written by an ONNX exporter"
            )
        held, expected = _values_held(tensor), math.prod(tensor.dims)
        if held is not None and held != expected:
            raise CompressError(
                f"{source}: tensor '{tensor.name}' holds {held:,} values for dims "
                f"{list(tensor.dims)} ({expected:,}): the file is damaged or was not written "
                "by an ONNX exporter"
            )


def _values_held(tensor: onnx.TensorProto) -> int | None:
    """How many values a tensor's data holds; None when not counted here (external data,
    strings, sub-byte or unknown types)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        return None
    itemsize = model_copies.itemsize_of(tensor.data_type)
    if itemsize is None:
        return None
    if tensor.HasField("raw_data"):
        size = len(tensor.raw_data)  # each read of raw_data copies it
        return size // itemsize if size % itemsize == 0 else -1
    name = onnx.TensorProto.DataType.Name(tensor.data_type)
    fields = ("float_data", "int32_data", "int64_data", "double_data", "uint64_data")
    held = sum(len(getattr(tensor, field)) for field in fields)
    return held // 2 if name.startswith("COMPLEX") else held


def made_up_bytes(dtypes: dict, input_shapes: dict[str, list[int]], fixed) -> dict[str, int]:
    """Bytes that one batch of each input the tool makes up (not given in `fixed`) takes."""
    return {
        name: math.prod(int(d) for d in input_shapes[name]) * dtype.itemsize
        for name, dtype in dtypes.items()
        if name not in (fixed or {})
    }


def refuse_huge_batch(model, input_shapes: dict[str, list[int]], sizes: dict[str, int]) -> None:
    """Refuse inputs whose one batch, as pinned, would take over MAX_RANDOM_BYTES to make."""
    total = sum(sizes.values())
    if total <= MAX_RANDOM_BYTES:
        return
    name = max(sizes, key=sizes.__getitem__)
    others = f" ({_gib(total)} with the other inputs)" if len(sizes) > 1 else ""
    declared = next(dim_values(inp) for inp in runtime_inputs(model) if inp.name == name)
    if all(isinstance(dim, int) for dim in declared):
        hint = "export the model with a smaller fixed shape"
    else:
        hint = "pin smaller dims with --input-shape"
    raise CompressError(
        f"input '{name}' of shape {list(input_shapes[name])} takes {_gib(sizes[name])} per "
        f"batch{others}, over the {_gib(MAX_RANDOM_BYTES)} this tool allocates for inputs: "
        f"{hint}"
    )


def random_batch_count(sizes: dict[str, int], count: int | None, rows: int, default: int) -> int:
    """Batches of random inputs for `count` samples of `rows` per batch (None: `default`
    batches), refused past MAX_RANDOM_BYTES; the default shrinks to what fits instead."""
    wanted = default if count is None else -(-count // rows)
    per_batch = max(1, sum(sizes.values()))
    fits = MAX_RANDOM_BYTES // per_batch  # >= 1: refuse_huge_batch passed
    if wanted <= fits:
        return wanted
    if count is None:
        limit = _gib(MAX_RANDOM_BYTES)
        log.warning("random inputs: %d batch(es), not %d, to stay within %s", fits, wanted, limit)
        return fits
    raise CompressError(
        f"--calib-count {count}: random inputs for that many samples take "
        f"{_gib(wanted * per_batch)}, over the {_gib(MAX_RANDOM_BYTES)} limit; give "
        f"--calib-count {fits * rows} or less (that many fit), or real data with --data"
    )


def _gib(nbytes: int) -> str:
    return f"{nbytes / 2**30:,.1f} GiB"
