"""The one flow behind the CLI and the library: load → analyse → passes → check → validate →
benchmark → write + report. Passes are looked up by name in `onnxcompress.registry`."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx

from onnxcompress import executor, graph, io, large_models
from onnxcompress.analyse import analyse
from onnxcompress.errors import CompressError
from onnxcompress.holdout import ReadWatch, split_holdout, validation_entry
from onnxcompress.input_checks import require_sized_tensors
from onnxcompress.layer_roles import layer_roles
from onnxcompress.pass_contract import check_contract, fingerprint
from onnxcompress.passkit import PassContext, PassSpec, Progress, no_outline, no_progress
from onnxcompress.resources import run_resources
from onnxcompress.samples.training_set import watched_training_set
from onnxcompress.verdict import BROKEN, judge, weight_only_warning

StepCallback = Callable[[str], None]


@dataclass
class CompressOptions:
    """Everything a run needs besides the model path; the CLI fills it from its flags."""

    passes: list[str]
    pass_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    output: str | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    data: str | None = None
    images: str | None = None
    preprocess: str | None = None
    labels: str | None = None
    calibration_count: int | None = None
    # Training set of passes that train (--train-data: .npz files, folders), read lazily.
    train_data: list[str] = field(default_factory=list)
    train_labels: str | None = None
    # Fraction of the user's samples kept out of the passes' refit and used only to validate.
    holdout: float = 0.25
    # Interval each random input is drawn from when no data is given ("" for every input).
    input_ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    batch_size: int | None = None
    seed: int = 0
    threads: int = 2
    jobs: int = 1  # worker processes for passes with independent jobs (auto)
    executor: str = "local"  # where those jobs run: "local" or "ray" (a Ray cluster)
    ray_address: str | None = None  # the Ray cluster's (None: $RAY_ADDRESS, else a local one)
    bench: bool = True
    bench_repeats: int = 30
    max_rel_l2: float | None = None
    # A `.json` file, or a folder (existing, ending in "/", or without `.json`) that gets
    # report.json, report.md and report.html.
    report: str | None = None


@dataclass
class CompressResult:
    report: dict[str, Any]
    model: onnx.ModelProto
    output: Path
    # False when over the --max-rel-l2 tolerance or not validated under one; without that
    # tolerance, False when the verdict is broken.
    passed: bool

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


def lookup_passes(names: list[str]) -> list[PassSpec]:
    """The registered passes for these names (imported lazily: the core never imports a pass)."""
    from onnxcompress import registry

    if not names:
        raise CompressError(
            f"no pass given; passes are: {', '.join(sorted(registry.all_passes()))}"
        )
    return [registry.get_pass(name) for name in names]


def resolve_output_path(model_path: Path, output: str | None) -> Path:
    """The user's `-o` (a symlink resolved to its target), else `<name>.compressed.onnx` beside
    the input or, if that exists, the first free `<name>.compressed-2.onnx`, ...; never the
    input itself, never anything but a regular file."""
    out = io.output_file(output) if output else io.free_path(default_output(model_path))
    if out.exists() and out.resolve() == model_path.resolve():
        raise CompressError(f"output {out} is the input file; choose another path with -o")
    folder = out.parent if str(out.parent) else Path(".")
    if folder.exists() and not folder.is_dir():
        raise CompressError(f"output folder {folder} is a file, not a folder")
    if not folder.is_dir():
        raise CompressError(f"output folder {folder} does not exist")
    if not _writable(folder):
        raise CompressError(f"output folder {folder} is not writable; choose another path with -o")
    return out


def default_output(model_path: Path) -> Path:
    return model_path.with_name(model_path.stem + ".compressed.onnx")


def save_result(model, output: Path, model_path: Path, named: bool) -> tuple[int, Path]:
    """Write the model; a name the tool picked replaces nothing, even a file made while the
    run went on: then the next free name is taken. Returns (bytes, path written)."""
    while True:
        try:
            return io.save_model(model, output, replace=named), output
        except io.OutputTaken:
            if named:
                raise
            output = io.free_path(default_output(model_path))


def _writable(folder: Path) -> bool:
    import os

    return os.access(folder, os.W_OK | os.X_OK)


def build_options(specs: list[PassSpec], raw: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Typed options per pass; options for a pass that is not in the run are an error."""
    names = [spec.name for spec in specs]
    stray = sorted(set(raw) - set(names))
    if stray:
        raise CompressError(
            f"options given for pass '{stray[0]}', which is not in --passes ({','.join(names)})"
        )
    return {spec.name: spec.make_options(raw.get(spec.name, {})) for spec in specs}


