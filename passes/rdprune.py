"""`rdprune`: SuRP successive-refinement pruning (methods.md §4) of Conv/Gemm/MatMul constant
weights, pooled over layers, with the entropy-coded stream handed to the `.onnxc` writer. The
summary compares it with magnitude pruning at the same sparsity, quantised and coded alike.
`retrain_steps` prunes in rounds with distillation between them, as SuRP's authors did."""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
import onnx

from onnxcompress import graph
from onnxcompress.coding import surp as surp
from onnxcompress.coding.entropy import encode_categorical, encode_gaps, pack_sections
from onnxcompress.coding.onnxc import CodedWeights
from onnxcompress.coding.sparse_codec import encode_sparse
from onnxcompress.coding.surp_stream import encode_payload
from onnxcompress.errors import CompressError
from onnxcompress.maths.sparsity import magnitude_masks, quantize_uniform
from onnxcompress.maths.successive_pruning import NORMALIZATIONS
from onnxcompress.passkit import NodeRecord, PassContext, PassResult, comma_list, option
from onnxcompress.prunable import label, prunable_layers, write_weights
from onnxcompress.registry import register
from onnxcompress.train.prune_rounds import Retraining, retrained

log = logging.getLogger(__name__)

DEFAULT_SPARSITY = 0.8
RDPRUNE_OPS = ("Conv", "Gemm", "MatMul")
RANDOM_BATCHES = 16


@dataclass(frozen=True)
class RdPruneOptions:
    sparsity: float | None = option(
        None,
        f"fraction of the weights left zero where the encoder stops (default {DEFAULT_SPARSITY} "
        "unless target_bits_per_param is given; with both, whichever comes first)",
    )
    target_bits_per_param: float | None = option(
        None, "stop when the coded weights reach this many bits per weight (payload included)"
    )
    keep: str | None = option(
        None,
        "fnmatch patterns of node names whose weights stay dense, comma-separated. Default "
        "none: SuRP is global and normalised per tensor, so small first/last layers keep "
        "their share, as in the paper, which prunes every layer",
    )
    beta: float | None = option(
        None,
        "SuRP's β, weights expected above each threshold; default ln n (the paper). Larger: "
        "cheaper index gaps (~log2(n/β)+1.44 bits a step), coarser survivors",
    )
    normalize: str = option(
        "rms", "per-tensor scale before pooling: rms, l2 (the official code) or none"
    )
    compare: bool = option(
        True, "also code magnitude pruning at the same sparsity and measure output fidelity"
    )
    baseline_bits: str = option("4,6,8", "bit widths of the magnitude-pruning baselines")
    retrain_steps: int = option(
        0,
        "SuRP as its authors ran it: prune in `rounds` rounds to a rising sparsity, each "
        "followed by this many steps of distillation toward the original (zeros held), then "
        "code the retrained weights; 0: prune once, untrained. Needs calibration data, torch",
    )
    rounds: int = option(
        3, "pruning rounds with retrain_steps; each prunes the same share of the weights left"
    )

    def __post_init__(self) -> None:
        if self.sparsity is not None and not 0.0 <= self.sparsity <= 1.0:
            raise CompressError(f"rdprune.sparsity={self.sparsity}: expected a fraction in [0, 1]")
        bits = self.target_bits_per_param
        if bits is not None and not (math.isfinite(bits) and bits > 0):
            raise CompressError(f"rdprune.target_bits_per_param={bits}: expected a number > 0")
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta >= 1):
            raise CompressError(f"rdprune.beta={self.beta}: expected a number >= 1")
        if self.normalize not in NORMALIZATIONS:
            choices = ", ".join(NORMALIZATIONS)
            raise CompressError(f"rdprune.normalize={self.normalize!r}: expected {choices}")
        parse_bits(self.baseline_bits)
        Retraining(self.retrain_steps, self.rounds).check("rdprune")


