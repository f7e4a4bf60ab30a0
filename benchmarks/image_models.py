"""`BenchModel` builders for the shared image and audio models (`../shared/models`).

Labelled classifiers are scored by top-1 accuracy on real data: `mnist` (MNIST), `resnet20`
and `cifar10_cnn` (CIFAR-10), `squeezenet` (ImageNet validation subset, fp16 upcast to fp32).
The other shared models have no labelled data here and are scored by output fidelity against
the original (worst relative L2 over outputs, per-sample cosine of the first output): the image
models on the photos in `../shared/images` (split seeded into calibration and evaluation), the
audio models on a synthetic signal (no audio ships in ../shared; said in their notes).
Every builder takes the run's arguments (`eval_count`, `calib_count`, `seed`, `threads`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.suite import Batches, BenchModel  # noqa: E402
from onnxcompress import graph, io  # noqa: E402
from onnxcompress.runtime import make_session, run_session  # noqa: E402

SHARED = REPO.parent / "shared"
SHARED_MODELS = SHARED / "models"
PHOTOS = SHARED / "images"
LATENCY_BATCH = 8  # the second batch size timed, for models with a dynamic batch


def add_data_arguments(parser, calib_count: int, eval_count: int) -> None:
    """The run's arguments every builder here reads (threads, seed and the two image counts),
    with a script's default counts."""
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calib-count", type=int, default=calib_count)
    parser.add_argument("--eval-count", type=int, default=eval_count)
    parser.add_argument("--seed", type=int, default=0)


def _factorization():
    """benchmarks.factorization, imported on first use (it loads the data helpers we reuse)."""
    import benchmarks.factorization as factorization

    return factorization


# --- scoring ---------------------------------------------------------------------------------


def _runs(model: onnx.ModelProto, batches: Batches, threads: int) -> list[list[np.ndarray]]:
    """Every output of every batch (onnxruntime, optimisations on): one run per batch."""
    session = make_session(model, threads=threads, optimize=True)
    return [run_session(session, batch) for batch in batches]


def _joined(runs: list[list[np.ndarray]]) -> list[np.ndarray]:
    """Each output over all batches as one float64 array of the batches' outputs flattened
    and joined (the layout does not matter to norms)."""
    return [
        np.concatenate([np.asarray(run[i], np.float64).ravel() for run in runs])
        for i in range(len(runs[0]))
    ]


def _first_rows(runs: list[list[np.ndarray]]) -> np.ndarray:
    """The first output, one row per sample of each batch (float64)."""
    return np.concatenate([np.asarray(run[0], np.float64).reshape(len(run[0]), -1) for run in runs])


def rel_l2(result: np.ndarray, reference: np.ndarray) -> float:
    """‖result − reference‖ / ‖reference‖ (0 when both are zero)."""
    norm = np.linalg.norm(reference)
    diff = np.linalg.norm(result - reference)
    return float(diff / norm) if norm > 0 else float(diff > 0)


