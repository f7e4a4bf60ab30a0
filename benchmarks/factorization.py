"""Factorization passes on big and real models: speed per MAC saved, and accuracy.

    python benchmarks/factorization.py                       # everything (about 20 minutes)
    python benchmarks/factorization.py --quick               # fga, budget 0.5, batch 1, 500 images
    python benchmarks/factorization.py --models resnet18,vgg16 --passes fga,tucker2 \
        --budgets 0.5,0.33 --batches 1,8 --json /tmp/factorization.json

Speed part (`resnet18`, `vgg16`: ImageNet-shaped, seeded random weights, built in memory by
`benchmarks/big_models.py`): every pass at every MACs budget through `onnxcompress.compress`
(`target_macs=<budget>`, `never_slower` on, no calibration data), then the original and all
its rewrites timed together (`onnxcompress.benchmark.benchmark_models`: onnxruntime CPU, graph
optimisations on, medians of interleaved repeats) at each batch size. Efficiency = latency
speedup ÷ MACs reduction factor (1.0: time falls as much as MACs). Fidelity: relative L2 of
the logits on seeded random inputs (the pipeline's own validation).

Accuracy part (real trained models and labelled data from ../shared): `resnet20` (CIFAR-10),
`squeezenet` (ImageNet, fp16 upcast to fp32 here), `mnist` (MNIST): accuracy of the original
and of every pass at every budget, without and with the calibration refit. The pass runs on
calibration images from the *training* split (ImageNet has none here: a seeded 300 of the
1300 validation images calibrate and the other 1000 are the evaluation set); accuracy is on a
seeded subset of the test split (`--eval-count`). `never_slower` is off in this part by
default, so every variant really meets its MACs budget and refit on/off compare the same
factorization (timing noise cannot revert different layers in the two runs).

Every figure printed comes from this run. Passes that are not registered (yet) are skipped
with a note; so are models whose files or data are missing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# One BLAS thread, set before numpy loads. The passes' SVDs and the refit's sums run in numpy
# next to onnxruntime's own thread pool; on this 2-core machine, shared with other jobs, a
# 2-thread OpenBLAS was up to 60× slower (threads waiting on each other), and it does not
# change any figure below (onnxruntime does not use BLAS). Set OPENBLAS_NUM_THREADS to override.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from onnxcompress.passes import get_pass  # noqa: E402

from benchmarks.big_models import BIG_MODELS  # noqa: E402
from onnxcompress import CompressError, CompressOptions, compress, graph, io  # noqa: E402
from onnxcompress.analyse import analyse  # noqa: E402
from onnxcompress.benchmark import benchmark_models  # noqa: E402
from onnxcompress.calibration import DEFAULT_RANDOM_BATCHES  # noqa: E402
from onnxcompress.passkit import PassContext, sample_count  # noqa: E402
from onnxcompress.pipeline import run_passes  # noqa: E402
from onnxcompress.report.tables import human  # noqa: E402
from onnxcompress.runtime import make_session, run_session  # noqa: E402
from onnxcompress.samples import ArraySource  # noqa: E402

SHARED = REPO.parent / "shared"
SHARED_MODELS = SHARED / "models"
SHARED_DATA = SHARED / "data"

SPEED_MODELS = tuple(BIG_MODELS)
ACCURACY_MODELS = ("resnet20", "squeezenet", "mnist")
ALL_PASSES = ("fga", "tucker2", "cp", "svd")

CIFAR_MEAN = np.array([125.3, 123.0, 113.9], np.float32)
CIFAR_STD = np.array([63.0, 62.1, 66.7], np.float32)
IMAGENET_BGR_MEAN = np.array([104.0, 117.0, 123.0], np.float32)
IMAGENET_CALIBRATION = 300  # of the 1300 validation images; the other 1000 are evaluated
# --train-count samples: unlabelled, as the calibration ones, and disjoint from them.
CIFAR_TRAINING = "random CIFAR-10 training images other than the calibration ones (unlabelled)"
MNIST_TRAINING = "random MNIST training images other than the calibration ones (unlabelled)"

QUICK = {
    "passes": "fga",
    "budgets": "0.5",
    "acc_budgets": "0.5",
    "batches": "1",
    "eval_count": 500,
    "repeats": 10,
    "batched_repeats": 5,
    "calib_count": 128,
}
DEFAULTS = {
    "models": ",".join(SPEED_MODELS + ACCURACY_MODELS),
    "passes": ",".join(ALL_PASSES),
    "budgets": "0.5,0.33",
    "acc_budgets": "0.7,0.5",
    "batches": "1,8",
    "eval_count": 2000,
    "repeats": 20,
    "batched_repeats": 8,
    "calib_count": 512,
}


# ---------------------------------------------------------------------------------------------
# Passes and their records


def registered_passes(wanted: list[str]) -> tuple[list[str], dict[str, str]]:
    """The wanted passes that are registered and take `target_macs`; why the others are not."""
    from onnxcompress import passes

    available, missing = [], {}
    for name in wanted:
        spec = passes.all_passes().get(name)
        if spec is None:
            missing[name] = "not registered in passes/ (yet)"
            continue
        fields = {f.name for f in spec.option_fields()}
        lacking = sorted({"target_macs", "never_slower", "refit"} - fields)
        if lacking:
            missing[name] = f"has no option {', '.join(lacking)}"
            continue
        available.append(name)
    return available, missing


def decisions(pass_report: dict) -> dict[str, Any]:
    """Counts of rewritten / reverted / skipped layers, with the reverted ones and the skip
    reasons (for the notes under each table)."""
    records = pass_report["records"]
    counts = Counter(r["status"] for r in records)
    reverted = [
        {
            "node": r["node"],
            "reason": r.get("reason", ""),
            "timing": r.get("details", {}).get("timing"),
            "config": {k: v for k, v in r.get("details", {}).items() if k != "timing"},
        }
        for r in records
        if r["status"] == "reverted"
    ]
    rewritten = [
        {"node": r["node"], **{k: v for k, v in r.get("details", {}).items()}}
        for r in records
        if r["status"] == "rewritten"
    ]
    skips = Counter(r.get("reason", "") for r in records if r["status"] == "skipped")
    return {
        "rewritten": counts.get("rewritten", 0),
        "reverted": counts.get("reverted", 0),
        "skipped": counts.get("skipped", 0),
        "reverted_layers": reverted,
        "rewritten_layers": rewritten,
        "skip_reasons": dict(skips),
        "summary": pass_report.get("summary", {}),
        "seconds": pass_report.get("seconds"),
    }


def _layers_cell(d: dict) -> str:
    return f"{d['rewritten']} / {d['reverted']} / {d['skipped']}"


# ---------------------------------------------------------------------------------------------
# Speed part


@dataclass
class Variant:
    label: str
    pass_name: str
    budget: float
    model: onnx.ModelProto
    record: dict[str, Any]


def speed_part(args, pass_names: list[str], out: dict) -> None:
    models = [m for m in args.models if m in SPEED_MODELS]
    if not models:
        return
    print("## Speed: ImageNet-shaped models with seeded random weights\n")
    print(
        f"`never_slower` on (min_speedup = the pass default), no calibration data (no refit); "
        f"latency = median of interleaved onnxruntime runs ({args.repeats} at batch 1, "
        f"{args.batched_repeats} at larger batches), original and every rewrite in one "
        f"interleaved loop per batch size. Efficiency = speedup ÷ (MACs before / after). "
        f"Rel L2: logits on {DEFAULT_RANDOM_BATCHES} seeded random inputs. Layers: rewritten / "
        "reverted (not faster alone) / skipped.\n"
    )
    batch_heads = "".join(
        f" batch {b}: ms orig → new | speedup | efficiency |" for b in args.batches
    )
    print(f"| model | pass | target MACs | MACs after / before | layers |{batch_heads} rel L2 |")
    print("|---|---|---|---|---|" + "---|---|---|" * len(args.batches) + "---|")
    notes = []
    for name in models:
        rows, model_notes = speed_model(name, args, pass_names)
        out["speed"].extend(rows)
        notes += model_notes
    for note in notes:
        print(note)
    print()


def speed_model(name: str, args, pass_names: list[str]) -> tuple[list[dict], list[str]]:
    original = BIG_MODELS[name](seed=args.seed)
    notes: list[str] = []
    variants: list[Variant] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.onnx"
        io.save_model(original, path)
        for pass_name in pass_names:
            for budget in args.budgets:
                started = time.perf_counter()
                options = CompressOptions(
                    passes=[pass_name],
                    pass_options={
                        pass_name: {
                            "never_slower": True,
                            **args.opt.get(pass_name, {}),
                            "target_macs": budget,
                        }
                    },
                    output=str(Path(tmp) / f"{name}.{pass_name}.{budget}.onnx"),
                    threads=args.threads,
                    bench=False,
                    seed=args.seed,
                )
                try:
                    result = compress(path, options)
                except CompressError as exc:
                    notes.append(f"- {name} {pass_name} @ {budget}: error: {exc}")
                    continue
                report = result.report
                record = {
                    "model": name,
                    "pass": pass_name,
                    "target_macs": budget,
                    "macs_before": report["before"]["total_macs"],
                    "macs_after": report["after"]["total_macs"],
                    "params_before": report["before"]["total_params"],
                    "params_after": report["after"]["total_params"],
                    "rel_l2": report["validation"]["worst_rel_l2"],
                    "compress_seconds": round(time.perf_counter() - started, 1),
                    "layers": decisions(report["passes"][0]),
                    "latency": {},
                }
                record["macs_ratio"] = record["macs_after"] / record["macs_before"]
                label = f"{pass_name}@{budget}"
                variants.append(Variant(label, pass_name, budget, result.model, record))
                print(
                    f"<!-- {name} {label}: compressed in {record['compress_seconds']} s -->",
                    file=sys.stderr,
                    flush=True,
                )
    rng = np.random.default_rng(args.seed)
    for batch in args.batches:
        if not variants:
            break
        x = rng.standard_normal((batch, 3, 224, 224), dtype=np.float32)
        repeats = args.repeats if batch == 1 else args.batched_repeats
        started = time.perf_counter()
        timings = benchmark_models(
            {"original": original, **{v.label: v.model for v in variants}},
            {"input": x},
            threads=args.threads,
            warmup=2,
            repeats=repeats,
        )
        print(
            f"<!-- {name} batch {batch}: timed in {time.perf_counter() - started:.0f} s -->",
            file=sys.stderr,
            flush=True,
        )
        base = timings["original"]
        for v in variants:
            t = timings[v.label]
            speedup = base["median_ms"] / t["median_ms"]
            v.record["latency"][str(batch)] = {
                "original_ms": base["median_ms"],
                "original_iqr_ms": base["iqr_ms"],
                "result_ms": t["median_ms"],
                "result_iqr_ms": t["iqr_ms"],
                "runs": t["runs"],
                "speedup": speedup,
                "efficiency": speedup * v.record["macs_ratio"],
            }
    rows = []
    for v in variants:
        r = v.record
        cells = ""
        for batch in args.batches:
            lat = r["latency"].get(str(batch))
            if lat is None:
                cells += " | | |"
                continue
            cells += (
                f" {lat['original_ms']:.1f} → {lat['result_ms']:.1f} | {lat['speedup']:.2f}× "
                f"| {lat['efficiency']:.2f} |"
            )
        print(
            f"| {name} | {v.pass_name} | {v.budget:g} | {r['macs_ratio']:.3f} "
            f"({human(r['macs_after'])} / {human(r['macs_before'])}) | {_layers_cell(r['layers'])} "
            f"|{cells} {r['rel_l2']:.3f} |",
            flush=True,
        )
        notes += _layer_notes(name, v.label, r["layers"])
        rows.append(r)
    return rows, notes


def _layer_notes(model: str, label: str, layers: dict) -> list[str]:
    notes = []
    summary = layers["summary"]
    if summary.get("target_reached") is False:
        notes.append(f"- {model} {label}: {summary.get('note', 'target not reached')}")
    if layers["reverted_layers"]:
        parts = []
        for r in layers["reverted_layers"]:
            timing = r["timing"] or {}
            parts.append(
                f"{r['node']} ({timing.get('original_ms', '?')} → "
                f"{timing.get('rewritten_ms', '?')} ms alone, {_config_text(r['config'])})"
            )
        notes.append(f"- {model} {label}: reverted {', '.join(parts)}")
    if layers["rewritten"] == 0:
        reasons = "; ".join(f"{n}× {why}" for why, n in layers["skip_reasons"].items())
        notes.append(f"- {model} {label}: nothing rewritten. Skips: {reasons}")
    return notes


def _config_text(config: dict) -> str:
    keep = {k: v for k, v in config.items() if isinstance(v, int | float | str) and k != "refit"}
    return ", ".join(f"{k}={v}" for k, v in keep.items())


# ---------------------------------------------------------------------------------------------
# Accuracy part: data


@dataclass
class Dataset:
    model: onnx.ModelProto
    calibration: list[dict[str, np.ndarray]]
    calibration_note: str
    evaluation: list[dict[str, np.ndarray]]
    labels: np.ndarray
    evaluation_note: str
    # Samples of the model's training split to train on (`--train-count`), never evaluated.
    training: ArraySource | None = None


def _load_module():
    sys.path.insert(0, str(SHARED_DATA))
    import load  # ../shared/data/load.py

    return load


def _batches(name: str, x: np.ndarray, size: int) -> list[dict[str, np.ndarray]]:
    return [{name: np.ascontiguousarray(x[i : i + size])} for i in range(0, len(x), size)]


def _subset(count: int, limit: int | None, rng: np.random.Generator) -> np.ndarray:
    """A seeded random subset (sorted), or everything when `limit` is None or ≥ count."""
    if limit is None or limit >= count:
        return np.arange(count)
    return np.sort(rng.choice(count, limit, replace=False))


def training_split(
    args, name: str, x: np.ndarray, prepare, what: str, exclude: np.ndarray
) -> ArraySource | None:
    """`args.train_count` (None: no training set) seeded samples of `x` other than the rows
    `exclude` (the calibration ones, or the evaluated ones), prepared, as an in-memory source
    for the passes that train; `what` says what they are."""
    count = getattr(args, "train_count", None)
    if not count:
        return None
    pool = np.setdiff1d(np.arange(len(x)), exclude)
    rows = pool[_subset(len(pool), count, np.random.default_rng([args.seed, 2]))]
    return ArraySource({name: prepare(x[rows])}, None, f"{len(rows)} {what}")


def resnet20_data(args) -> Dataset:
    load = _load_module()
    model = io.load_model(SHARED_MODELS / "resnet20_cifar10.onnx")
    (x_train, _), (x_test, y_test) = load.cifar10()

    def prepare(x: np.ndarray) -> np.ndarray:
        x = (x.astype(np.float32) - CIFAR_MEAN) / CIFAR_STD
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    rng = np.random.default_rng(args.seed)
    calib = _subset(len(x_train), args.calib_count, rng)
    evaluate = _subset(len(x_test), args.eval_count, rng)
    return Dataset(
        model,
        _batches("input", prepare(x_train[calib]), 64),
        f"{len(calib)} random CIFAR-10 training images",
        _batches("input", prepare(x_test[evaluate]), 250),
        y_test[evaluate],
        f"{len(evaluate)} of the 10000 CIFAR-10 test images (seeded random subset)",
        training_split(args, "input", x_train, prepare, CIFAR_TRAINING, calib),
    )


def mnist_data(args) -> Dataset:
    load = _load_module()
    model = io.load_model(SHARED_MODELS / "mnist_cntk.onnx")
    (x_train, _), (x_test, y_test) = load.mnist()

    def prepare(x: np.ndarray) -> np.ndarray:
        return x.astype(np.float32)[:, None]  # 0..255, [N, 1, 28, 28]

    rng = np.random.default_rng(args.seed)
    calib = _subset(len(x_train), args.calib_count, rng)
    evaluate = _subset(len(x_test), args.eval_count, rng)
    return Dataset(
        model,
        _batches("Input3", prepare(x_train[calib]), 1),  # the model's batch is fixed at 1
        f"{len(calib)} random MNIST training images",
        _batches("Input3", prepare(x_test[evaluate]), 1),
        y_test[evaluate],
        f"{len(evaluate)} of the 10000 MNIST test images (seeded random subset)",
        training_split(args, "Input3", x_train, prepare, MNIST_TRAINING, calib),
    )


def squeezenet_data(args) -> Dataset:
    from PIL import Image

    load = _load_module()
    model = upcast_fp16_to_fp32(io.load_model(SHARED_MODELS / "squeezenet1.0_fp16.onnx"))
    paths, labels = load.imagenet_val_1300()
    images = []
    for path in paths:
        image = Image.open(path).convert("RGB").resize((224, 224), Image.BILINEAR)
        images.append(np.asarray(image, np.float32)[:, :, ::-1] - IMAGENET_BGR_MEAN)  # BGR
    x = np.ascontiguousarray(np.stack(images).transpose(0, 3, 1, 2))
    order = np.random.default_rng(args.seed).permutation(len(paths))
    calib = np.sort(order[: min(IMAGENET_CALIBRATION, args.calib_count)])
    rest = np.sort(order[IMAGENET_CALIBRATION:])
    if args.eval_count is not None and args.eval_count < len(rest):
        rest = np.sort(np.random.default_rng(args.seed + 1).choice(rest, args.eval_count, False))
    return Dataset(
        model,
        _batches("data_0", x[calib], 1),  # the model's batch is fixed at 1
        f"{len(calib)} of the 1300 ImageNet validation images (no training images here)",
        _batches("data_0", x[rest], 1),
        labels[rest],
        f"{len(rest)} ImageNet validation images disjoint from the calibration ones",
        training_split(
            args,
            "data_0",
            x,
            lambda v: v,
            f"ImageNet validation images of the {len(paths) - len(rest)} not evaluated "
            "(the calibration ones too)",
            rest,
        ),
    )


def upcast_fp16_to_fp32(model: onnx.ModelProto) -> onnx.ModelProto:
    """The `upcast` pass with float32 inputs and outputs: the model runs in fp32 end to end."""
    spec = get_pass("upcast")
    return spec.run(model, spec.make_options({"io": "float32"}), PassContext({})).model


DATASETS = {"resnet20": resnet20_data, "squeezenet": squeezenet_data, "mnist": mnist_data}


# ---------------------------------------------------------------------------------------------
# Accuracy part: runs


def predict(model: onnx.ModelProto, batches, threads: int) -> np.ndarray:
    """The first output over all batches, one row per sample (onnxruntime, optimised)."""
    session = make_session(model, threads=threads, optimize=True)
    name = session.get_outputs()[0].name
    rows = [run_session(session, batch, [name])[0] for batch in batches]
    return np.concatenate([r.reshape(len(r), -1) for r in rows]).astype(np.float64)


def accuracy_part(args, pass_names: list[str], out: dict) -> None:
    models = [m for m in args.models if m in ACCURACY_MODELS]
    if not models:
        return
    never = "on" if args.acc_never_slower else "off"
    print("## Accuracy: trained models on real labelled data\n")
    print(
        f"`never_slower` {never}; refit = least-squares refit of each rewritten layer's last "
        "factor and bias on the calibration images (≤ "
        f"{args.calib_count}); accuracy = top-1 on the evaluation images; agreement = top-1 "
        "agreement with the original; rel L2 = ‖out − out_orig‖ / ‖out_orig‖ over the "
        "evaluation set (squeezenet: softmax probabilities; others: logits). Calib error: mean "
        "over rewritten layers of the layer-output relative error on the calibration data, "
        "before → after refit (from the pass records).\n"
    )
    print(
        "| model | pass | target MACs | refit | MACs after / before | layers | accuracy "
        "original → compressed | drop (pts) | agreement | rel L2 | calib error | pass s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    notes = []
    for name in models:
        try:
            data = DATASETS[name](args)
        except (OSError, CompressError) as exc:
            notes.append(f"- {name}: not run: {exc}")
            continue
        rows, model_notes = accuracy_model(name, data, args, pass_names)
        out["accuracy"].extend(rows)
        notes += model_notes
    for note in notes:
        print(note)
    print()


def accuracy_model(name: str, data: Dataset, args, pass_names) -> tuple[list[dict], list[str]]:
    from onnxcompress import passes

    shapes = graph.resolve_input_shapes(data.model)
    macs_before = analyse(data.model, shapes).total_macs
    reference = predict(data.model, data.evaluation, args.threads)
    accuracy_original = float(np.mean(reference.argmax(1) == data.labels))
    notes = [
        f"- {name}: calibration = {data.calibration_note}; evaluation = {data.evaluation_note}; "
        f"original accuracy {100 * accuracy_original:.2f} %"
    ]
    rows = []
    for pass_name in pass_names:
        for budget in args.acc_budgets:
            for refit in (False, True):
                context = PassContext(
                    input_shapes=shapes,
                    calibration=data.calibration if refit else None,
                    seed=args.seed,
                    threads=args.threads,
                )
                spec = passes.get_pass(pass_name)
                raw = {
                    "never_slower": args.acc_never_slower,
                    **args.opt.get(pass_name, {}),
                    "target_macs": budget,
                    "refit": refit,
                }
                started = time.perf_counter()
                try:
                    model, reports = run_passes(
                        data.model,
                        [spec],
                        {pass_name: spec.make_options(raw)},
                        context,
                        lambda _step: None,
                    )
                    graph.check_model(model)
                except CompressError as exc:
                    notes.append(f"- {name} {pass_name} @ {budget} refit={refit}: error: {exc}")
                    continue
                seconds = time.perf_counter() - started
                layers = decisions(reports[0])
                outputs = predict(model, data.evaluation, args.threads)
                predictions = outputs.argmax(1)
                rel_l2 = float(np.linalg.norm(outputs - reference) / np.linalg.norm(reference))
                # Passes may record a note (a string) instead of refit figures for a layer.
                refits = [
                    r["refit"]
                    for r in layers["rewritten_layers"]
                    if isinstance(r.get("refit"), dict)
                    and "calibration_rel_error_before" in r["refit"]
                ]
                row = {
                    "model": name,
                    "pass": pass_name,
                    "target_macs": budget,
                    "refit": refit,
                    "never_slower": args.acc_never_slower,
                    "macs_before": macs_before,
                    "macs_after": analyse(model, shapes).total_macs,
                    "accuracy_original": accuracy_original,
                    "accuracy": float(np.mean(predictions == data.labels)),
                    "agreement": float(np.mean(predictions == reference.argmax(1))),
                    "rel_l2": rel_l2,
                    "evaluated": len(data.labels),
                    "calibration_images": sample_count(data.calibration) if refit else 0,
                    "calib_error_before": _mean(
                        [r["calibration_rel_error_before"] for r in refits]
                    ),
                    "calib_error_after": _mean([r["calibration_rel_error_after"] for r in refits]),
                    "weight_error": _mean(
                        [r.get("weight_rel_error") for r in layers["rewritten_layers"]]
                    ),
                    "seconds": round(seconds, 1),
                    "layers": layers,
                }
                row["macs_ratio"] = row["macs_after"] / row["macs_before"]
                rows.append(row)
                calib = (
                    f"{row['calib_error_before']:.3f} → {row['calib_error_after']:.3f}"
                    if refits
                    else "—"
                )
                print(
                    f"| {name} | {pass_name} | {budget:g} | {'yes' if refit else 'no'} "
                    f"| {row['macs_ratio']:.3f} | {_layers_cell(layers)} "
                    f"| {100 * accuracy_original:.2f} → {100 * row['accuracy']:.2f} "
                    f"| {100 * (accuracy_original - row['accuracy']):+.2f} "
                    f"| {100 * row['agreement']:.1f} % | {rel_l2:.3f} | {calib} | {seconds:.0f} |",
                    flush=True,
                )
                if (
                    refit
                    or layers["rewritten"] == 0
                    or layers["summary"].get("target_reached") is False
                ):
                    notes += [
                        n
                        for n in _layer_notes(name, f"{pass_name}@{budget}", layers)
                        if n not in notes
                    ]
    return rows, notes


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


# ---------------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _pass_options(parser: argparse.ArgumentParser, items: list[str]) -> dict[str, dict]:
    options: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        pass_name, dot, option = key.partition(".")
        if not sep or not dot:
            parser.error(f"--opt {item}: expected PASS.KEY=VALUE")
        if option in ("target_macs", "refit"):
            parser.error(f"--opt {item}: {option} is set by the benchmark (--budgets, refit runs)")
        options.setdefault(pass_name, {})[option] = value
    return options


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated (default {DEFAULTS['models']})")
    parser.add_argument("--passes", help=f"comma-separated (default {DEFAULTS['passes']})")
    parser.add_argument("--budgets", help="speed part: target_macs values (default 0.5,0.33)")
    parser.add_argument("--acc-budgets", help="accuracy part: target_macs (default 0.7,0.5)")
    parser.add_argument("--batches", help="speed part: batch sizes (default 1,8)")
    parser.add_argument("--eval-count", type=int, help="evaluation images per model (2000)")
    parser.add_argument(
        "--calib-count", type=int, help="calibration images, at most 512 (512; quick 128)"
    )
    parser.add_argument("--repeats", type=int, help="timed runs per model at batch 1 (20)")
    parser.add_argument("--batched-repeats", type=int, help="timed runs at larger batches (8)")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--acc-never-slower", action="store_true", help="accuracy part: never_slower on"
    )
    parser.add_argument("--quick", action="store_true", help="fga, budget 0.5, batch 1, 500 images")
    parser.add_argument(
        "--opt",
        action="append",
        default=[],
        metavar="PASS.KEY=VALUE",
        help="extra pass option for both parts, repeatable (not target_macs or refit)",
    )
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args(argv)
    for key, default in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK.get(key, default) if args.quick else default)
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(SPEED_MODELS + ACCURACY_MODELS))
    if unknown:
        parser.error(
            f"unknown model {unknown[0]}; models: {', '.join(SPEED_MODELS + ACCURACY_MODELS)}"
        )
    args.passes = [p for p in args.passes.split(",") if p]
    args.budgets = _floats(args.budgets)
    args.acc_budgets = _floats(args.acc_budgets)
    args.batches = [int(b) for b in args.batches.split(",") if b]
    args.opt = _pass_options(parser, args.opt)
    if args.calib_count > 512:
        parser.error("--calib-count: refit uses at most 512 calibration images")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    command = "python benchmarks/factorization.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    pass_names, missing = registered_passes(args.passes)
    print(
        f"`{command.strip()}` — {platform.machine()}, {os.cpu_count()} cores "
        f"(load average {os.getloadavg()[0]:.1f} at start), onnxruntime {ort.__version__} CPU, "
        f"{args.threads} intra-op threads, graph optimisations on; {args.repeats} timed runs at "
        f"batch 1, {args.batched_repeats} at larger batches; seed {args.seed}; numpy with "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}"
        + "".join(f"; {p}.{k}={v}" for p, kv in args.opt.items() for k, v in kv.items())
        + "\n"
    )
    for name, why in missing.items():
        print(f"- pass {name} skipped: {why}")
    if missing:
        print()
    out: dict[str, Any] = {
        "command": command.strip(),
        "machine": platform.machine(),
        "cores": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "threads": args.threads,
        "repeats": args.repeats,
        "batched_repeats": args.batched_repeats,
        "pass_options": args.opt,
        "load_average_start": os.getloadavg(),
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
        "passes": pass_names,
        "passes_skipped": missing,
        "speed": [],
        "accuracy": [],
    }
    if not pass_names:
        print("no pass to run")
        return 1
    speed_part(args, pass_names, out)
    out["speed_seconds"] = round(time.perf_counter() - started, 1)
    accuracy_part(args, pass_names, out)
    out["total_seconds"] = round(time.perf_counter() - started, 1)
    out["load_average_end"] = os.getloadavg()
    print(
        f"Total {out['total_seconds']:.0f} s (speed part {out['speed_seconds']:.0f} s); "
        f"load average {os.getloadavg()[0]:.1f} at the end."
    )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=_jsonable))
    return 0


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