def parse_bits(text: str) -> list[int]:
    """Bit widths from "4,6,8", or CompressError."""
    try:
        widths = [int(token) for token in text.split(",") if token.strip()]
    except ValueError:
        widths = []
    if not widths or any(not 2 <= b <= 16 for b in widths):
        raise CompressError(f"rdprune.baseline_bits={text!r}: expected widths 2..16, e.g. 4,6,8")
    return widths


@register(
    "rdprune", RdPruneOptions, "SuRP rate-distortion pruning, entropy-coded (.onnxc)", lossy=True
)
def rdprune(model: onnx.ModelProto, options: RdPruneOptions, context: PassContext) -> PassResult:
    work = onnx.ModelProto()
    work.CopyFrom(model)
    constants = graph.constant_tensors(work)
    layers, records = find_layers(work, constants, options.keep)
    weights = {name: constants[name] for _, name in layers}
    if not weights:
        return PassResult(work, False, records, {"pruned_tensors": 0})
    retraining = None
    if options.retrain_steps:
        work, retraining = _retrained(work, list(weights), options, context)
        constants = graph.constant_tensors(work)
    pooled = {name: constants[name].astype(np.float32) for name in weights}
    result = _encode(pooled, options)
    payload = encode_payload(result.stream)
    decoded = surp.decode_payload(payload)  # what the decoder will rebuild, written as is
    new_values = {name: decoded[name].astype(weights[name].dtype) for name in weights}
    changed = retraining is not None or any(
        not np.array_equal(new_values[n], weights[n]) for n in weights
    )
    if changed:
        write_weights(work, new_values)
    records += [_rewritten(node, name, new_values[name]) for node, name in layers]
    summary = _summary(result, payload)
    if retraining is not None:
        summary["retraining"] = retraining
    # Float16 weights hold the decoded float32 values cast to float16; the .onnxc reader
    # casts the same way, so the block still restores them bit for bit.
    artifacts = {"coded_weights": [CodedWeights("surp", list(weights), payload)]}
    if options.compare:
        summary["comparison"] = compare(model, work, pooled, decoded, payload, options, context)
    return PassResult(work, changed, records, summary, artifacts)


def _retrained(work, names, options: RdPruneOptions, context: PassContext):
    """(model, summary) after `rounds` SuRP rounds to `sparsity` (not to a bit budget: that
    stops only the last coding), each retrained."""
    schedule = Retraining(options.retrain_steps, options.rounds)
    prune_to = functools.partial(_surp_round, options=options)
    target = DEFAULT_SPARSITY if options.sparsity is None else options.sparsity
    return retrained(work, names, prune_to, target, schedule, context, "rdprune")


def _surp_round(
    weights: dict[str, np.ndarray], sparsity: float, options: RdPruneOptions
) -> dict[str, np.ndarray]:
    """One pruning round of `retrain_steps`: SuRP to `sparsity`, decoded, in each weight's type."""
    pooled = {name: value.astype(np.float32) for name, value in weights.items()}
    result = _encode(
        pooled, dataclasses.replace(options, sparsity=sparsity, target_bits_per_param=None)
    )
    return {name: result.weights[name].astype(value.dtype) for name, value in weights.items()}


def _encode(weights: dict[str, np.ndarray], options: RdPruneOptions) -> surp.SurpResult:
    size = sum(value.size for value in weights.values())
    sparsity = options.sparsity
    bits = options.target_bits_per_param
    if sparsity is None and bits is None:
        sparsity = DEFAULT_SPARSITY
    return surp.surp_encode(
        weights,
        sparsity=sparsity,
        target_bits=None if bits is None else int(bits * size),
        beta=None if options.beta is None else min(options.beta, size),
        normalize=options.normalize,
    )


