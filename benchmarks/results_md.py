"""`results.md` of a benchmark run: the command and machine, the method notes, and one table
per model (MACs, size, latency per batch size, scores, pass time, notes or the error), and
auto against each method at auto's measured latency."""

from __future__ import annotations

from benchmarks.same_latency import judged_batch, markdown_lines


def markdown(results: dict) -> str:
    """The whole report: command and machine, the method notes, one table per model."""
    m, s = results["machine"], results["settings"]
    lines = [
        "# Compression benchmark",
        "",
        f"`{results['command']}` — {m['machine']}, {m['cpu_count']} cores (load average "
        f"{m['load_average_start']:.1f} at start), onnxruntime {m['onnxruntime']} CPU, "
        f"{m['threads']} intra-op threads{_spinning(m)}, graph optimisations on for timing, "
        f"{s['repeats']} interleaved timed runs per batch size{_loops(s)}, seed {s['seed']}; "
        f"total {results.get('total_seconds', 0):.0f} s.",
        "",
        "MACs and size are ratios to the original (size: `.onnxc` bytes for the pruning "
        "methods, `.onnx` bytes otherwise, over the original `.onnx`); latency is the median "
        "in ms with the speedup over the original timed in the same loop.",
        "",
    ]
    lines += [f"- `{name}`: {note}" for name, note in results["method_notes"].items()]
    given = [f"{n}.{k}={v}" for n, kv in s["opt"].items() for k, v in kv.items()]
    if given:
        lines.append(f"- options given with --opt: {', '.join(given)}")
    for entry in results["models"]:
        lines += ["", *model_table(entry)]
    for skipped in results["skipped"]:
        lines += ["", f"- {skipped['model']}: {skipped['reason']}"]
    if results.get("plots_skipped"):
        lines += ["", f"Plots: {results['plots_skipped']}"]
    return "\n".join(lines) + "\n"


# How the timing loop's pool threads waited (onnxcompress.benchmark.SPINNING); runs before
# the setting was recorded say nothing.
SPINNING_TEXT = {
    "stop": " (pool threads spinning during a run, as deployed, stopped after it)",
    "off": " (pool threads not spinning)",
    "on": " (pool threads spinning)",
}


def _spinning(machine: dict) -> str:
    return SPINNING_TEXT.get(machine.get("spinning"), "")


def _loops(settings: dict) -> str:
    loops = settings.get("timing_loops", 1)
    if loops == 1:
        return ""
    return f" in each of {loops} timing loops (a speedup: the median of its per-loop ones)"


def model_table(entry: dict) -> list[str]:
    rows = entry["rows"]
    metric = entry["metric"]
    keys = [metric] + sorted({k for r in rows for k in r.get("score", {})} - {metric})
    batches = entry["latency_batches"]
    arrow = "↑" if entry["higher_is_better"] else "↓"
    head = ["method", "MACs", "params", ".onnx kB", ".onnxc kB", "size"]
    head += [f"ms batch {b}" for b in batches]
    head += [f"{k} {arrow}" if k == metric else k for k in keys] + ["pass s", "notes"]
    lines = [f"## {entry['name']}", ""]
    lines += [f"- {note}" for note in entry["notes"]]
    if judged_batch(entry) != 1:
        lines.append(
            f"- compressed at batch {judged_batch(entry)} (`--batch`): `auto` timed its "
            "candidates and plans there, and the comparison below reads latency there"
        )
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        if "error" in row:
            cells = [row["label"]] + [""] * (len(head) - 3) + [f"{row['seconds']:.1f}"]
            lines.append("| " + " | ".join(cells + [f"error: {row['error']}"]) + " |")
            continue
        cells = [
            row["label"],
            f"{row['macs_ratio']:.3f}",
            _human(row["params"]),
            f"{row['onnx_bytes'] / 1e3:.1f}",
            "" if row["onnxc_bytes"] is None else f"{row['onnxc_bytes'] / 1e3:.1f}",
            f"{row['size_ratio']:.3f}",
        ]
        for batch in batches:
            lat = row.get("latency", {}).get(str(batch), {})
            if "speedup" in lat:
                cells.append(f"{lat['median_ms']:.3f} ({lat['speedup']:.2f}×)")
            else:
                cells.append("error" if "error" in lat else "")
        cells += [_number(row["score"].get(k)) for k in keys]
        cells += [f"{row['seconds']:.1f}", "; ".join(row.get("notes", []))]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + markdown_lines(entry)


def _number(value) -> str:
    if value is None:
        return ""
    return f"{value:.2f}" if abs(value) >= 10 else f"{value:.4f}"


def _human(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 1e6 else f"{count / 1e3:.1f} k"
