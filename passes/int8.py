"""`int8`: static int8 quantization in QDQ form (onnxruntime.quantization), calibrated on the
run's data: weights int8 (per output channel by default), activations uint8 with ranges
observed on the calibration batches. The graph stays standard ONNX: QuantizeLinear /
DequantizeLinear pairs around the float ops, which onnxruntime fuses into integer kernels
(QLinearConv, QGemm, ...) and any runtime can still execute as written.

Run it last: passes after it see weights behind DequantizeLinear, not initializers, and leave
those layers alone. Models below opset 13 are converted to 13 first (per-channel
DequantizeLinear needs its `axis` attribute), and a float16 model is upcast to float32 first
(int8 of the float16 file is larger and slower on CPU); the summary says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import version_converter

from onnxcompress import graph, io
from onnxcompress.errors import CompressError
from onnxcompress.layers import named_copy
from onnxcompress.passkit import (
    NodeRecord,
    PassContext,
    PassResult,
    comma_list,
    first_samples,
    option,
    sample_count,
)
from onnxcompress.registry import register
from onnxcompress.runtime import ort_message

log = logging.getLogger(__name__)

# The first opset whose DequantizeLinear takes `axis` (per-channel weights).
QDQ_OPSET = 13
RANGES = ("minmax", "entropy", "percentile")
ACTIVATIONS = ("uint8", "int8")


@dataclass(frozen=True)
class Int8Options:
    per_channel: bool = option(True, "one weight scale per output channel (else per tensor)")
    activations: str = option(
        "uint8", "uint8 | int8: activation type (uint8 is the fast u8s8 path on x86)"
    )
    ranges: str = option("minmax", "minmax | entropy | percentile: how activation ranges are set")
    samples: int = option(256, "at most this many calibration samples observe the ranges")
    ops: str = option("", "comma-separated op types to quantize (empty: all the quantizer knows)")
    keep: str = option("", "comma-separated node names left in float (e.g. the first conv)")
    time_layers: bool = option(
        True,
        "time each quantized layer alone in float and in int8 (onnxruntime, the layer's input "
        "shape; cached): the report's latency per layer (first runs: ResNet-20 +2 s, "
        "SqueezeNet +5 s)",
    )
    upcast: bool = option(
        True,
        "a float16 model is upcast to float32 first, inputs and outputs kept float16 (what "
        "`--passes upcast,int8` does): int8 of the float16 file runs slower and is larger; "
        "false quantizes the float16 model as given",
    )


# Ops of a model quantized already (static QDQ, QOperator or dynamic): quantizing it again
# is not defined (onnxruntime's pre-processing breaks on its names).
QUANTIZED_OPS = {
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "QLinearConv",
    "QLinearMatMul", "ConvInteger", "MatMulInteger",
}  # fmt: skip


@register("int8", Int8Options, "static int8 quantization (QDQ) calibrated on the data", lossy=True)
def int8(model: onnx.ModelProto, options: Int8Options, context: PassContext) -> PassResult:
    _check(options, context)
    quantized_ops = sorted({node.op_type for node in model.graph.node} & QUANTIZED_OPS)
    if quantized_ops:
        raise CompressError(
            f"int8: the model is quantized already ({', '.join(quantized_ops)}): nothing to do"
        )
    model, upcast_summary = _float32_first(model, options, context)
    # Stale weights (left by an earlier pass until the core's cleanup) break onnxruntime's
    # pre-processing when an old exporter also lists them as graph inputs: drop them first.
    source, summary = _at_qdq_opset(graph.cleanup_and_sort(model))
    # Named nodes keep their names through the quantizer, so records, timings and roles agree.
    source = named_copy(source)
    # Weights and norm parameters in Constant nodes (paddle2onnx, torch) as initializers: the
    # quantizer takes only initializers for weights when its own optimizer does not run.
    graph.lift_constant_nodes(source)
    summary.update(upcast_summary)
    keep = comma_list(options.keep)
    unknown = sorted(set(keep) - {node.name for node in source.graph.node})
    if unknown:
        raise CompressError(f"int8: keep names no node of the model: {', '.join(unknown)}")
    batches = first_samples(context.calibration, options.samples)
    quantized, complaints = _quantize(source, options, batches, keep)
    if complaints:
        summary["notes"] = [*_notes(summary), _complaint_note(complaints)]
    records = _records(quantized, keep)
    if options.time_layers:
        timed = _time_layers(source, records, options, context)
        summary["notes"] = [*_notes(summary), _timing_note(timed)]
    summary.update(
        calibration_samples=sample_count(batches),
        quantized_layers=sum(r.status == "rewritten" for r in records),
        qdq_nodes=dict(
            Counter(
                n.op_type
                for n in quantized.graph.node
                if n.op_type in ("QuantizeLinear", "DequantizeLinear")
            )
        ),
    )
    return PassResult(model=quantized, changed=True, records=records, summary=summary)


def _time_layers(source, records: list[NodeRecord], options, context: PassContext) -> int:
    """Time each layer quantized to int8 alone in float and in int8, into its record's
    `timing` (as the factorization passes' records give theirs); the count timed."""
    from onnxcompress.analyse import analyse
    from onnxcompress.auto.layer_timing import float_and_int8
    from onnxcompress.linear_layers import conv_and_linear_layers

    layers, _ = conv_and_linear_layers(source, analyse(source, context.input_shapes))
    in_int8 = {r.node: r for r in records if r.details.get("int8")}
    layers = [layer for layer in layers if layer.name in in_int8]
    constants = graph.constant_tensors(source)
    alone = dataclasses.replace(options, keep="", time_layers=False, upcast=False)

    def quantize(model: onnx.ModelProto, feeds: dict) -> onnx.ModelProto:
        shapes = {name: list(value.shape) for name, value in feeds.items()}
        return int8(model, alone, PassContext(shapes, [feeds], threads=context.threads)).model

    timed = 0
    with context.progress("timing layers in float and int8", len(layers)) as bar:
        for layer in layers:
            try:
                timing = float_and_int8(constants, layer, quantize, context.threads)
            except Exception as exc:  # noqa: BLE001 - a layer not timed must not fail the pass
                log.debug("int8: %s not timed: %s", layer.name, exc)
            else:
                in_int8[layer.name].details["timing"] = timing
                timed += 1
            bar.advance()
    return timed


def _notes(summary: dict) -> list[str]:
    notes = summary.get("notes") or []  # the upcast's is one string
    return [notes] if isinstance(notes, str) else list(notes)


def _complaint_note(complaints: list[str]) -> str:
    last = next(
        (line.strip() for text in reversed(complaints) for line in reversed(text.splitlines())
         if line.strip()), "",
    )  # fmt: skip
    for text in complaints:  # whole, with its traceback, for -v
        log.debug("int8: onnxruntime's quantizer logged: %s", text)
    return (
        f"onnxruntime's quantizer logged an error and went on ({last[:200]}); when its "
        "pre-processing's optimizer fails, BatchNormalization is not folded into the convs "
        "first; the result is validated as usual"
    )


class _Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _quantizer_logs():
    """Silence onnxruntime's quantizer: its advice goes to the root logger (dropped), and the
    errors it goes on from (its pre-processing's optimizer, logged with a traceback) are
    collected for a note instead of reaching the user's stderr."""
    logger = logging.getLogger("onnxruntime.quantization")
    collected, propagate = _Collected(), logger.propagate
    logger.addHandler(collected)
    logger.propagate = False
    logging.disable(logging.WARNING)
    try:
        yield collected.messages
    finally:
        logging.disable(logging.NOTSET)
        logger.removeHandler(collected)
        logger.propagate = propagate


def _timing_note(timed: int) -> str:
    return (
        f"latency per layer: {timed} int8 layers each timed alone in float and in int8; "
        "alone, an int8 layer also pays quantizing its input and dequantizing its output, "
        "which inside the int8 model it mostly does not (the model's own latency is the "
        "benchmark's)"
    )


def _check(options: Int8Options, context: PassContext) -> None:
    if not context.calibration:
        raise CompressError(
            "int8 needs calibration data to choose activation ranges (--data/--images)"
        )
    for name, value, allowed in (
        ("activations", options.activations, ACTIVATIONS),
        ("ranges", options.ranges, RANGES),
    ):
        if value not in allowed:
            raise CompressError(f"int8.{name} must be one of {', '.join(allowed)}, got {value!r}")
    if options.samples < 1:
        raise CompressError(f"int8.samples must be at least 1, got {options.samples}")


def _float32_first(
    model: onnx.ModelProto, options: Int8Options, context: PassContext
) -> tuple[onnx.ModelProto, dict]:
    """The float32 upcast of a float16 model, and the summary's words for it: int8 of the
    float16 file was 1.09-1.21x the file's latency on SqueezeNet, int8 of its upcast 0.58-0.62x
    (docs/decisions.md#autooptionsupcast)."""
    from onnxcompress.passes.upcast import UpcastOptions, computes_in_float16, upcast

    if not options.upcast or not computes_in_float16(model):
        return model, {}
    result = upcast(model, UpcastOptions(), context)
    note = (
        "the model computes in float16: upcast to float32 first (inputs and outputs kept "
        "float16), as `--passes upcast,int8` does; int8.upcast=false quantizes it as given"
    )
    return result.model, {"upcast": result.summary["upcast"], "notes": note}


def _at_qdq_opset(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    opset = graph.default_opset(model)
    if opset >= QDQ_OPSET:
        return model, {"opset": opset}
    try:
        converted = version_converter.convert_version(model, QDQ_OPSET)
    except Exception as exc:  # noqa: BLE001 - the converter raises bare RuntimeErrors
        raise CompressError(
            f"int8 needs opset {QDQ_OPSET}; converting from opset {opset} failed: "
            f"{ort_message(exc)}"
        ) from exc
    return converted, {"opset": QDQ_OPSET, "converted_from_opset": opset}


class _Batches:
    """onnxruntime's CalibrationDataReader protocol over our calibration batches."""

    def __init__(self, batches: list[dict]):
        self._batches = iter(batches)

    def get_next(self):
        return next(self._batches, None)


def _quantize(model: onnx.ModelProto, options: Int8Options, batches, keep):
    """The quantized model, and the errors onnxruntime's quantizer logged and went on from."""
    # The quantizer reads and writes files; a private temp dir keeps that out of the user's way.
    with tempfile.TemporaryDirectory(prefix="onnxcompress-int8-") as tmp:
        source, target = Path(tmp) / "source.onnx", Path(tmp) / "int8.onnx"
        # A file, not the ModelProto: given a proto, the preparation hands its weights to the
        # session as external initializers and writes a model pointing at a file it never
        # writes ("foo.bin"), which then fails on large weights (MiniLM's embeddings).
        onnx.save(model, source)
        with _quantizer_logs() as complaints:
            try:
                _prepare_and_quantize(
                    source, Path(tmp) / "prepared.onnx", target, batches, options, keep
                )
            except Exception as exc:  # noqa: BLE001 - its errors are plain exceptions
                raise CompressError(
                    f"int8: onnxruntime's quantizer failed: {ort_message(exc)}"
                ) from exc
        return io.load_model(target), complaints


def _prepare_and_quantize(source: Path, prepared: Path, target: Path, batches, options, keep):
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[options.ranges]
    activation = QuantType.QUInt8 if options.activations == "uint8" else QuantType.QInt8
    # onnxruntime's own preparation: shapes, and BatchNormalization folded into the convs,
    # which would otherwise stay float between two quantized layers.
    quant_pre_process(str(source), prepared, skip_symbolic_shape=True)
    quantize_static(
        prepared, target, _Batches(batches),
        quant_format=QuantFormat.QDQ, per_channel=options.per_channel,
        activation_type=activation, weight_type=QuantType.QInt8,
        calibrate_method=method, op_types_to_quantize=comma_list(options.ops) or None,
        nodes_to_exclude=keep or None,
    )  # fmt: skip


def _records(quantized: onnx.ModelProto, keep) -> list[NodeRecord]:
    """One record per Conv/Gemm/MatMul of the written model: quantized when its weight comes
    from a DequantizeLinear, else skipped with why; each says its precision and its weight's
    bytes. (Read off the result, not the source: the quantizer's pre-processing folds nodes,
    and many models leave node names empty.)"""
    in_int8 = graph.int8_layers(quantized)
    makers = graph.producers(quantized)
    tensors = graph.constant_tensors(quantized)
    records = []
    for node in quantized.graph.node:
        if node.op_type not in graph.LAYER_OPS:  # other quantized ops are only counted
            continue
        name = node.name or node.output[0]
        details = {"int8": name in in_int8, **_weight_bytes(node, makers, tensors)}
        if node.name and node.name in keep:
            records.append(
                NodeRecord(name, node.op_type, "skipped", "kept in float (keep)", details=details)
            )
        elif name in in_int8:
            records.append(NodeRecord(name, node.op_type, "rewritten", details=details))
        else:
            reason = "left in float by onnxruntime's quantizer (op type or inputs not supported)"
            records.append(NodeRecord(name, node.op_type, "skipped", reason, details=details))
    return records


def _weight_bytes(node: onnx.NodeProto, makers: dict, tensors: dict) -> dict[str, int]:
    """The layer's weight in bytes, in float (before) and as written (int8 values with their
    scales and zero points); {} when the weight is not a stored tensor."""
    weight = node.input[1] if len(node.input) > 1 else ""
    dequantize = makers.get(weight)
    if dequantize is None or dequantize.op_type != "DequantizeLinear":
        size = tensors[weight].nbytes if weight in tensors else None
        return {} if size is None else {"weight_bytes_before": size, "weight_bytes_after": size}
    parts = [tensors[name] for name in dequantize.input if name in tensors]
    if len(parts) < 2:
        return {}
    values, scale = parts[0], parts[1]  # the dequantized weight has the scale's float type
    return {
        "weight_bytes_before": values.size * scale.itemsize,
        "weight_bytes_after": sum(part.nbytes for part in parts),
    }