def row_cosines(result: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows (1 where both rows are zero)."""
    dot = np.sum(result * reference, axis=1)
    norms = np.linalg.norm(result, axis=1) * np.linalg.norm(reference, axis=1)
    return np.where(norms > 0, dot / np.where(norms > 0, norms, 1), 1.0)


def classifier_score(
    evaluation: Batches, labels: np.ndarray, reference: np.ndarray
) -> Callable[[onnx.ModelProto, int], dict[str, float]]:
    """score(model, threads): top-1 accuracy and agreement with the original (%), relative L2
    of the first output against `reference` (the original's rows on `evaluation`)."""

    def score(model: onnx.ModelProto, threads: int) -> dict[str, float]:
        rows = _factorization().predict(model, evaluation, threads)
        predicted = rows.argmax(1)
        return {
            "top1": 100 * float(np.mean(predicted == labels)),
            "agreement": 100 * float(np.mean(predicted == reference.argmax(1))),
            "rel_l2": rel_l2(rows, reference),
        }

    return score


def fidelity_score(
    original: onnx.ModelProto, evaluation: Batches, threads: int
) -> Callable[[onnx.ModelProto, int], dict[str, float]]:
    """score(model, threads): worst relative L2 over the outputs, and mean / min per-sample
    cosine of the first output, all against the original on `evaluation`."""
    original_runs = _runs(original, evaluation, threads)
    reference, reference_rows = _joined(original_runs), _first_rows(original_runs)

    def score(model: onnx.ModelProto, threads: int) -> dict[str, float]:
        runs = _runs(model, evaluation, threads)  # one pass over the data for every figure
        outputs = _joined(runs)
        cosines = row_cosines(_first_rows(runs), reference_rows)
        return {
            "rel_l2": max(rel_l2(o, r) for o, r in zip(outputs, reference, strict=True)),
            "cosine_mean": float(np.mean(cosines)),
            "cosine_min": float(np.min(cosines)),
        }

    return score


# --- latency inputs --------------------------------------------------------------------------


def has_dynamic_batch(model: onnx.ModelProto) -> bool:
    """Whether every runtime input has a symbolic leading dimension."""
    inputs = graph.runtime_inputs(model)
    return bool(inputs) and all(not isinstance(graph.dim_values(i)[0], int) for i in inputs)


def latency_inputs(
    model: onnx.ModelProto, samples: Batches, sizes: tuple[int, ...] = (LATENCY_BATCH,)
) -> dict[int, dict[str, np.ndarray]]:
    """Feeds at batch 1, and at each of `sizes` when the model's batch is dynamic and the
    samples have that many rows (inputs batched on axis 0)."""
    joined = {name: np.concatenate([b[name] for b in samples]) for name in samples[0]}
    feeds = {1: {name: value[:1] for name, value in joined.items()}}
    rows = min(len(value) for value in joined.values())
    for size in sizes:
        if has_dynamic_batch(model) and rows >= size:
            feeds[size] = {name: value[:size] for name, value in joined.items()}
    return feeds


# --- labelled classifiers --------------------------------------------------------------------


def _classifier(name: str, data, args, metric_note: str) -> BenchModel:
    reference = _factorization().predict(data.model, data.evaluation, args.threads)
    return BenchModel(
        name=name,
        model=data.model,
        input_shapes=graph.resolve_input_shapes(data.model),
        calibration=data.calibration,
        evaluation=data.evaluation,
        score=classifier_score(data.evaluation, data.labels, reference),
        metric="top1",
        latency_inputs=latency_inputs(data.model, data.evaluation),
        notes=[
            f"calibration: {data.calibration_note}",
            f"evaluation: {data.evaluation_note}",
            metric_note,
            *([f"training (distill): {data.training.description}"] if data.training else []),
        ],
        training=data.training,
    )


def resnet20(args) -> BenchModel:
    """ResNet-20 trained on CIFAR-10 (85.90 % on the full test set)."""
    data = _factorization().resnet20_data(args)
    return _classifier("resnet20", data, args, "top-1 on CIFAR-10 test images (JPEG q75 copy)")


def mnist(args) -> BenchModel:
    """The ONNX-zoo MNIST CNN (CNTK), 0..255 grayscale input, fixed batch 1."""
    data = _factorization().mnist_data(args)
    return _classifier("mnist", data, args, "top-1 on MNIST test images")


def squeezenet(args) -> BenchModel:
    """SqueezeNet 1.0 (fp16 file upcast to fp32) on the 1300-image ImageNet validation subset."""
    data = _factorization().squeezenet_data(args)
    model = _classifier("squeezenet", data, args, "top-1 on ImageNet val images (an easy subset)")
    model.notes.append("fp16 weights upcast to fp32 before compressing")
    return model


def cifar10_cnn(args) -> BenchModel:
    """The Windows ML PyTorch tutorial's CIFAR-10 CNN: RGB, (x/255 − 0.5)/0.5, NCHW."""
    factorization = _factorization()
    load = factorization._load_module()
    model = io.load_model(SHARED_MODELS / "cifar10_tutorial_cnn.onnx")
    (x_train, _), (x_test, y_test) = load.cifar10()

    def prepare(x: np.ndarray) -> np.ndarray:
        x = (x.astype(np.float32) / 255.0 - 0.5) / 0.5
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))

    rng = np.random.default_rng(args.seed)
    calib = factorization._subset(len(x_train), args.calib_count, rng)
    evaluate = factorization._subset(len(x_test), args.eval_count, rng)
    data = factorization.Dataset(
        model,
        factorization._batches("modelInput", prepare(x_train[calib]), 64),
        f"{len(calib)} random CIFAR-10 training images",
        factorization._batches("modelInput", prepare(x_test[evaluate]), 250),
        y_test[evaluate],
        f"{len(evaluate)} of the 10000 CIFAR-10 test images (seeded random subset)",
        factorization.training_split(
            args, "modelInput", x_train, prepare, factorization.CIFAR_TRAINING, calib
        ),
    )
    return _classifier("cifar10_cnn", data, args, "top-1 on CIFAR-10 test images (JPEG q75 copy)")


