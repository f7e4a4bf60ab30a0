"""Report rows: a pass's options show the values it used, not `None` where it chose one."""

from onnxcompress.report.rows import filled_columns, option_rows


def test_an_unset_option_the_pass_gave_a_value_shows_that_value():
    entry = {
        "options": {"target_macs": None, "rank": None, "align": 16, "refit": True},
        "summary": {"target_macs": 0.5, "macs_before": 100},
    }
    rows = dict(option_rows(entry))
    assert rows["target_macs"] == "0.5 (the pass's default)"
    assert rows["rank"] == "not set"  # nothing in the summary: it stays unset
    assert rows["align"] == "16" and rows["refit"] == "True"


def test_layer_table_leaves_out_the_columns_no_row_fills():
    columns = ("node", "role", "precision", "status")
    body = [("conv", "first layer", "", "rewritten"), ("fc", "", "", "skipped")]
    kept, rows = filled_columns(columns, body)
    assert kept == ("node", "role", "status")
    assert rows == [("conv", "first layer", "rewritten"), ("fc", "", "skipped")]