def compress(
    model_path: str | Path,
    options: CompressOptions,
    on_step: StepCallback | None = None,
    progress: Progress | None = None,
) -> CompressResult:
    """Run the whole flow on a model file and write the result; see `CompressOptions`.

    `on_step` hears the name of each step; `progress` (see `PassContext.progress`) shows
    long loops — passes' own, validation batches, the benchmark. Both default to silence.
    """
    from onnxcompress import benchmark, runtime, validate
    from onnxcompress.report.files import report_target

    started = time.perf_counter()
    step = on_step or (lambda _name: None)
    progress = progress or no_progress
    model_path = Path(model_path)
    specs = lookup_passes(options.passes)
    typed = build_options(specs, options.pass_options)
    executor.check_executor(options.executor, options.ray_address)  # before the long steps
    output = resolve_output_path(model_path, options.output)
    report_path = report_target(options.report) if options.report else None

    step("load")
    input_hash = io.file_sha256(model_path) if model_path.is_file() else None
    original = io.load_model(model_path)
    check_input_model(original, model_path)
    runnable = runnable_original(original, model_path)
    session = runtime.make_session(runnable, threads=options.threads)  # refuses opsets ORT lacks
    shapes = graph.resolve_input_shapes(original, options.input_shapes)

    step("analyse")
    calibration = validate.calibration_inputs(
        original,
        shapes,
        data=options.data,
        images=options.images,
        preprocess=options.preprocess,
        labels=options.labels,
        count=options.calibration_count,
        batch_size=options.batch_size,
        seed=options.seed,
        ranges=options.input_ranges,
    )
    timed_batch = calibration.batches[0]  # a whole batch: held-out rows may be a cut one
    validate.require_nan_free_outputs(original, session, calibration)
    del session  # it holds a copy of the weights
    before = analyse(original, shapes)
    fit, calibration = split_holdout(calibration, options.holdout)
    training = watched_training_set(
        original, shapes, options.train_data, options.preprocess, options.train_labels
    )
    user_data = None if fit.source.startswith("random") else ReadWatch(fit.batches)
    context = PassContext(
        input_shapes=shapes,
        calibration=user_data,
        seed=options.seed,
        threads=options.threads,
        progress=progress,
        labels=fit.labels if user_data is not None else None,
        jobs=options.jobs,
        executor=options.executor,
        ray_address=options.ray_address,
        outline=getattr(progress, "outline", no_outline),
        training=training,
    )

    coded: list = []
    model, pass_reports = run_passes(original, specs, typed, context, step, coded=coded)

    if runnable is not original:  # sessions read its file: its weights are not held twice
        original = context = None
    # A result too large for one protobuf is checked, validated and timed from a temp file.
    with contextlib.ExitStack() as files:
        step("check")
        result_runnable = checked_result(model, files)
        after = analyse(model, shapes)

        step("validate")
        with progress("validation batches", len(calibration.batches)) as task:
            counted = dataclasses.replace(calibration, batches=_CountedBatches(calibration, task))
            fidelity = validate.compare_models(
                runnable, result_runnable, counted, threads=options.threads
            )
        fidelity = validation_entry(fidelity, fit, calibration, bool(user_data and user_data.read))
        verdict = judge(fidelity)
        weight_only = [
            entry["name"] for spec, entry in zip(specs, pass_reports, strict=True)
            if spec.lossy and entry["changed"]
        ]  # fmt: skip
        warnings = [weight_only_warning(weight_only)] if weight_only and user_data is None else []
        if training is not None and not training.read:
            warnings.append(
                f"no pass of this run trains: --train-data ({training.description}) unread"
            )

        latency = None
        if options.bench:
            step("benchmark")
            # benchmark_models times rounds internally: a running clock, no count.
            with progress(f"benchmark, {options.bench_repeats} timed runs per model", None):
                latency = benchmark.benchmark_models(
                    {"original": runnable, "result": result_runnable},
                    timed_batch,
                    threads=options.threads,
                    repeats=options.bench_repeats,
                )
            latency["speedup"] = benchmark.speedup(latency, "original", "result")

        step("write")
        sizes = None
        if output.suffix.lower() == ".onnxc":
            written, sizes = write_onnxc(original, model, output, coded)
        else:
            written, output = save_result(model, output, model_path, options.output is not None)
    if input_hash is not None and io.file_sha256(model_path) != input_hash:
        raise CompressError(f"{model_path}: input file changed during the run (not by this tool?)")

    if options.max_rel_l2 is not None:  # the user's own tolerance decides alone
        passed = fidelity["validated"] and fidelity["worst_rel_l2"] <= options.max_rel_l2
    else:
        passed = verdict["kind"] != BROKEN
    report = {
        "input": str(model_path),
        "output": str(output),
        "input_bytes": io.stored_bytes(model_path),
        "output_bytes": written,
        "sizes": sizes,
        "input_shapes": shapes,
        "calibration": calibration.source,
        "calibration_for_passes": fit.source,
        "training_data": training.description if training is not None else None,
        "batch_axes": calibration.axes,  # input -> the axis its samples stack on (None: none)
        "passes": pass_reports,
        "before": before.to_dict(),
        "after": after.to_dict(),
        "validation": fidelity,
        "max_rel_l2": options.max_rel_l2,
        "passed": passed,
        "verdict": verdict,
        "warnings": warnings,
        "benchmark": latency,
        "resources": run_resources(started),
    }
    if report_path is not None:
        from onnxcompress.report.files import write_report

        write_report(report, report_path)
    return CompressResult(report=report, model=model, output=output, passed=passed)


