"""The fit cache: a CP fit is computed once per weight and settings, read back (from disk in a
new process, without pickle) equal to the computed one, and never fails a run."""

from __future__ import annotations

import numpy as np
import pytest
from onnxcompress.passes import get_pass

from models.fixtures import vgg_style
from onnxcompress.auto import fit_cache as fit_cache
from onnxcompress.maths import factors as factorize
from onnxcompress.passkit import PassContext
from onnxcompress.runtime import run_model
from onnxcompress.validate import random_inputs

SHAPES = {"input": [1, 3, 32, 32]}


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXCOMPRESS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fit_cache, "_memory", {})
    return tmp_path


def _counting_fit(calls: list, value: float):
    def fit():
        calls.append(value)
        return {"factor": np.full((2, 3), value, np.float32), "converged": np.bool_(True)}

    return fit


def test_a_fit_is_computed_once_then_read_from_disk_in_a_new_process(fresh_cache, monkeypatch):
    weight, calls = np.arange(6, dtype=np.float32).reshape(2, 3), []
    first = fit_cache.cached_fit("cp", weight, {"rank": 2}, _counting_fit(calls, 1.0))
    monkeypatch.setattr(fit_cache, "_memory", {})  # as a new process: only the disk is left
    again = fit_cache.cached_fit("cp", weight, {"rank": 2}, _counting_fit(calls, 2.0))
    assert calls == [1.0]
    np.testing.assert_array_equal(again["factor"], first["factor"])
    assert again["factor"].dtype == np.float32 and bool(again["converged"]) is True
    assert list((fresh_cache / "fits").glob("*.npz"))
    again["factor"][:] = 9  # a caller writing to its copy leaves the cache as it was
    third = fit_cache.cached_fit("cp", weight, {"rank": 2}, _counting_fit(calls, 3.0))
    assert third["factor"].max() == 1.0 and calls == [1.0]


def test_other_settings_weights_or_kinds_are_fitted_anew(fresh_cache):
    weight, calls = np.ones((2, 3), np.float32), []
    fit_cache.cached_fit("cp", weight, {"rank": 2}, _counting_fit(calls, 1.0))
    fit_cache.cached_fit("cp", weight, {"rank": 3}, _counting_fit(calls, 2.0))
    fit_cache.cached_fit("cp", weight * 2, {"rank": 2}, _counting_fit(calls, 3.0))
    fit_cache.cached_fit("cp", weight.astype(np.float64), {"rank": 2}, _counting_fit(calls, 4.0))
    fit_cache.cached_fit("tucker2", weight, {"rank": 2}, _counting_fit(calls, 5.0))
    assert calls == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_an_unusable_store_or_a_damaged_entry_only_costs_the_fit(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ONNXCOMPRESS_CACHE_DIR", str(blocker))
    monkeypatch.setattr(fit_cache, "_memory", {})
    calls, weight = [], np.ones((2, 3), np.float32)
    assert fit_cache.cached_fit("cp", weight, {}, _counting_fit(calls, 1.0))["factor"].sum() == 6
    monkeypatch.setenv("ONNXCOMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fit_cache, "_memory", {})
    path = tmp_path / "cache" / "fits" / f"{fit_cache.fit_key('cp', weight, {})}.npz"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"truncated")
    assert fit_cache.cached_fit("cp", weight, {}, _counting_fit(calls, 2.0))["factor"].sum() == 12
    assert calls == [1.0, 2.0]


def test_cp_reads_its_fits_back_and_builds_the_same_model(fresh_cache, monkeypatch):
    spec, model = get_pass("cp"), vgg_style()
    options = spec.make_options({"target_macs": 0.6, "never_slower": False})
    context = PassContext(SHAPES, seed=0, threads=1)
    fitted = []
    real_fit = factorize.cp_factors
    monkeypatch.setattr(
        factorize, "cp_factors", lambda *a, **k: fitted.append(1) or real_fit(*a, **k)
    )
    first = spec.run(model, options, context).model
    assert fitted, "the first run fits"
    fitted.clear()
    monkeypatch.setattr(fit_cache, "_memory", {})
    second = spec.run(model, options, context).model
    assert fitted == []
    feeds = random_inputs(model, SHAPES, count=1, seed=0)
    want, got = run_model(first, feeds), run_model(second, feeds)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
