"""--report DIR: report.json, report.md and a self-contained report.html with plots; --report
x.json stays one file."""

import json
import re
import sys
from html import escape

import pytest

from onnxcompress.cli import main
from onnxcompress.errors import CompressError
from onnxcompress.report.files import report_target, write_report
from onnxcompress.report.html import render_html
from onnxcompress.report.markdown import render_markdown
from onnxcompress.report.plots import INSTALL_HINT, PLOT_REQUIREMENT, damage_cost_curve
from onnxcompress.verdict import judge
from tests.conftest import REPO

FIXTURE = REPO / "models" / "resnet_style.onnx"
EVIL = "<script>alert(1)</script>"
DATA_URI = 'src="data:image/png;base64,'


def _record(node, status, macs=(1000, 400), timing=None, reason=""):
    record = {"node": node, "op": "Conv", "status": status, "macs_before": macs[0]}
    if status != "skipped":
        record["macs_after"] = macs[1]
        record["details"] = {"form": "spatial", "rank": 8}
        if timing:
            record["details"]["timing"] = timing
    if status == "rewritten":
        record.update(params_before=900, params_after=300)
    if reason:
        record["reason"] = reason
    return record


def _auto():
    return {
        "budget": {"kind": "latency", "target": 0.6},
        "layers": [
            {
                "node": "conv_a",
                "op": "Conv",
                "method": "svd",
                "config": {"rank": 8},
                "macs_before": 1000,
                "macs_after": 400,
                "params_before": 900,
                "params_after": 300,
                "latency_ms_before": 0.5,
                "latency_ms_after": 0.25,
                "damage": 0.012,
            }
        ],
        "candidates": [
            {"node": "conv_a", "method": "svd", "config": {"rank": r}, "latency_ms": 0.1 * r}
            | {"macs": 50 * r, "damage": 1 / r}
            for r in (4, 8, 16)
        ],
        "curve": [
            {"cost_ratio": 0.3, "damage": 0.2, "chosen": False},
            {"cost_ratio": 0.6, "damage": 0.05, "chosen": True},
            {"cost_ratio": 0.9, "damage": 0.01, "chosen": False},
        ],
        "backed_off": ["conv_b"],
        "rounds": [
            {"budget": 0.5, "latency_ratio": 0.45, "latency_ratio_search": 0.41, "rel_l2": 0.9},
            {"budget": None, "int8": True, "of": "the original", "latency_ratio": 0.62}
            | {"rel_l2": 0.02, "accuracy_drop": 0.5},
            {"budget": 0.7, "int8": True, "costs": "int8", "tolerance_failed": "int8 failed: x"},
        ],
        "chosen_round": 1,
        "kept_because": "the only plan on the latency target 0.6 (latency 0.620 of the original's)",
        "broken_over": 0.5,
    }


def _report():
    timing = {"original_ms": 0.5, "rewritten_ms": 0.25, "speedup": 2.0}
    records = [
        _record("conv_a", "rewritten", timing=timing),
        _record(EVIL, "rewritten", macs=(2000, 500)),
        _record("pipe|name", "reverted", timing={"original_ms": 0.1, "rewritten_ms": 0.2}),
        _record("head", "skipped", reason="no rank saves MACs"),
    ]
    stats = {"max_abs": 0.1, "rel_l2": 0.01, "cosine": 0.9999, "top1_agreement": 1.0}
    return {
        "input": "in.onnx",
        "output": "out.onnx",
        "input_bytes": 4000,
        "output_bytes": 2000,
        "sizes": None,
        "calibration": "random (seed 0)",
        "passes": [
            {
                "name": "svd",
                "options": {"rank": None, "align": 16},
                "changed": True,
                "seconds": 0.5,
                "summary": {"note": "a <b>warning</b>", "refit": "off", "auto": _auto()},
                "records": records,
            }
        ],
        "before": {"total_macs": 3640, "total_params": 1800, "weight_bytes": 7200},
        "after": {"total_macs": 1540, "total_params": 600, "weight_bytes": 2400},
        "validation": {"outputs": {"logits": stats}, "worst_rel_l2": 0.01, "samples": 4},
        "max_rel_l2": None,
        "passed": True,
        "benchmark": None,
    }


def test_folder_gets_three_files(tmp_path):
    target = report_target(str(tmp_path / "out") + "/")
    assert target.is_folder and not target.path.exists()  # made when written, not before
    files = write_report(_report(), target)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "report.html",
        "report.json",
        "report.md",
    ]
    assert json.loads(files[0].read_text()) == _report()


@pytest.mark.parametrize(
    ("raw", "is_folder"),
    [("r.json", False), ("R.JSON", False), ("out/", True), ("out", True), ("out.d", True)],
)
def test_report_target_kinds(tmp_path, raw, is_folder):
    assert report_target(str(tmp_path / raw) + ("/" if raw.endswith("/") else "")).is_folder is (
        is_folder
    )


def test_report_target_existing_folder_named_json(tmp_path):
    (tmp_path / "x.json").mkdir()
    assert report_target(tmp_path / "x.json").is_folder