def find_layers(
    model: onnx.ModelProto, constants: dict[str, np.ndarray], keep: str | None
) -> tuple[list[tuple[onnx.NodeProto, str]], list[NodeRecord]]:
    """[(node, weight name)] of the prunable layers in graph order, and skip records."""
    patterns = [token for token in comma_list(keep) if token != "none"]
    layers, records = prunable_layers(model, constants, ops=RDPRUNE_OPS)
    found, dense = [], set()
    for layer in layers:
        match = next((p for p in patterns if fnmatch.fnmatchcase(label(layer.node), p)), "")
        if match:
            dense.add(layer.weight)
            why = f"kept dense: name matches '{match}' (rdprune.keep)"
            records.append(NodeRecord(label(layer.node), layer.node.op_type, "skipped", why))
        else:
            found.append((layer.node, layer.weight))
    # A weight shared with a layer kept dense stays dense everywhere.
    pruned = [(node, name) for node, name in found if name not in dense]
    records += [
        NodeRecord(label(node), node.op_type, "skipped", "weight shared with a layer kept dense")
        for node, name in found
        if name in dense
    ]
    order = {label(node): index for index, node in enumerate(model.graph.node)}
    records.sort(key=lambda record: order.get(record.node, len(order)))
    return pruned, records


def _rewritten(node: onnx.NodeProto, name: str, value: np.ndarray) -> NodeRecord:
    nonzero = int(np.count_nonzero(value))
    return NodeRecord(
        label(node),
        node.op_type,
        "rewritten",
        params_before=int(value.size),
        params_after=nonzero,
        details={"weight": name, "sparsity": round(1 - nonzero / value.size, 6)},
    )


def _summary(result: surp.SurpResult, payload: bytes) -> dict:
    stream, size = result.stream, result.size
    gap_bits = 8 * len(encode_gaps(stream.gaps)) if stream.steps else 0
    return {
        "pruned_tensors": len(stream.names),
        "params": size,
        "nonzero_params": result.nonzeros,
        "sparsity": round(1 - result.nonzeros / size, 6),
        "steps": result.steps,
        "refreshes": result.refreshes,
        "tail_fit_refreshes": result.tail_fit_refreshes,
        "beta": round(result.beta, 3),
        "coded_bytes": len(payload),
        "coded_bits": 8 * len(payload),
        "bits_per_param": round(8 * len(payload) / size, 4),
        "bits_per_nonzero": round(8 * len(payload) / max(result.nonzeros, 1), 3),
        "gap_bits_per_step": round(gap_bits / max(result.steps, 1), 3),
        # Geometric gaps with about β candidates over n weights (methods.md).
        "theory_bits_per_step": round(math.log2(size / result.beta) + 1.44, 3),
    }


def code_magnitude_baseline(
    weights: dict[str, np.ndarray], masks: dict[str, np.ndarray], bits: int | None
) -> tuple[bytes, dict[str, np.ndarray]]:
    """(coded bytes, reconstruction) of magnitude pruning: positions as gaps over the pooled
    mask, survivors quantised per tensor to 2**bits symmetric levels (sign included in the
    code) and range-coded, one float32 peak per tensor. bits None: float32 values, coded
    losslessly by the `.onnxc` sparse codec."""
    pruned = {
        n: np.where(masks[n], w, np.float32(0)).astype(np.float32) for n, w in weights.items()
    }
    if bits is None:
        return encode_sparse(pruned), pruned
    positions = np.flatnonzero(np.concatenate([masks[n].reshape(-1) for n in weights]))
    codes, peaks = [], []
    for name, weight in weights.items():
        survivors = weight[masks[name]]
        code, codebook = quantize_uniform(survivors, bits)
        pruned[name][masks[name]] = codebook[code]
        codes.append(code)
        peaks.append(np.float32(np.max(np.abs(survivors)) if survivors.size else 0.0))
    payload = pack_sections(
        [
            encode_gaps(np.diff(positions, prepend=-1) - 1),
            encode_categorical(np.concatenate(codes), 1 << bits),
            np.asarray(peaks, "<f4").tobytes(),
        ]
    )
    return payload, pruned