class _CountedBatches(list):
    """The calibration batches, advancing a progress task as each one is handed out, so
    that validation (which loops over them once) shows how far it is."""

    def __init__(self, calibration, task) -> None:
        super().__init__(calibration.batches)
        self._task = task

    def __iter__(self):
        for batch in super().__iter__():
            yield batch
            self._task.advance()


def write_onnxc(
    original: onnx.ModelProto | None, model: onnx.ModelProto, output: Path, coded: list
) -> tuple[int, dict[str, Any]]:
    """Write the `.onnxc` file; return its bytes and the reference sizes of plain files:
    the original and the result as `.onnx`, each also under gzip -9 and zstd -19."""
    from onnxcompress.coding import onnxc_writer as onnxc_writer

    written = io.save_onnxc(model, output, coded)
    sizes: dict[str, Any] = {"onnxc_bytes": written}
    for label, which in (("original", original), ("result", model)):
        if which is not None and not large_models.too_large(which):
            sizes[label] = onnxc_writer.reference_sizes(which.SerializeToString())
    return written, sizes


def run_passes(
    model: onnx.ModelProto,
    specs: list[PassSpec],
    typed: dict[str, Any],
    context: PassContext,
    step: StepCallback,
    coded: list | None = None,
) -> tuple[onnx.ModelProto, list[dict[str, Any]]]:
    """Apply passes in order, with cleanup and a topological sort after each that changed.

    Passes see the model given here as `context.original` unless the context names one.
    Pre-coded weights that passes hand over (`artifacts["coded_weights"]`) are appended to
    `coded` when a list is given; the `.onnxc` writer checks they still match the model.
    """
    reports = []
    if context.original is None:  # a copy: the caller's context may serve other runs
        context = dataclasses.replace(context, original=model)
    for spec in specs:
        step(f"pass {spec.name}")
        started = time.perf_counter()
        before = fingerprint(model)
        result = spec.run(model, typed[spec.name], context)
        check_contract(spec.name, model, before, result)
        if coded is not None:
            coded.extend(result.artifacts.get("coded_weights", []))
        given = model
        if result.changed:
            model = graph.cleanup_and_sort(result.model)
        seconds = round(time.perf_counter() - started, 3)
        # Records name the nodes of the model given or of the result (int8's): roles of both.
        roles = layer_roles(model) | layer_roles(given)
        reports.append(
            {
                "name": spec.name,
                "options": dataclasses.asdict(typed[spec.name]),
                "changed": result.changed,
                "seconds": seconds,
                "summary": result.summary,
                "records": [_with_role(record.to_dict(), roles) for record in result.records],
            }
        )
    return model, reports


def _with_role(record: dict[str, Any], roles: dict[str, str]) -> dict[str, Any]:
    if record["node"] in roles:
        record["role"] = roles[record["node"]]
    return record


def runnable_original(model: onnx.ModelProto, path: Path) -> onnx.ModelProto | Path:
    """What sessions of the original are made from: its file when it is too large to hand to
    onnxruntime in memory (and is plain ONNX), else the model."""
    if large_models.too_large(model) and not io.is_onnxc(path):
        return path
    return model


def checked_result(model: onnx.ModelProto, files: contextlib.ExitStack) -> onnx.ModelProto | Path:
    """Check the result as every written model is checked; returns what its sessions are made
    from: the model, or a temp file (removed with `files`) when it is too large."""
    if not large_models.too_large(model):
        graph.check_model(model)
        return model
    path = files.enter_context(large_models.written(model))
    large_models.check_file(path)
    return path


def check_input_model(model: onnx.ModelProto, path: Path) -> None:
    """Reject models the ONNX checker rejects (the light check: real exporters pass it)."""
    try:
        onnx.checker.check_model(model if runnable_original(model, path) is model else str(path))
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CompressError(f"{path}: model fails the ONNX checker: {first[:200]}") from exc
    require_sized_tensors(model, path)
