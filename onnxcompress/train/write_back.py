"""Trained weights back into the ONNX graph they came from: only the contents of the named
initializers and Constant values change; nodes, names, order and every other byte stay."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress.errors import CompressError


def write_back(model: onnx.ModelProto, module: Any) -> onnx.ModelProto:
    """A copy of `model` whose tensors named in `module.names` (a TorchGraph built from it)
    hold the module's parameter values, each in its original type and shape."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    targets = _stored_tensors(out)
    parameters = dict(module.named_parameters())
    for qualified, tensor_name in module.names.items():
        tensor = targets.get(tensor_name)
        if tensor is None:
            raise CompressError(f"the model has no initializer or Constant named {tensor_name!r}")
        store(tensor, parameters[qualified].detach().cpu().numpy())
    return out


def _stored_tensors(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Initializers and `Constant` values by tensor name, as writable protos."""
    found = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value":
                    found.setdefault(node.output[0], attr.t)
    return found


def store(tensor: onnx.TensorProto, values: np.ndarray) -> None:
    """Put `values` into `tensor` in place, cast to its element type, in the same field it
    used (raw bytes or the typed list), so that a value left unchanged gives the same bytes."""
    if tuple(values.shape) != tuple(tensor.dims):
        raise CompressError(
            f"{tensor.name}: trained shape {list(values.shape)} differs from the graph's "
            f"{list(tensor.dims)}; write_back changes values, never shapes"
        )
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        raise CompressError(f"{tensor.name}: its data is external; load the model with it")
    typed = values.astype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    if tensor.HasField("raw_data"):
        tensor.raw_data = numpy_helper.from_array(typed).raw_data
        return
    field = helper.tensor_dtype_to_field(tensor.data_type)
    fresh = helper.make_tensor("", tensor.data_type, typed.shape, typed.reshape(-1), raw=False)
    stored = getattr(tensor, field)
    del stored[:]
    stored.extend(getattr(fresh, field))