def compare(
    model: onnx.ModelProto,
    base: onnx.ModelProto,
    weights: dict[str, np.ndarray],
    decoded: dict[str, np.ndarray],
    payload: bytes,
    options: RdPruneOptions,
    context: PassContext,
) -> dict:
    """SuRP against magnitude pruning at the same sparsity: coded bytes and output fidelity
    against `model`, each variant's weights written into `base` (with retrain_steps, the
    retrained model: its biases and norm scales trained too)."""
    from onnxcompress.validate import random_inputs

    size = sum(w.size for w in weights.values())
    nonzero = sum(int(np.count_nonzero(v)) for v in decoded.values())
    masks = magnitude_masks(weights, 1 - nonzero / size, "global")
    variants = {"surp": (len(payload), decoded)}
    for bits in [*parse_bits(options.baseline_bits), None]:
        coded, values = code_magnitude_baseline(weights, masks, bits)
        variants[f"magnitude_{bits}bit" if bits else "magnitude_float32"] = (len(coded), values)
    try:
        batches = context.calibration or random_inputs(
            model, context.input_shapes, count=RANDOM_BATCHES, seed=context.seed
        )
    except CompressError as exc:
        return {
            "note": f"no fidelity: {exc}",
            **{k: {"bytes": b} for k, (b, _) in variants.items()},
        }
    values = {k: v for k, (_, v) in variants.items()}
    fidelity = output_fidelity(model, base, values, batches, context)
    table = {
        key: {"bytes": coded, "bits_per_param": round(8 * coded / size, 4), **fidelity[key]}
        for key, (coded, _) in variants.items()
    }
    return {
        "inputs": "calibration" if context.calibration else f"random (seed {context.seed})",
        "variants": table,
        "answer": _equal_fidelity(table),
    }


def output_fidelity(
    model: onnx.ModelProto, base: onnx.ModelProto, variants: dict, batches: list, context
) -> dict[str, dict]:
    """Per variant (name → weights, written into `base`): worst relative L2 over the outputs
    vs `model`'s, and top-1 agreement when an output looks like class scores."""
    from onnxcompress.runtime import run_model
    from onnxcompress.validate import is_classifier_output

    reference = run_model(model, batches, threads=context.threads)
    constants = graph.constant_tensors(model)
    figures = {}
    for key, values in variants.items():
        candidate = onnx.ModelProto()
        candidate.CopyFrom(base)
        write_weights(candidate, {n: v.astype(constants[n].dtype) for n, v in values.items()})
        outputs = run_model(candidate, batches, threads=context.threads)
        worst, agreement = 0.0, None
        for name, ref in reference.items():
            ref64, out64 = ref.astype(np.float64), outputs[name].astype(np.float64)
            norm = float(np.linalg.norm(ref64))
            error = float(np.linalg.norm(ref64 - out64))
            worst = max(worst, error / norm if norm > 0 else error)
            if agreement is None and is_classifier_output(ref.shape):
                flat_ref, flat_out = ref.reshape(len(ref), -1), out64.reshape(len(ref), -1)
                agreement = float(np.mean(flat_ref.argmax(1) == flat_out.argmax(1)))
        figures[key] = {"rel_l2": round(worst, 6)}
        if agreement is not None:
            figures[key]["top1_agreement"] = round(agreement, 4)
    return figures


def _equal_fidelity(table: dict) -> str:
    """The smallest baseline at least as faithful as SuRP, and the size ratio."""
    mine = table["surp"]
    rivals = [
        (row["bytes"], key)
        for key, row in table.items()
        if key != "surp" and row.get("rel_l2", math.inf) <= mine.get("rel_l2", -1)
    ]
    caveat = ""
    if mine.get("rel_l2", 0) > 0.5:
        caveat = " (all outputs are far from the original's here: compare at a lower sparsity)"
    if not rivals:
        return (
            "no magnitude-pruning baseline at this sparsity is as faithful as SuRP "
            f"(rel L2 {mine.get('rel_l2')}); compare at other sparsities" + caveat
        )
    coded, key = min(rivals)
    ratio = coded / mine["bytes"]
    verdict = f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / ratio:.2f}x larger"
    return (
        f"smallest baseline at least as faithful: {key} (rel L2 {table[key]['rel_l2']} vs "
        f"SuRP's {mine['rel_l2']}), {coded:,} bytes vs SuRP's {mine['bytes']:,}: SuRP is {verdict}"
        + caveat
    )
