"""Torch versions of the ONNX layer ops TorchGraph runs: Conv and ConvTranspose with every
attribute, Gemm, MatMul, the pools and the normalizations (`LAYERS`, same contract as
torch_ops.OPS).

ONNX pads may differ at the two ends of an axis and torch's may not, so uneven pads are
applied with F.pad before a call with no padding; even ones go to torch as they are."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onnxcompress.train.torch_ops import Call, Op

CONV = (F.conv1d, F.conv2d, F.conv3d)
CONV_TRANSPOSE = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
MAX_POOL = (F.max_pool1d, F.max_pool2d, F.max_pool3d)
AVG_POOL = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)


def torch_pads(begin: list[int], end: list[int]) -> list[int]:
    """ONNX begin/end pads per axis as F.pad wants them: last axis first, (begin, end) each."""
    return [p for axis in reversed(range(len(begin))) for p in (begin[axis], end[axis])]


def window_pads(call: Call, sizes, kernel, strides, dilations) -> tuple[list[int], list[int]]:
    """Begin and end pads of a sliding window (Conv, pools) from `pads` or `auto_pad`."""
    n, auto = len(kernel), call.attr("auto_pad", "NOTSET")
    if auto == "VALID":
        return [0] * n, [0] * n
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        totals = []
        for size, k, s, d in zip(sizes, kernel, strides, dilations, strict=True):
            out = math.ceil(size / s)
            totals.append(max((out - 1) * s + (k - 1) * d + 1 - size, 0))
        small = [t // 2 for t in totals]
        large = [t - t // 2 for t in totals]
        return (small, large) if auto == "SAME_UPPER" else (large, small)
    pads = call.attr("pads", [0] * 2 * n)
    return list(pads[:n]), list(pads[n:])


def _window(call: Call, x: torch.Tensor, kernel: list[int]):
    n = len(kernel)
    strides = call.attr("strides", [1] * n)
    dilations = call.attr("dilations", [1] * n)
    begin, end = window_pads(call, x.shape[2:], kernel, strides, dilations)
    return strides, dilations, begin, end


def conv(call: Call) -> torch.Tensor:
    x, weight, bias = call.inputs[0], call.inputs[1], call.input(2)
    kernel = list(weight.shape[2:])
    strides, dilations, begin, end = _window(call, x, kernel)
    padding = begin
    if begin != end:
        x, padding = F.pad(x, torch_pads(begin, end)), 0
    group = call.attr("group", 1)
    return CONV[len(kernel) - 1](x, weight, bias, strides, padding, dilations, group)


def conv_transpose(call: Call) -> torch.Tensor:
    """The full transposed convolution, then cut (or, past its end, extended with zeros) to
    the pads or `output_shape`, then the bias, as onnxruntime does."""
    x, weight, bias = call.inputs[0], call.inputs[1], call.input(2)
    kernel = list(weight.shape[2:])
    n = len(kernel)
    strides = call.attr("strides", [1] * n)
    dilations = call.attr("dilations", [1] * n)
    extra = call.attr("output_padding", [0] * n)
    group = call.attr("group", 1)
    y = CONV_TRANSPOSE[n - 1](x, weight, None, strides, 0, 0, group, dilations)
    full = [size + e for size, e in zip(y.shape[2:], extra, strict=True)]
    begin, end = _transpose_pads(call, x.shape[2:], full, strides)
    y = F.pad(y, torch_pads([-b for b in begin], [e - p for e, p in zip(extra, end, strict=True)]))
    if bias is not None:
        y = y + bias.reshape(1, -1, *[1] * n)
    return y


def _transpose_pads(call: Call, sizes, full, strides) -> tuple[list[int], list[int]]:
    """What to cut from each end of the full output (negative: zeros to add)."""
    n, auto = len(full), call.attr("auto_pad", "NOTSET")
    wanted = call.attr("output_shape")
    if wanted is None and auto in ("SAME_UPPER", "SAME_LOWER"):
        wanted = [size * s for size, s in zip(sizes, strides, strict=True)]
    if wanted is None:
        if auto == "VALID":
            return [0] * n, [0] * n
        pads = call.attr("pads", [0] * 2 * n)
        return list(pads[:n]), list(pads[n:])
    wanted = list(wanted)[-n:]
    totals = [f - w for f, w in zip(full, wanted, strict=True)]
    # The spec's split, which onnxruntime follows: the odd element is cut at the end for
    # SAME_UPPER, at the start otherwise; an output past the full one gets zeros at the end.
    heads = [max(t // 2 if auto == "SAME_UPPER" else t - t // 2, 0) for t in totals]
    return heads, [t - h for t, h in zip(totals, heads, strict=True)]


def gemm(call: Call) -> torch.Tensor:
    a, b, c = call.inputs[0], call.inputs[1], call.input(2)
    if call.attr("transA", 0):
        a = a.transpose(0, 1)
    if call.attr("transB", 0):
        b = b.transpose(0, 1)
    y = a @ b
    alpha, beta = call.attr("alpha", 1.0), call.attr("beta", 1.0)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c if beta == 1.0 else c * beta)
    return y


def max_pool(call: Call) -> torch.Tensor:
    x, kernel = call.inputs[0], list(call.attr("kernel_shape"))
    strides, dilations, begin, end = _window(call, x, kernel)
    padding = begin
    if begin != end or any(p > k // 2 for p, k in zip(begin, kernel, strict=True)):
        x, padding = F.pad(x, torch_pads(begin, end), value=-math.inf), 0
    ceil = bool(call.attr("ceil_mode", 0))
    return MAX_POOL[len(kernel) - 1](x, kernel, strides, padding, dilations, ceil_mode=ceil)


def average_pool(call: Call) -> torch.Tensor:
    x, kernel = call.inputs[0], list(call.attr("kernel_shape"))
    strides, _, begin, end = _window(call, x, kernel)
    ceil = bool(call.attr("ceil_mode", 0))
    include_pad = bool(call.attr("count_include_pad", 0))
    pool = AVG_POOL[len(kernel) - 1]
    if begin == end and all(p <= k // 2 for p, k in zip(begin, kernel, strict=True)):
        return pool(x, kernel, strides, begin, ceil, include_pad)
    # Uneven pads: sum over the zero-padded input, then divide by what each window counts.
    pads = torch_pads(begin, end)
    sums = pool(F.pad(x, pads), kernel, strides, 0, ceil, True)
    if include_pad:
        return sums
    ones = F.pad(torch.ones_like(x[:1, :1]), pads)
    return sums / pool(ones, kernel, strides, 0, ceil, True)


def global_average_pool(call: Call) -> torch.Tensor:
    x = call.inputs[0]
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def global_max_pool(call: Call) -> torch.Tensor:
    x = call.inputs[0]
    return x.amax(dim=tuple(range(2, x.dim())), keepdim=True)


def batch_norm(call: Call) -> torch.Tensor:
    x, scale, bias, mean, var = call.inputs[:5]
    eps = call.attr("epsilon", 1e-5)
    if not (mean.requires_grad or var.requires_grad):
        return F.batch_norm(x, mean, var, scale, bias, training=False, eps=eps)
    # torch's batch_norm has no gradient for its statistics; spelled out it does.
    shape = (1, -1, *[1] * (x.dim() - 2))
    factor = scale / torch.sqrt(var + eps)
    return (x - mean.reshape(shape)) * factor.reshape(shape) + bias.reshape(shape)


def instance_norm(call: Call) -> torch.Tensor:
    x, scale, bias = call.inputs
    return F.instance_norm(x, weight=scale, bias=bias, eps=call.attr("epsilon", 1e-5))


def layer_norm(call: Call) -> torch.Tensor:
    x, scale, bias = call.inputs[0], call.inputs[1], call.input(2)
    axis = call.attr("axis", -1) % x.dim()
    normalized = tuple(x.shape[axis:])
    eps = call.attr("epsilon", 1e-5)
    if tuple(scale.shape) == normalized and (bias is None or tuple(bias.shape) == normalized):
        return F.layer_norm(x, normalized, scale, bias, eps)
    y = F.layer_norm(x, normalized, eps=eps) * scale  # scale and bias that broadcast
    return y if bias is None else y + bias


LAYERS: dict[str, Op] = {
    "AveragePool": average_pool,
    "BatchNormalization": batch_norm,
    "Conv": conv,
    "ConvTranspose": conv_transpose,
    "Gemm": gemm,
    "GlobalAveragePool": global_average_pool,
    "GlobalMaxPool": global_max_pool,
    "InstanceNormalization": instance_norm,
    "LayerNormalization": layer_norm,
    "MatMul": lambda call: torch.matmul(call.inputs[0], call.inputs[1]),
    "MaxPool": max_pool,
}
