"""benchmarks/headline.py: each method at its best setting, the per-model commands are valid
suite command lines, and the table is written and printed by `run.py --headline`."""

import pytest

from benchmarks import headline, run


def _row(method, budget, latency, score, **extra):
    figures = {"macs_ratio": 0.5, "size_ratio": 0.5, "latency_ratio": latency}
    timing = {"1": {"median_ms": latency, "speedup": 1 / latency}}
    return {
        "method": method, "label": f"{method}@{budget}", "budget": budget,
        "score": {"top1": score}, "latency": timing, **figures, **extra,
    }  # fmt: skip


def _entry(rows):
    original = _row("original", None, 1.0, 80.0)
    return {
        "name": "resnet20",
        "metric": "top1",
        "higher_is_better": True,
        "rows": [original, *rows],
    }


def test_best_setting_is_the_fastest_within_the_tolerance_else_the_least_loss():
    entry = _entry([
        _row("svd", 0.7, 0.8, 79.5),  # within 1 point
        _row("svd", 0.5, 0.6, 79.2),  # within, faster: the one
        _row("svd", 0.35, 0.4, 70.0),  # faster, loses too much
        _row("cp", 0.7, 0.9, 77.0),  # none within: the least loss
        _row("cp", 0.5, 0.7, 74.0),
        _row("channels", 0.5, 0.1, 80.0, error="CompressError: no"),  # error rows never win
    ])  # fmt: skip
    best = headline.best_rows(entry)
    assert [(r["method"], r["budget"]) for r in best] == [
        ("original", None), ("svd", 0.5), ("cp", 0.7),
    ]  # fmt: skip
    text = headline.table([entry], "python benchmarks/run.py --headline", ["cmd"])
    assert "| `svd` @0.5 MACs | 0.500 | 0.500 | 0.600 (1.67×) | 79.20 (−0.80) |" in text
    assert "resnet20 channels@0.5: CompressError: no" in text


@pytest.mark.parametrize("name", list(headline.HEADLINE))
def test_every_headline_command_is_a_valid_suite_command(name, tmp_path):
    argv = headline.model_argv(name, ["--threads", "1", "--repeats", "2"], tmp_path)
    args = run.parse_args(argv)  # checks methods and every --opt against the passes
    assert args.models == [name] and args.out == tmp_path / name and args.no_plots


def test_run_headline_writes_and_prints_the_table(monkeypatch, tmp_path, capsys):
    ran = []

    def fake_suite(args, builders):
        ran.append(args.models)
        rows = [_row("int8", None, 0.6, 79.9)]
        return {"models": [{**_entry(rows), "name": args.models[0]}], "skipped": []}

    monkeypatch.setattr(run, "run_suite", fake_suite)
    assert run.main(["--headline", "--models", "resnet20,squeezenet", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert ran == [["resnet20"], ["squeezenet"]]
    assert printed == (tmp_path / "headline.md").read_text()
    assert "--models squeezenet" in printed and "| `int8` |" in printed
    with pytest.raises(SystemExit):
        run.main(["--headline", "--models", "nosuch"])
