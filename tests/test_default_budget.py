"""Default budgets: without calibration data a compressing pass takes its weight-only default
(measured: docs/decisions.md#weight-only-default-budgets) and says so, or refuses when it has
none; with data it takes the usual default; a budget the user gives always wins."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnxcompress.passes import get_pass

from onnxcompress import graph
from onnxcompress.cli import main
from onnxcompress.errors import CompressError
from onnxcompress.pass_help import pass_details
from onnxcompress.passkit import PassContext
from tests.conftest import REPO

FIXTURE = REPO / "models" / "vgg_style.onnx"
# The measured weight-only defaults, pinned here so that changing one is a decision, not a slip.
WEIGHT_ONLY = {"svd": 0.9, "fga": 0.95, "tucker2": 0.95, "cp": 0.8, "lrs": 0.95}
# Deterministic runs: no layer put back on a timing, no output probes.
QUIET = {"never_slower": False}


def _model() -> onnx.ModelProto:
    return onnx.load(FIXTURE)


def _calibration(model: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
    shapes = graph.resolve_input_shapes(model, {})
    rng = np.random.default_rng(0)
    return [
        {name: rng.standard_normal([2, *shape[1:]]).astype(np.float32)}
        for name, shape in shapes.items()
        for _ in range(3)
    ]


def _run(name: str, options: dict, data: bool):
    model, spec = _model(), get_pass(name)
    context = PassContext(
        graph.resolve_input_shapes(model, {}), calibration=_calibration(model) if data else None
    )
    return spec.run(model, spec.make_options(options), context)


@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_without_data_a_factorization_pass_takes_its_weight_only_default_and_says_so(name):
    summary = _run(name, QUIET, data=False).summary
    target = WEIGHT_ONLY[name]
    assert summary["target_macs"] == target
    assert summary["planned_macs_ratio"] <= target + 1e-9
    (note,) = summary["notes"]
    assert note.startswith(f"no calibration data: default target_macs {target:g}, the budget ")
    assert "weight-only fits survive on the shared models" in note
    assert "give --data for 0.5" in note


@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_with_data_a_factorization_pass_takes_half_the_macs(name):
    summary = _run(name, QUIET, data=True).summary
    assert summary["target_macs"] == 0.5
    (note,) = summary["notes"]
    assert note.startswith("default target_macs 0.5 (calibration data given; without it")


@pytest.mark.parametrize("name", ["svd", "tucker2"])
@pytest.mark.parametrize("data", [False, True])
def test_a_target_the_user_gives_wins_with_or_without_data(name, data):
    summary = _run(name, {**QUIET, "target_macs": 0.7}, data).summary
    assert summary["target_macs"] == 0.7
    assert "notes" not in summary  # no default was used


def test_without_data_channels_has_no_default_and_refuses():
    with pytest.raises(CompressError) as refused:
        _run("channels", {}, data=False)
    text = str(refused.value)
    assert text.startswith("channels: no default ratio without calibration data")
    assert "--opt channels.ratio=X" in text and "--data" in text
    assert "notes" not in _run("channels", {"target_macs": 0.7}, data=False).summary


def test_channels_takes_its_ratio_with_data_and_a_given_one_without():
    with_data = _run("channels", {}, data=True).summary
    assert with_data["budget"] == "ratio 0.3 in every group"
    assert with_data["notes"][0].startswith("default ratio 0.3 (calibration data given")
    given = _run("channels", {"ratio": 0.5}, data=False).summary
    assert given["budget"] == "ratio 0.5 in every group" and "notes" not in given


@pytest.mark.parametrize(
    "options, data, sparsity, default",
    [
        ({}, False, 0.2, True),
        ({}, True, 0.5, True),
        ({"sparsity": 0.4}, False, 0.4, False),
        ({"sparsity": 0.4}, True, 0.4, False),
    ],
)
def test_prune_sparsity_default_by_data_and_a_given_one_wins(options, data, sparsity, default):
    summary = _run("prune", options, data).summary
    assert summary["sparsity"] == pytest.approx(sparsity, abs=0.01)
    said = [n for n in summary["notes"] if "default sparsity" in n]
    assert bool(said) == default
    if default and not data:
        assert said[0].startswith("no calibration data: default sparsity 0.2")


@pytest.mark.parametrize(
    "name, option, text",
    [
        ("svd", "target_macs", "default 0.5 with calibration data, 0.9 without"),
        ("cp", "target_macs", "default 0.5 with calibration data, 0.8 without"),
        ("tucker2", "target_macs", "default 0.5 with calibration data, 0.95 without"),
        ("channels", "ratio", "default 0.3 with calibration data, none without: give one"),
        ("prune", "sparsity", "default 0.5 with calibration data, 0.2 without"),
    ],
)
def test_list_passes_states_both_defaults(name, option, text):
    line = next(x for x in pass_details(name) if x.strip().startswith(f"{option} (default none)"))
    assert text in line


def test_cli_without_data_says_which_default_it_took(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    main([str(FIXTURE), "--passes", "svd", "--no-bench", "-o", str(out)])  # untrained: exit 1
    assert out.exists()
    printed = capsys.readouterr()
    assert "note: no calibration data: default target_macs 0.9" in printed.out
    assert "warning: no calibration data: svd changed the weights" in printed.err