# --- models scored by fidelity ---------------------------------------------------------------


def photos(width: int, height: int, bgr: bool, scale: float, mean: float, std: float):
    """The photos of ../shared/images as float32 NCHW [N, 3, height, width]: resized (aspect
    not kept), channels swapped to BGR when asked, then (pixel·scale − mean) / std."""
    from PIL import Image

    paths = sorted(p for p in PHOTOS.iterdir() if p.suffix.lower() in (".jpg", ".png"))
    images = []
    for path in paths:
        image = Image.open(path).convert("RGB").resize((width, height), Image.BILINEAR)
        pixels = np.asarray(image, np.float32)
        images.append(pixels[:, :, ::-1] if bgr else pixels)
    x = (np.stack(images) * scale - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32), len(paths)


def _split(count: int, calib: int, evaluate: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded disjoint index sets: calibration from the first half, evaluation from the rest."""
    order = np.random.default_rng(seed).permutation(count)
    half = count // 2
    return np.sort(order[: min(half, calib)]), np.sort(order[half:][:evaluate])


def _batched(name: str, x: np.ndarray, size: int) -> Batches:
    return [{name: np.ascontiguousarray(x[i : i + size])} for i in range(0, len(x), size)]


def _photo_model(name, file, input_name, x, photo_count, args, limit=None, pins=None, **extra):
    model = io.load_model(SHARED_MODELS / file)
    calib_count = min(args.calib_count, limit or args.calib_count)
    eval_count = min(args.eval_count, limit or args.eval_count)
    calib, evaluate = _split(len(x), calib_count, eval_count, args.seed)
    size = 4 if has_dynamic_batch(model) else 1
    evaluation = _batched(input_name, x[evaluate], size)
    return BenchModel(
        name=name,
        model=model,
        input_shapes=graph.resolve_input_shapes(model, pins),
        calibration=_batched(input_name, x[calib], size),
        evaluation=evaluation,
        score=fidelity_score(model, evaluation, args.threads),
        metric="rel_l2",
        higher_is_better=False,
        latency_inputs=latency_inputs(model, evaluation),
        notes=[
            f"no labelled data: fidelity to the original on {len(evaluate)} of the "
            f"{photo_count} photos in ../shared/images ({len(calib)} others calibrate)",
        ],
        **extra,
    )


def ultraface(args) -> BenchModel:
    """Ultra-Light face detector RFB-320: RGB 320×240, (x − 127)/128; scores and boxes."""
    x, count = photos(320, 240, bgr=False, scale=1.0, mean=127.0, std=128.0)
    return _photo_model("ultraface", "ultraface_rfb_320.onnx", "input", x, count, args)


def ppocr_cls(args) -> BenchModel:
    """PaddleOCR text-direction classifier at 3×48×192, BGR, (x/255 − 0.5)/0.5."""
    x, count = photos(192, 48, bgr=True, scale=1 / 255, mean=0.5, std=0.5)
    model = _photo_model(
        "ppocr_cls", "ppocr_mobile_v2.0_cls.onnx", "x", x, count, args, pins={"x": [1, 3, 48, 192]}
    )
    model.notes.append("inputs are photos, not text lines: a fidelity check only")
    return model


def candy(args) -> BenchModel:
    """Fast neural style transfer "candy" at 720×720 (RGB 0..255): 20 G MACs, so only two
    photos calibrate and two evaluate, and latency is timed at batch 1 with few repeats."""
    x, count = photos(720, 720, bgr=False, scale=1.0, mean=0.0, std=1.0)
    return _photo_model(
        "candy", "fns_candy.onnx", "inputImage", x, count, args, limit=2, max_repeats=5
    )


def synthetic_audio(samples: int, seed: int, rate: int = 16000) -> np.ndarray:
    """A seeded test signal in −1..1: a few tones with slow amplitude changes over noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / rate
    signal = 0.02 * rng.standard_normal(samples)
    for freq in rng.uniform(120, 3000, 4):
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t + rng.uniform(0, 6))
        signal += 0.15 * envelope * np.sin(2 * np.pi * freq * t)
    return np.clip(signal, -1, 1).astype(np.float32)