@pytest.mark.parametrize("case", ["missing parent", "file in the way"])
def test_report_target_errors(tmp_path, case):
    if case == "missing parent":
        raw, words = tmp_path / "nope" / "out", "does not exist"
    else:
        raw, words = tmp_path / "notes.txt", "a file of that name exists"
        raw.write_text("x")
    with pytest.raises(CompressError, match=words):
        report_target(raw)


def test_html_is_self_contained_and_escaped():
    page = render_html(_report())
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", page, re.IGNORECASE)
    assert "<script" not in page.lower() and "http" not in page.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "a &lt;b&gt;warning&lt;/b&gt;" in page
    layer_rows = re.findall(r'<tr class="(rewritten|reverted|skipped)">', page)
    assert layer_rows == ["rewritten", "rewritten", "reverted", "skipped"]
    assert "no rank saves MACs" in page and "form=spatial, rank=8" in page
    assert "1.0K → 400 (0.40×)" in page  # MACs before → after of conv_a
    # The auto section: budget, its chosen layer with damage, backed-off node, candidates.
    assert "latency budget, target 0.6" in page and "0.012" in page and "conv_b" in page
    assert "3 candidates" in page
    assert "Plans built and measured (3)" in page and "int8 of the original" in page
    kept = "kept plan 1 of the 3 built and measured: the only plan on the latency target 0.6"
    assert f'<p class="kept"><strong>{kept} (latency 0.620 of the original&#x27;s)' in page


def test_auto_section_of_an_older_report_names_the_kept_plan_without_a_reason():
    report = _report()
    del report["passes"][0]["summary"]["auto"]["kept_because"]
    assert "<strong>kept plan 1 of the 3 built and measured</strong>" in render_html(report)
    assert "**kept plan 1 of the 3 built and measured**" in render_markdown(report)


def _validated_report():
    """A run with labels, timed: the headline has every figure it can have."""
    report = _report()
    stats = {"max_abs": 0.1, "rel_l2": 0.01, "cosine": 0.999, "top1_agreement": 0.98}
    stats |= {"accuracy_original": 0.86, "accuracy_result": 0.85}
    report["validation"] = {"outputs": {"logits": stats}, "samples": 250, "worst_rel_l2": 0.01}
    report["verdict"] = judge(report["validation"] | {"source": "d.npz (held-out)"})
    original, result = ({"median_ms": ms, "threads": 2} for ms in (2.0, 0.8))
    report["benchmark"] = {"original": original, "result": result, "speedup": 2.5}
    return report


def test_headline_under_the_verdict_gives_what_the_user_decides_on():
    page = render_html(_validated_report())
    head = page[page.index('<p class="verdict') : page.index("<h2>Summary</h2>")]
    rows = re.findall(r"<tr><td[^>]*>([^<]*)</td>((?:<td[^>]*>[^<]*</td>)*)</tr>", head)
    cells = {label: re.findall(r">([^<]*)</td>", rest) for label, rest in rows}
    assert list(cells) == [
        "latency (median, 2 threads)", "file size", "MACs", "parameters", "top-1 accuracy",
        "top-1 agreement with the original",
    ]  # fmt: skip
    assert cells["latency (median, 2 threads)"] == [
        "2.000 ms",
        "0.800 ms",
        "0.400× (speedup 2.50×)",
    ]
    assert cells["file size"] == ["4.0KB", "2.0KB", "0.500×"]
    accuracy = cells["top-1 accuracy"]
    assert accuracy[0] == "86.0%" and accuracy[2] == "-1.0 points"
    assert accuracy[1] == "85.0% (95% CI 79.8–88.7%)"  # Wilson, 250 samples
    assert cells["top-1 agreement with the original"][1].startswith("98.0% (95% CI ")
    assert "| top-1 accuracy | 86.0% | 85.0% (95% CI" in render_markdown(_validated_report())


def test_headline_of_a_run_not_validated_nor_timed_keeps_the_counts():
    page = render_html(_report())  # no verdict, no benchmark
    head = page[page.index("</code></p>") : page.index("<h2>Summary</h2>")]
    assert "not measured (--no-bench)" in head and "parameters" in head
    assert "accuracy" not in head and "agreement" not in head


def test_markdown_tables():
    text = render_markdown(_report())
    layer_lines = [line for line in text.splitlines() if line.startswith("| svd |")]
    assert len(layer_lines) == 4
    assert any("pipe\\|name" in line for line in layer_lines)  # a | in a name stays one cell
    columns = text.splitlines()[text.splitlines().index(layer_lines[0]) - 1].count("|")
    assert all(line.count("|") - line.count("\\|") == columns for line in layer_lines)
    assert "| MACs | 3.6K | 1.5K | 0.423× |" in text
    assert "- warning: a <b>warning</b>" in text
    assert "| conv_a | Conv | svd | rank=8 |" in text  # the auto table
    # The plans the search measured: final and search latency, error, what became of each.
    assert "| 0 | float | 0.5 | 0.45 | 0.41 | 0.9 |  | breaks the outputs (rel L2 > 0.5) |" in text
    assert "| 1 | int8 of the original |  | 0.62 |  | 0.02 | 0.5 | kept |" in text
    assert "| 2 | int8, chosen on int8 costs | 0.7 |  |  |  |  | failed: int8 failed: x |" in text


