"""benchmarks/auto_check_gap.py: the benchmark's timing of auto's kept plan against auto's own
check, on hand-made results."""

import json

import pytest

from benchmarks import auto_check_gap


def _row(method, label, kept_ratio, bench_ratio, kind="latency"):
    rounds = [
        # re-timed 0.1 slower; windows range 0.2 about a median of 0.8
        {"latency_ratio": 0.9, "latency_ratio_search": 0.8, "latency_windows": [0.7, 0.8, 0.9]},
        {"latency_ratio": kept_ratio, "latency_ratio_search": kept_ratio - 0.01},
        {"latency_ratio": 0.7},  # timed once: no drift to count
    ]
    auto = {"budget": {"kind": kind, "target": 0.5}, "rounds": rounds, "chosen_round": 1}
    return {
        "method": method,
        "label": label,
        "latency_ratio": bench_ratio,
        "summary": {"auto": auto},
    }


RESULTS = {
    "models": [
        {
            "name": "resnet20",
            "rows": [
                {"method": "original", "label": "original", "latency_ratio": 1.0},
                {"method": "cp", "label": "cp@0.25", "latency_ratio": 0.55},
                _row("auto", "auto@0.5", 0.50, 0.53),
                _row("auto_int8", "auto_int8@0.5", 0.49, 0.46),
                _row("auto+int8", "auto+int8@0.5", 0.50, 0.75),  # checked before int8: out
                _row("auto", "auto@0.3", 0.30, 0.31, kind="macs"),  # no latency target: out
            ],
        }
    ]
}


def test_gaps_of_the_kept_rounds_only():
    entries = auto_check_gap.gaps(RESULTS, "run")
    assert [e["label"] for e in entries] == ["auto@0.5", "auto_int8@0.5"]
    assert [e["gap"] for e in entries] == pytest.approx([0.03, -0.03])
    assert entries[0]["search"] == pytest.approx(0.49)
    assert entries[0]["retimed"] == 2 and entries[0]["drift"] == pytest.approx(0.055)
    assert entries[0]["spread"] == pytest.approx(0.25)  # the one round with windows
    stats = auto_check_gap.summary(entries)
    assert stats["count"] == 2 and stats["mean"] == pytest.approx(0.0, abs=1e-12)
    assert stats["std"] == pytest.approx(0.03)
    assert auto_check_gap.summary([]) == {"count": 0}


def test_command_prints_the_table_and_refuses_a_bad_file(tmp_path, capsys):
    good = tmp_path / "runs" / "threads2"
    good.mkdir(parents=True)
    (good / "results.json").write_text(json.dumps(RESULTS))
    assert auto_check_gap.main([str(good / "results.json")]) == 0
    out = capsys.readouterr().out
    assert (
        "| runs/threads2 | resnet20 | auto@0.5 | 0.500 | 0.490 | 0.530 | +0.030 | +0.055 over 2 "
        "| 0.250 |"
    ) in out
    assert "2 rows: gap mean +0.000" in out
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as exit_:
        auto_check_gap.main([str(bad)])
    assert exit_.value.code == 2
    assert "bad.json" in capsys.readouterr().err