def _stateful_batches(model, frames, feed, state_out, threads) -> Batches:
    """One batch per frame, each carrying the state the original model reached on the frames
    before it (so every variant is scored from the same, realistic states)."""
    session = make_session(model, threads=threads, optimize=True)
    names = [out.name for out in session.get_outputs()]
    batches, state = [], None
    for frame in frames:
        batch = feed(frame, state)
        batches.append(batch)
        state = dict(zip(names, run_session(session, batch), strict=True))[state_out]
    return batches


def _audio_model(name, file, feed, state_out, frames_of, args, pins=None) -> BenchModel:
    model = io.load_model(SHARED_MODELS / file)
    calib = _stateful_batches(
        model, frames_of(args.seed)[: args.calib_count], feed, state_out, args.threads
    )
    evaluation = _stateful_batches(
        model, frames_of(args.seed + 1)[: args.eval_count], feed, state_out, args.threads
    )
    return BenchModel(
        name=name,
        model=model,
        input_shapes=graph.resolve_input_shapes(model, pins),
        calibration=calib,
        evaluation=evaluation,
        score=fidelity_score(model, evaluation, args.threads),
        metric="rel_l2",
        higher_is_better=False,
        latency_inputs={1: evaluation[len(evaluation) // 2]},
        notes=[
            f"no audio data in ../shared: fidelity to the original on {len(evaluation)} "
            f"frames of a seeded synthetic signal (tones + noise; {len(calib)} frames of "
            "another calibrate), states carried from the original model frame by frame",
        ],
    )


def silero(args) -> BenchModel:
    """Silero VAD (16 kHz): 512-sample frames, state [2, 1, 128], sr = 16000."""

    def frames(seed: int) -> np.ndarray:
        return synthetic_audio(512 * 128, seed).reshape(-1, 512)

    def feed(frame: np.ndarray, state) -> dict[str, np.ndarray]:
        state = np.zeros((2, 1, 128), np.float32) if state is None else state
        return {"input": frame[None], "state": state, "sr": np.array(16000, np.int64)}

    return _audio_model(
        "silero", "silero_vad_16k_op15.onnx", feed, "stateN", frames, args,
        pins={"input": [1, 512]},
    )  # fmt: skip


def dtln(args) -> BenchModel:
    """DTLN stage 1: magnitude of a 512-point FFT per frame (hop 128), LSTM states [1,2,128,2]."""

    def frames(seed: int) -> np.ndarray:
        audio = synthetic_audio(128 * 130 + 512, seed)
        window = np.hanning(512).astype(np.float32)
        starts = range(0, len(audio) - 512 + 1, 128)
        return np.stack([np.abs(np.fft.rfft(audio[s : s + 512] * window)) for s in starts])

    def feed(magnitude: np.ndarray, state) -> dict[str, np.ndarray]:
        state = np.zeros((1, 2, 128, 2), np.float32) if state is None else state
        return {"input_2": magnitude.astype(np.float32)[None, None], "input_3": state}

    return _audio_model("dtln", "dtln_model_1.onnx", feed, "tf_op_layer_stack_2", frames, args)


BUILDERS: dict[str, Callable[..., BenchModel]] = {
    "mnist": mnist,
    "resnet20": resnet20,
    "cifar10_cnn": cifar10_cnn,
    "squeezenet": squeezenet,
    "ultraface": ultraface,
    "ppocr_cls": ppocr_cls,
    "candy": candy,
    "silero": silero,
    "dtln": dtln,
}
