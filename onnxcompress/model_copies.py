"""Copies of a model that leave weights out: a skeleton for shape inference and checks, a copy
pointing to external data for writing, a copy without the weights a pass replaces. Built field
by field: `ModelProto.CopyFrom` would copy every weight, and in protobuf's arena the memory of
a cleared field is not given back until the whole message goes."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper


def stub_tensors(
    model: onnx.ModelProto, stubs: dict[str, list[tuple[str, str]]]
) -> onnx.ModelProto:
    """A copy of the model whose top-level initializers named in `stubs` keep their name,
    type and dims but hold no bytes; given (key, value) entries (`location`, `offset`,
    `length`), they point to external data there. Built field by field, so the bytes of those
    tensors are never copied (a copy of the model would copy every weight)."""
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip=("graph",))
    _copy_fields(model.graph, shell.graph, skip=("initializer",))
    for tensor in model.graph.initializer:
        if tensor.name not in stubs:
            shell.graph.initializer.add().CopyFrom(tensor)
            continue
        stub = shell.graph.initializer.add(name=tensor.name, data_type=tensor.data_type)
        stub.dims.extend(tensor.dims)
        if stubs[tensor.name]:
            stub.data_location = onnx.TensorProto.EXTERNAL
        for key, value in stubs[tensor.name]:
            stub.external_data.add(key=key, value=value)
    return shell


def copy_without_initializers(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """A copy of the model without the initializers in `names` (never copied), nor their
    entries among the graph inputs (old IRs list weights there)."""
    shell = onnx.ModelProto()
    _copy_fields(model, shell, skip=("graph",))
    _copy_fields(model.graph, shell.graph, skip=("initializer", "input"))
    shell.graph.input.extend(value for value in model.graph.input if value.name not in names)
    shell.graph.initializer.extend(t for t in model.graph.initializer if t.name not in names)
    return shell


def _copy_fields(source, target, skip: tuple[str, ...]) -> None:
    """Every set field of `source` but those in `skip` into `target` (same message type)."""
    for field, value in source.ListFields():
        if field.name in skip:
            continue
        if field.is_repeated:
            getattr(target, field.name).extend(value)
        elif field.message_type is not None:
            getattr(target, field.name).CopyFrom(value)
        else:
            setattr(target, field.name, value)


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes the tensor takes in a protobuf file, nearly: its data's size from dims and type
    when it keeps it in raw_data, without reading it (reading copies it; and protobuf's own
    ByteSize serialises the message to count it)."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL or not tensor.HasField("raw_data"):
        return tensor.ByteSize()
    itemsize = itemsize_of(tensor.data_type)
    if itemsize is None:
        return tensor.ByteSize()
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize + 16 * len(tensor.dims) + 64


def itemsize_of(data_type: int) -> int | None:
    """Bytes per element of a tensor type; None for strings, sub-byte and unknown types."""
    if data_type not in onnx.TensorProto.DataType.values():
        return None
    name = onnx.TensorProto.DataType.Name(data_type)
    if name in ("UNDEFINED", "STRING") or "4" in name:  # int4, uint4, float4 pack two a byte
        return None
    return np.dtype(helper.tensor_dtype_to_np_dtype(data_type)).itemsize


# Tensors of this many bytes or more lose their data in a skeleton; shape tensors (Reshape's
# target, Slice's starts) are far smaller and keep theirs, as data propagation reads them.
SKELETON_TENSOR_BYTES = 1 << 16
# Where a skeleton's tensors say their data is: nothing reads it.
PLACEHOLDER_LOCATION = "onnxcompress-skeleton.data"


def skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of the model whose large tensors (SKELETON_TENSOR_BYTES or more) keep their
    name, type and dims but point to placeholder external data: shape inference and the
    structure checks read no more, and the copy costs no weight bytes."""
    large = {
        tensor.name: [("location", PLACEHOLDER_LOCATION)]
        for tensor in model.graph.initializer
        if tensor.data_location != onnx.TensorProto.EXTERNAL
        and tensor_bytes(tensor) >= SKELETON_TENSOR_BYTES
    }
    return stub_tensors(model, large)
