"""`fold_bn`: fold inference BatchNormalization, and Mul/Add by a per-channel constant, into the
Conv, ConvTranspose or Gemm before them: same maths, fewer nodes, no extra weights.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcompress import graph
from onnxcompress.passkit import NodeRecord, PassContext, PassResult, option
from onnxcompress.registry import register

log = logging.getLogger(__name__)

FOLD_INTO = ("Conv", "ConvTranspose", "Gemm")
TARGETS = "Conv/ConvTranspose/Gemm"


@dataclass(frozen=True)
class FoldBnOptions:
    mul_add: bool = option(True, "also fold Mul/Add by a scalar or per-channel constant")
    conv_transpose: bool = option(True, "also fold into ConvTranspose (output channels per group)")


def batchnorm_scale_shift(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, epsilon: float
) -> tuple[np.ndarray, np.ndarray]:
    """Inference BatchNormalization as y = x * scale + shift per channel, in float64."""
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon)
    shift = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return scale, shift


def fold_scale_shift(
    weight: np.ndarray,
    bias: np.ndarray | None,
    scale: np.ndarray,
    shift: np.ndarray,
    axis: int,
    groups: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Weights of a linear layer followed by `y * scale + shift` (both per output channel).

    `axis` is the weight axis that indexes output channels: 0 for Conv ([C_out, C_in/g, k..])
    and Gemm with transB=1, 1 for ConvTranspose ([C_in, C_out/g, k..]) and Gemm with transB=0.
    With axis 1 and `groups` > 1 the weight holds C_out/groups channels per group, so input rows
    of group g are scaled by channels g*C_out/groups .. (g+1)*C_out/groups - 1.
    `bias` (None = zeros) broadcasts against the channel vector on its last axis.
    Maths in float64; results are cast back to the weight's (and bias's) dtype.
    """
    w = weight.astype(np.float64)
    scale = np.asarray(scale, dtype=np.float64).reshape(-1)
    shift = np.asarray(shift, dtype=np.float64).reshape(-1)
    if axis not in (0, 1):
        raise ValueError(f"output channel axis must be 0 or 1, got {axis}")
    if axis == 1 and w.shape[0] % groups:
        raise ValueError(f"{w.shape[0]} input channels do not split into {groups} groups")
    channels = w.shape[0] if axis == 0 else w.shape[1] * groups
    if scale.size != channels or shift.size != channels:
        raise ValueError(
            f"scale/shift of {scale.size}/{shift.size} values for {channels} output channels"
        )
    if axis == 0:
        new_w = w * scale.reshape((-1,) + (1,) * (w.ndim - 1))
    else:
        grouped = w.reshape((groups, w.shape[0] // groups) + w.shape[1:])
        per_group = scale.reshape((groups, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        new_w = (grouped * per_group).reshape(w.shape)
    b = np.zeros(channels) if bias is None else bias.astype(np.float64)
    new_b = b * scale + shift
    bias_dtype = weight.dtype if bias is None else bias.dtype
    return new_w.astype(weight.dtype), new_b.astype(bias_dtype)


def fold_batchnorm(
    model: onnx.ModelProto, *, mul_add: bool = True, conv_transpose: bool = True
) -> tuple[onnx.ModelProto, list[NodeRecord]]:
    """A copy of `model` with BatchNormalization (and constant Mul/Add) folded into the
    Conv/ConvTranspose/Gemm before them, and one record per node considered."""
    work = onnx.ModelProto()
    work.CopyFrom(model)
    folder = _Folder(work, mul_add=mul_add, conv_transpose=conv_transpose)
    records = folder.run()
    if any(r.status == "rewritten" for r in records):
        work = graph.cleanup_and_sort(work)
    return work, records


@register(
    "fold_bn",
    FoldBnOptions,
    "fold BatchNormalization and constant Mul/Add into the preceding Conv/ConvTranspose/Gemm",
    idempotent=True,
)
def fold_bn(model: onnx.ModelProto, options: FoldBnOptions, context: PassContext) -> PassResult:
    folded, records = fold_batchnorm(
        model, mul_add=options.mul_add, conv_transpose=options.conv_transpose
    )
    rewritten = sum(r.status == "rewritten" for r in records)
    return PassResult(
        model=folded,
        changed=rewritten > 0,
        records=records,
        summary={"folded": rewritten, "skipped": len(records) - rewritten},
    )


class _Skip(Exception):
    """A candidate that cannot be folded; the message is the record's reason."""


def _label(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


class _Folder:
    """Graph surgery for one model (edited in place): finds candidates, folds or says why not."""

    def __init__(self, model: onnx.ModelProto, mul_add: bool, conv_transpose: bool):
        self.model = model
        self.mul_add = mul_add
        self.conv_transpose = conv_transpose
        self.opset = graph.default_opset(model)
        self.constants = graph.constant_tensors(model)
        self.graph_outputs = {out.name for out in model.graph.output}
        self.in_subgraphs = graph.names_in_subgraphs(model.graph)
        self.used_names = _all_names(model.graph)

    def run(self) -> list[NodeRecord]:
        kinds = ("BatchNormalization", "Mul", "Add") if self.mul_add else ("BatchNormalization",)
        # Candidates are looked up by output name: earlier folds rename and remove nodes.
        candidates = [
            n.output[0]
            for n in self.model.graph.node
            if n.op_type in kinds and n.domain in ("", "ai.onnx") and n.output
        ]
        records = []
        for name in candidates:
            node = graph.producers(self.model)[name]
            record = self._consider(node)
            if record is not None:
                log.debug("fold_bn %s %s: %s", node.op_type, _label(node), record.reason)
                records.append(record)
        return records

    def _consider(self, node: onnx.NodeProto) -> NodeRecord | None:
        producers = graph.producers(self.model)
        users = graph.consumers(self.model)
        if node.op_type == "BatchNormalization":
            source = node.input[0]
        else:
            found = [
                i for i, name in enumerate(node.input[:2]) if _op(producers, name) in FOLD_INTO
            ]
            if len(node.input) != 2 or not found:
                return None  # not a Mul/Add after a Conv/Gemm: nothing to look at
            source = node.input[found[0]]
        try:
            if node.op_type == "BatchNormalization":
                scale, shift, extra = self._batchnorm_params(node)
            target = self._target(source, producers, users)
            if node.op_type != "BatchNormalization":
                scale, shift, extra = self._mul_add_params(node, source, target)
            before, after = self._fold(target, node, scale, shift, users)
        except _Skip as why:
            return NodeRecord(node=_label(node), op=node.op_type, status="skipped", reason=str(why))
        return NodeRecord(
            node=_label(node),
            op=node.op_type,
            status="rewritten",
            params_before=before + extra,
            params_after=after,
            details={"into": _label(target), "into_op": target.op_type},
        )

    def _batchnorm_params(self, node: onnx.NodeProto) -> tuple[np.ndarray, np.ndarray, int]:
        attrs = graph.node_attributes(node)
        outputs = [name for name in node.output if name]
        # Before opset 14, more than one output *is* training mode (onnxruntime agrees).
        if attrs.get("training_mode", 0) or len(outputs) > 1 or attrs.get("is_test", 1) == 0:
            raise _Skip("training-mode BatchNormalization")
        if attrs.get("spatial", 1) == 0:
            raise _Skip("BatchNormalization with spatial=0 (per-activation statistics)")
        params = [self.constants.get(name) for name in node.input[1:5]]
        if len(params) != 4 or any(p is None for p in params):
            raise _Skip("BatchNormalization parameters are not constant")
        if any(p.ndim != 1 for p in params):
            raise _Skip("BatchNormalization parameters are not per-channel vectors")
        scale, shift = batchnorm_scale_shift(*params, float(attrs.get("epsilon", 1e-5)))
        return scale, shift, sum(p.size for p in params)

    def _target(self, source: str, producers: dict, users: dict) -> onnx.NodeProto:
        target = producers.get(source)
        if target is None:
            where = "a constant" if source in self.constants else "a graph input"
            raise _Skip(f"input is {where}, not the output of {TARGETS}")
        if target.op_type not in FOLD_INTO or target.domain not in ("", "ai.onnx"):
            raise _Skip(f"input is produced by {target.op_type}, not {TARGETS}")
        kind = target.op_type
        if kind == "ConvTranspose" and not self.conv_transpose:
            raise _Skip("folding into ConvTranspose is off (conv_transpose=False)")
        if kind == "Gemm" and self.opset < 7:
            raise _Skip(f"Gemm of opset {self.opset} (before 7) has no broadcasting bias")
        if source in self.graph_outputs:
            raise _Skip(f"{kind} output is also a graph output")
        if len(users.get(source, [])) != 1:
            raise _Skip(f"{kind} output has {len(users.get(source, []))} consumers")
        if source in self.in_subgraphs:
            raise _Skip(f"{kind} output is used inside a subgraph")
        weight = target.input[1] if len(target.input) > 1 else ""
        if weight not in self.constants:
            raise _Skip(f"weight of {kind} is not constant")
        bias = target.input[2] if len(target.input) > 2 else ""
        if bias and bias not in self.constants:
            raise _Skip(f"bias of {kind} is not constant")
        return target

    def _mul_add_params(
        self, node: onnx.NodeProto, source: str, target: onnx.NodeProto
    ) -> tuple[np.ndarray, np.ndarray, int]:
        other = node.input[1] if node.input[0] == source else node.input[0]
        value = self.constants.get(other)
        if value is None:
            raise _Skip(f"other operand of {node.op_type} is not a constant")
        weight = self.constants[target.input[1]]
        if value.dtype != weight.dtype:
            raise _Skip(f"constant is {value.dtype}, {target.op_type} weight is {weight.dtype}")
        rank = 2 if target.op_type == "Gemm" else weight.ndim
        channels = _output_channels(target, weight)
        vector = _channel_vector(value, rank, channels)
        if vector is None:
            raise _Skip(
                f"constant of shape {list(value.shape)} is not a scalar or per-channel "
                f"({channels} channels on axis 1 of a rank-{rank} output)"
            )
        if node.op_type == "Mul":
            return vector, np.zeros(channels), value.size
        return np.ones(channels), vector, value.size

    def _fold(
        self,
        target: onnx.NodeProto,
        node: onnx.NodeProto,
        scale: np.ndarray,
        shift: np.ndarray,
        users: dict,
    ) -> tuple[int, int]:
        """Rewrite `target` to produce `node`'s output; returns params before/after."""
        weight_name = target.input[1]
        bias_name = target.input[2] if len(target.input) > 2 else ""
        weight = self.constants[weight_name]
        bias = self.constants[bias_name] if bias_name else None
        attrs = graph.node_attributes(target)
        channels = _output_channels(target, weight)
        if scale.size != channels:
            raise _Skip(
                f"{node.op_type} has {scale.size} channels, "
                f"{target.op_type} has {channels} output channels"
            )
        scales_weight = not np.all(scale == 1.0)
        shared = [weight_name, bias_name] if scales_weight else [bias_name]
        for name in filter(None, shared):
            others = [u for u in users.get(name, []) if u is not target]
            if others or name in self.in_subgraphs:
                who = _label(others[0]) if others else "a subgraph"
                raise _Skip(f"weight shared with {who}")
        bias_dtype = weight.dtype if bias is None else bias.dtype
        if target.op_type == "Gemm":
            axis, groups = (0 if attrs.get("transB", 0) else 1), 1
            if bias is not None:  # fold beta into C (kept in float64) so the new C stands alone
                bias = bias.astype(np.float64) * attrs.get("beta", 1.0)
        else:
            axis = 1 if target.op_type == "ConvTranspose" else 0
            groups = int(attrs.get("group", 1))
        new_weight, new_bias = fold_scale_shift(weight, bias, scale, shift, axis, groups)
        new_bias = new_bias.astype(bias_dtype)
        if not (np.all(np.isfinite(new_weight)) and np.all(np.isfinite(new_bias))):
            raise _Skip(f"folded weights overflow {new_weight.dtype}")
        if scales_weight:
            self._set_input(target, 1, new_weight, weight_name)
        self._set_input(target, 2, new_bias, f"{_label(target)}_bias")
        if target.op_type == "Gemm":
            _set_attribute(target, "beta", 1.0)
        target.output[0] = node.output[0]
        self.model.graph.node.remove(node)
        before = weight.size + (bias.size if bias is not None else 0)
        return before, new_weight.size + new_bias.size

    def _set_input(self, node: onnx.NodeProto, index: int, value: np.ndarray, base: str) -> None:
        """Feed input `index` of `node` from a new initializer with a fresh name."""
        name = graph.fresh_name(f"{base}_folded", self.used_names)
        self.model.graph.initializer.append(numpy_helper.from_array(value, name))
        self.constants[name] = value
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name


def _op(producers: dict, name: str) -> str | None:
    node = producers.get(name)
    return node.op_type if node is not None else None


def _output_channels(target: onnx.NodeProto, weight: np.ndarray) -> int:
    attrs = graph.node_attributes(target)
    if target.op_type == "Gemm":
        return weight.shape[0] if attrs.get("transB", 0) else weight.shape[1]
    if target.op_type == "ConvTranspose":
        return weight.shape[1] * int(attrs.get("group", 1))
    return weight.shape[0]


def _channel_vector(value: np.ndarray, rank: int, channels: int) -> np.ndarray | None:
    """`value` as one number per channel if it broadcasts only along axis 1 of a rank-`rank`
    output ([C,1,1], [1,C,1,1], [1], scalar...); None if it would touch any other axis."""
    if value.ndim > rank:
        return None
    shape = (1,) * (rank - value.ndim) + value.shape
    if any(dim != 1 for axis, dim in enumerate(shape) if axis != 1) or shape[1] not in (
        1,
        channels,
    ):
        return None
    return np.broadcast_to(value.reshape(-1).astype(np.float64), (channels,)).copy()


def _set_attribute(node: onnx.NodeProto, name: str, value: float) -> None:
    for attr in node.attribute:
        if attr.name == name:
            node.attribute.remove(attr)
            break
    node.attribute.append(helper.make_attribute(name, value))


def _all_names(g: onnx.GraphProto) -> set[str]:
    names = {t.name for t in g.initializer}
    names.update(v.name for v in [*g.input, *g.output, *g.value_info])
    for node in g.node:
        names.update(node.input)
        names.update(node.output)
    return names | graph.names_in_subgraphs(g)
