"""benchmarks/text_models.py: the MiniLM benchmark model, its sentences and its score."""

from __future__ import annotations

import platform
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from benchmarks import make_sentences
from benchmarks.text_models import (
    BATCH_SIZE,
    GENERAL_SENTENCES,
    SENTENCES,
    SEQ_LEN,
    load_sentences,
    split_sentences,
)
from tests.conftest import REPO, needs_minilm


def test_sentence_file_loads():
    header = SENTENCES.read_text().splitlines()[0]
    assert header.startswith("# Sentences from CPython") and "make_sentences.py" in header
    sentences = load_sentences()
    assert 600 <= len(sentences) <= 1000
    assert len(set(sentences)) == len(sentences)
    for sentence in sentences:
        assert make_sentences.is_prose(sentence), sentence
    assert len(load_sentences(GENERAL_SENTENCES)) == 42


def test_prose_filter_rejects_code():
    assert make_sentences.is_prose("Return the number of items in the queue right now.")
    for text in (
        "Call os.path.join to build the path of the new file.",  # dotted identifier
        "Set the value of max_size before you open the file.",  # underscore
        "Returns True when the queue is empty and closed.",  # literal
        "Too short to keep.",
        "The call f() returns the value of the field here.",
    ):
        assert not make_sentences.is_prose(text), text


def test_sentence_file_is_what_the_script_extracts():
    version = SENTENCES.read_text().splitlines()[0].split()[4]
    if version != platform.python_version():
        pytest.skip(f"the file was extracted with CPython {version}, docstrings may differ")
    # In a fresh interpreter, as the script runs: what the docstrings read depends on what
    # else the process imported (torch, loaded by tests/train, replaces inspect.getfile).
    code = "from benchmarks import make_sentences as m; print(*m.extract_sentences(), sep='\\n')"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True
    )
    assert done.stdout.splitlines() == load_sentences()


def test_split_is_disjoint_and_seeded():
    sentences = load_sentences()
    calibration, evaluation = split_sentences(sentences, seed=0, calibration=400)
    assert len(calibration) == 400 and len(evaluation) == len(sentences) - 400
    assert not set(calibration) & set(evaluation)
    assert split_sentences(sentences, 0, 400) == (calibration, evaluation)
    assert split_sentences(sentences, 1, 400)[0] != calibration
    short = split_sentences(sentences, 0, 400, evaluation=50)
    assert short[0] == calibration and short[1] == evaluation[:50]
    with pytest.raises(ValueError):
        split_sentences(sentences, 0, len(sentences))


@needs_minilm
def test_minilm_bench_model_is_consistent():
    from benchmarks.text_models import minilm

    args = SimpleNamespace(seed=3, calib_count=2 * BATCH_SIZE, eval_count=20, threads=1)
    bench = minilm(args)
    assert bench.name == "minilm" and bench.metric == "cosine_mean" and bench.higher_is_better
    assert bench.input_shapes == {"input_ids": [1, SEQ_LEN], "attention_mask": [1, SEQ_LEN]}
    assert len(bench.calibration) == 2
    for batch in bench.calibration:
        assert set(batch) == {"input_ids", "attention_mask"}
        assert batch["input_ids"].shape == batch["attention_mask"].shape
        assert len(batch["input_ids"]) == BATCH_SIZE and batch["input_ids"].shape[1] <= SEQ_LEN
        assert batch["input_ids"].dtype == np.int64
        # Padded to the batch's longest: real tokens first, then padding; the longest row full.
        mask = batch["attention_mask"]
        assert mask[:, 0].all() and mask[:, -1].any() and not mask[:, -1].all()
        assert (np.diff(mask, axis=1) <= 0).all()
    assert sum(len(b["input_ids"]) for b in bench.evaluation) == 20
    assert sorted(bench.latency_inputs) == [1, 8]
    for size, feeds in bench.latency_inputs.items():
        assert feeds["input_ids"].shape == (size, SEQ_LEN) == feeds["attention_mask"].shape
    scores = bench.score(bench.model, 1)
    assert set(scores) == {"cosine_mean", "cosine_min", "cosine_mean_general"}
    for key, value in scores.items():
        assert abs(value - 1.0) < 1e-6, key
    assert bench.notes
