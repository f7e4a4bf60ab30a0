"""benchmarks/same_latency.py: auto against each method at auto's measured latency, on a
made-up results entry (the figures are chosen so each case is known by hand)."""

import pytest

from benchmarks.results_md import model_table
from benchmarks.same_latency import comparisons


def _row(label, ratio, top1):
    method = label.split("@")[0]
    return {"label": label, "method": method, "latency_ratio": ratio, "score": {"top1": top1}}


def _entry(rows, higher_is_better=True):
    return {
        "name": "toy",
        "metric": "top1",
        "higher_is_better": higher_is_better,
        "latency_batches": [1],
        "notes": [],
        "rows": [_row("original", 1.0, 80.0), *rows],
    }


def _by_method(entry, auto="auto@0.5"):
    return {c["method"]: c for c in comparisons(entry) if c["auto"] == auto}


def test_drop_is_interpolated_between_the_bracketing_rows():
    # cp at 0.45 loses 6, at 0.65 loses 2: at auto's 0.55 the line gives 4.
    entry = _entry(
        [_row("cp@0.25", 0.45, 74.0), _row("cp@0.35", 0.65, 78.0), _row("auto@0.5", 0.55, 77.0)]
    )
    cp = _by_method(entry)["cp"]
    assert cp["drop_at_auto_latency"] == pytest.approx(4.0)
    assert cp["auto_drop"] == pytest.approx(3.0) and cp["rows"] == ["cp@0.25", "cp@0.35"]
    assert "| auto@0.5 | 0.550 | 3.00 | cp | 0.450–0.650 (cp@0.25, cp@0.35) | 4.00 | yes |" in (
        model_table_lines(entry)
    )


def test_a_row_beaten_at_both_by_another_is_left_out():
    # cp@0.2 is slower than cp@0.25 and loses more: cp's drop at 0.5 is on the line from
    # cp@0.25 (0.45, 6) to cp@0.35 (0.65, 2), not from cp@0.2 (0.48, 9).
    entry = _entry(
        [
            _row("cp@0.25", 0.45, 74.0),
            _row("cp@0.2", 0.48, 71.0),
            _row("cp@0.35", 0.65, 78.0),
            _row("auto@0.5", 0.50, 76.0),
        ]
    )
    cp = _by_method(entry)["cp"]
    assert cp["rows"] == ["cp@0.25", "cp@0.35"]
    assert cp["drop_at_auto_latency"] == pytest.approx(5.0)


def test_rows_that_do_not_reach_autos_latency_are_not_interpolated():
    entry = _entry(
        [
            _row("svd@0.25", 0.60, 60.0),  # slower than auto and loses more: auto better at both
            _row("svd@0.35", 0.65, 70.0),
            _row("int8", 0.50, 80.0),  # one row, faster than auto
            _row("channels@0.25", 0.58, 79.5),  # slower but loses less: no verdict
            _row("fga@0.25", 0.50, 70.0),  # faster but loses more: no verdict
            _row("auto@0.5", 0.55, 78.0),
        ]
    )
    found = _by_method(entry)
    assert all(c["drop_at_auto_latency"] is None for c in found.values())
    lines = model_table_lines(entry)
    assert "not reached (fastest row: 20.00 at 0.600) | yes, and faster |" in lines
    assert (
        "| int8 | 0.500 (int8) | its rows are all faster | no: int8 is faster, loses no more |"
        in (lines)
    )
    assert "not reached (fastest row: 0.50 at 0.580) |  |" in lines
    assert "| fga | 0.500 (fga@0.25) | its rows are all faster |  |" in lines


def test_lower_is_better_metrics_count_a_rise_as_the_drop():
    entry = _entry(
        [_row("cp@0.25", 0.4, 1.0), _row("cp@0.35", 0.6, 0.6), _row("auto@0.5", 0.5, 0.5)],
        higher_is_better=False,
    )
    entry["rows"][0]["score"]["top1"] = 0.2
    cp = _by_method(entry)["cp"]
    assert cp["drop_at_auto_latency"] == pytest.approx(0.6) and cp["auto_drop"] == pytest.approx(
        0.3
    )


def test_no_auto_row_no_section():
    entry = _entry([_row("cp@0.25", 0.45, 74.0)])
    assert comparisons(entry) == [] and "at auto's measured latency" not in model_table_lines(entry)


def model_table_lines(entry) -> str:
    return "\n".join(model_table(_rows_for_table(entry)))


def _rows_for_table(entry):
    """The table also prints sizes and timings: give every row neutral ones."""
    for row in entry["rows"]:
        row.update(macs_ratio=1.0, params=1, onnx_bytes=1, onnxc_bytes=None, size_ratio=1.0)
        row.update(seconds=0.0, latency={"1": {"median_ms": row["latency_ratio"], "speedup": 1.0}})
    return entry
