"""Prune, retrain, prune again (`retrain_steps` of rdprune and prune): the sparsity asked is
kept, zeros stay zero, rdprune's weights are still its payload bit for bit, retraining lowers
the error on held-out inputs, a seed repeats a run exactly, refusals are one line."""

from __future__ import annotations

import sys

import numpy as np
import pytest
from onnxcompress.passes import get_pass

from models.fixtures import mlp
from onnxcompress.coding import surp as surp
from onnxcompress.errors import CompressError
from onnxcompress.train.prune_rounds import round_sparsities
from tests.passes.mlp_training import held_out_error, training_context, weights

RDPRUNE, PRUNE = get_pass("rdprune"), get_pass("prune")
RETRAIN = {"sparsity": 0.7, "retrain_steps": 100, "rounds": 2}
MAGNITUDE = {"keep": "none", "quantize_bits": 6}


def _run(spec, options: dict, teacher, calibration=None):
    context = training_context(teacher, calibration)
    if spec is RDPRUNE:
        options = {"compare": False, **options}
    return spec.run(teacher, spec.make_options(options), context)


@pytest.fixture(scope="module")
def runs():
    """rdprune and prune at 0.7, each once retrained and once not, on the mlp fixture."""
    teacher = mlp()
    once = {"sparsity": RETRAIN["sparsity"]}
    return teacher, {
        "rdprune": (_run(RDPRUNE, RETRAIN, teacher), _run(RDPRUNE, once, teacher)),
        "prune": (
            _run(PRUNE, RETRAIN | MAGNITUDE, teacher),
            _run(PRUNE, once | MAGNITUDE, teacher),
        ),
    }


def test_each_round_prunes_the_same_share_of_what_is_left():
    steps = round_sparsities(0.9, 3)
    assert steps[-1] == 0.9 and len(steps) == 3
    left = [1.0] + [1 - s for s in steps]
    shares = [after / before for before, after in zip(left, left[1:], strict=False)]
    assert np.allclose(shares, shares[0])
    assert round_sparsities(0.5, 1) == [0.5]


@pytest.mark.parametrize("name", ["rdprune", "prune"])
def test_retraining_keeps_the_sparsity_and_lowers_the_held_out_error(runs, name):
    teacher, found = runs
    retrained, once = found[name]
    rounds = retrained.summary["retraining"]["rounds"]
    assert [r["sparsity_asked"] for r in rounds] == pytest.approx(round_sparsities(0.7, 2))
    assert all(r["held_out_loss_after"] < r["held_out_loss_before"] for r in rounds)
    assert retrained.summary["retraining"]["steps"] == 2 * RETRAIN["retrain_steps"]
    # The first round (the pass untrained at its sparsity) zeroed weights that stay zero.
    spec = RDPRUNE if name == "rdprune" else PRUNE
    extra = MAGNITUDE if name == "prune" else {}
    first = weights(_run(spec, {"sparsity": rounds[0]["sparsity_asked"]} | extra, teacher).model)
    final = weights(retrained.model)
    pruned = [n for n in final if n.endswith("weight")]
    assert all(np.all(final[n][first[n] == 0] == 0) for n in pruned)
    size = sum(final[n].size for n in pruned)
    assert sum(int(np.sum(final[n] == 0)) for n in pruned) / size == pytest.approx(0.7, abs=0.01)
    # Each round's training held every zero that round's pruning made.
    assert all(r["held_zeros"] >= round(r["sparsity"] * size) for r in rounds)
    assert held_out_error(retrained.model, teacher) < 0.9 * held_out_error(once.model, teacher)


def test_rdprune_weights_are_its_payload_after_retraining(runs):
    retrained, _ = runs[1]["rdprune"]
    (block,) = retrained.artifacts["coded_weights"]
    decoded, stored = surp.decode_payload(block.payload), weights(retrained.model)
    assert all(np.array_equal(decoded[n], stored[n]) for n in decoded)


def test_prune_quantises_after_the_last_round(runs):
    retrained, _ = runs[1]["prune"]
    for name, value in weights(retrained.model).items():
        if name.endswith("weight"):
            assert np.unique(value[value != 0]).size <= 2 ** MAGNITUDE["quantize_bits"]


@pytest.mark.parametrize("spec", [RDPRUNE, PRUNE], ids=["rdprune", "prune"])
def test_same_seed_same_weights(spec):
    teacher = mlp()
    options = {**RETRAIN, "retrain_steps": 5}
    first, second = (_run(spec, options, teacher) for _ in range(2))
    a, b = weights(first.model), weights(second.model)
    assert all(np.array_equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("spec", [RDPRUNE, PRUNE], ids=["rdprune", "prune"])
def test_refuses_without_data(spec):
    name = "rdprune" if spec is RDPRUNE else "prune"
    with pytest.raises(CompressError, match=f"{name}.retrain_steps: needs calibration data") as e:
        _run(spec, RETRAIN, mlp(), calibration=[])
    assert "\n" not in str(e.value)


def test_refuses_without_torch(monkeypatch):
    import onnxcompress.train as train

    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
    for name in ("onnxcompress.train.torch_distill", "onnxcompress.train.torch_graph"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.delattr(train, "torch_distill", raising=False)
    with pytest.raises(CompressError, match=r"pip install 'onnxcompress\[train\]'") as caught:
        _run(RDPRUNE, RETRAIN, mlp())
    assert "\n" not in str(caught.value) and "rdprune.retrain_steps" in str(caught.value)


@pytest.mark.parametrize(
    ("spec", "raw", "words"),
    [
        (RDPRUNE, {"retrain_steps": -1}, "retrain_steps"),
        (RDPRUNE, {"retrain_steps": 10, "rounds": 0}, "rounds"),
        (PRUNE, {"retrain_steps": -5}, "retrain_steps"),
        (PRUNE, {"retrain_steps": 10, "pattern": "2:4"}, "not a pattern"),
    ],
)
def test_bad_options_are_refused(spec, raw, words):
    with pytest.raises(CompressError, match=words):
        spec.make_options(raw)