def test_plots_embedded_when_matplotlib_present():
    pytest.importorskip("matplotlib", reason="the `plot` extra is not installed")
    page = render_html(_report())
    # MACs per rewritten layer, latency per timed layer, auto latency, damage-vs-cost curve.
    assert page.count(DATA_URI) == 4
    assert INSTALL_HINT not in page
    png = damage_cost_curve(_auto()["curve"], "curve")
    assert png.startswith(b"\x89PNG")


def _changing_passes_report():
    """A run of prune, channels and int8, one record each of what it changed."""
    prune = {"node": "conv_a", "op": "Conv", "status": "rewritten"}
    prune |= {"params_before": 900, "params_after": 300, "details": {"sparsity": 0.667}}
    channels = {"node": "group_0", "op": "Conv", "status": "rewritten"}
    channels["details"] = {"channels_before": 16, "channels_after": 8}
    int8 = {"node": "conv_a", "op": "Conv", "status": "rewritten"}
    int8["details"] = {"int8": True, "weight_bytes_before": 3600, "weight_bytes_after": 964}
    report = _report()
    report["passes"] = [
        {"name": name, "options": {}, "changed": True, "seconds": 0.1, "records": [record]}
        for name, record in (("prune", prune), ("channels", channels), ("int8", int8))
    ]
    return report


CHANGE_CHARTS = (
    "nonzero weights per pruned layer",
    "channels per pruned channel group",
    "weight bytes per layer of the int8 model",
)


def test_every_pass_that_changes_the_model_gets_its_chart():
    pytest.importorskip("matplotlib", reason="the `plot` extra is not installed")
    page = render_html(_changing_passes_report())
    charts = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,', page)
    for title in CHANGE_CHARTS:
        assert any(chart.startswith(title) for chart in charts), title


def test_without_matplotlib_the_change_charts_give_way_to_the_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    page = render_html(_changing_passes_report())
    assert DATA_URI not in page and escape(INSTALL_HINT) in page
    assert not any(title in page for title in CHANGE_CHARTS)


def test_without_matplotlib_html_says_so_and_keeps_tables(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    page = render_html(_report())
    assert DATA_URI not in page
    assert escape(INSTALL_HINT) in page
    assert page.count('<tr class="') == 4


def test_install_hint_works_from_a_checkout():
    """The package is not on PyPI: the hint names matplotlib itself, as the `plot` extra
    requires it, and the editable install of the checkout."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert extras["optional-dependencies"]["plot"] == [PLOT_REQUIREMENT]
    assert f'pip install "{PLOT_REQUIREMENT}"' in INSTALL_HINT
    assert 'pip install -e ".[plot]"' in INSTALL_HINT
    assert "onnxcompress[plot]" not in INSTALL_HINT and "\n" not in INSTALL_HINT


def test_cli_report_json_stays_one_file(tmp_path):
    code = main(
        [str(FIXTURE), "--passes", "identity", "-o", str(tmp_path / "o.onnx")]
        + ["--report", str(tmp_path / "r.json"), "--no-bench", "-q"]
    )
    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx", "r.json"]
    assert json.loads((tmp_path / "r.json").read_text())["passes"][0]["name"] == "identity"


def test_cli_report_folder_with_svd(tmp_path, capsys):
    folder = tmp_path / "rep"
    code = main(
        [str(FIXTURE), "--passes", "svd", "-o", str(tmp_path / "o.onnx")]
        + ["--report", f"{folder}/", "--bench-repeats", "3", "-q"]
    )
    report = json.loads((folder / "report.json").read_text())
    # Random weights, no data: a broken verdict exits 1, and the report is written anyway.
    assert code == (1 if report["verdict"]["kind"] == "broken" else 0)
    assert f"**verdict: {report['verdict']['text']}**" in (folder / "report.md").read_text()
    rewritten = [r["node"] for r in report["passes"][0]["records"] if r["status"] == "rewritten"]
    assert rewritten, "the fixture has layers svd rewrites"
    page = (folder / "report.html").read_text()
    markdown = (folder / "report.md").read_text()
    for node in rewritten:
        assert f'<td class="text">{node}</td>' in page and f"| {node} |" in markdown
    assert "latency (median, 2 threads)" in page
    assert "report.{json,md,html}" in capsys.readouterr().out


def test_cli_report_folder_bad_parent_exit_2(tmp_path, capsys):
    code = main(
        [str(FIXTURE), "--passes", "identity", "-o", str(tmp_path / "o.onnx")]
        + ["--report", str(tmp_path / "missing" / "rep") + "/", "--no-bench", "-q"]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --report") and "does not exist" in err[0]
    assert not (tmp_path / "o.onnx").exists()  # refused before the run
