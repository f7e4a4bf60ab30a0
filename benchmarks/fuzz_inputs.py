"""Fuzz the loader as a hostile user would: mutated copies of the repo's fixture models through
`analyse` and `--passes identity`, each case in its own process.

    python benchmarks/fuzz_inputs.py [--cases 200] [--seed 0] [--out results.md]

Mutations: byte flips, truncations, and edits of the parsed model (attribute values, tensor
dims and types, node inputs, opsets, duplicate outputs). A case is **bad** when a command
prints anything but one `error: ...` line on failure, says "internal error", shows a
traceback, or dies by a signal; also counted: cases `analyse` accepts (exit 0) that the
pipeline refuses for a reason other than running the model (which `analyse` does not do).
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import onnx

REPO = Path(__file__).resolve().parents[1]
SEEDS = [REPO / "models" / "resnet_style.onnx", REPO / "models" / "mlp.onnx"]

# Defines run(argv) -> (exit code, stderr): the CLI in this process, its stderr captured at
# fd level, so that onnxruntime's C++ log lines count too (tests/test_ort_logs.py uses it).
RUN_CAPTURED = r"""
import json, os, sys, tempfile
from onnxcompress.cli import main

def run(argv):
    with tempfile.TemporaryFile() as err:
        saved = os.dup(2)
        os.dup2(err.fileno(), 2)
        try:
            code = main(argv)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        return code, err.read().decode(errors="replace")
"""
# Runs both commands in one process on one file.
_CASE = (
    RUN_CAPTURED
    + r"""
path, out = sys.argv[1], sys.argv[2]
results = {
    "analyse": run(["analyse", path]),
    "identity": run([path, "--passes", "identity", "--no-bench", "-q", "-o", out]),
}
print(json.dumps(results))
"""
)


def byte_flip(data: bytes, rng: random.Random) -> bytes:
    edited = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        edited[rng.randrange(len(edited))] = rng.randrange(256)
    return bytes(edited)


def truncate(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randrange(1, len(data))]


def structural(data: bytes, rng: random.Random) -> bytes:
    model = onnx.load_from_string(data)
    graph = model.graph
    kind = rng.choice(["attribute", "dims", "dtype", "input", "opset", "duplicate", "raw"])
    node = rng.choice(list(graph.node))
    if kind == "attribute" and node.attribute:
        attribute = rng.choice(list(node.attribute))
        if attribute.ints:
            attribute.ints[rng.randrange(len(attribute.ints))] = rng.choice([-7, 0, 10**9])
        elif attribute.type == onnx.AttributeProto.INT:
            attribute.i = rng.choice([-7, 0, 10**9])
        else:
            attribute.s = rng.choice([b"\xff\xfe", b"NOT_A_MODE"])
    elif kind in ("dims", "dtype", "raw") and graph.initializer:
        tensor = rng.choice(list(graph.initializer))
        if kind == "dims" and tensor.dims:
            tensor.dims[rng.randrange(len(tensor.dims))] = rng.choice([-1, 0, 3, 10**6])
        elif kind == "dtype":
            tensor.data_type = rng.choice([0, 7, 8, 16, 99])
        else:
            tensor.raw_data = tensor.raw_data[: len(tensor.raw_data) // 2]
    elif kind == "input" and node.input:
        node.input[rng.randrange(len(node.input))] = rng.choice(["", "nowhere", node.output[0]])
    elif kind == "opset":
        model.opset_import[0].version = rng.choice([1, 5, 99, 10**6])
    else:
        other = rng.choice(list(graph.node))
        other.output[0] = node.output[0]
    return model.SerializeToString()


MUTATIONS = {"byte_flip": byte_flip, "truncate": truncate, "structural": structural}


def bad_reason(code: int, stderr: str) -> str | None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    if code < 0:
        return f"killed by signal {-code}"
    if "Traceback" in stderr:
        return "traceback"
    if "internal error" in stderr:
        return lines[-1][:160]
    if code != 0 and (len(lines) != 1 or not lines[0].startswith("error: ")):
        return f"{len(lines)} stderr lines: " + " | ".join(lines)[:160]
    return None


def run_case(data: bytes, folder: Path) -> dict:
    path = folder / "case.onnx"
    path.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", _CASE, str(path), str(folder / "out.onnx")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0 or not done.stdout.strip():
        return {"crash": (done.returncode, done.stderr[-300:])}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="also write the summary to this markdown file")
    options = parser.parse_args()
    rng = random.Random(options.seed)
    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    problems = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for index in range(options.cases):
            seed = rng.choice(SEEDS)
            mutation = rng.choice(list(MUTATIONS))
            data = MUTATIONS[mutation](seed.read_bytes(), rng)
            result = run_case(data, folder)
            label = f"case {index} ({seed.name}, {mutation})"
            if "crash" in result:
                problems.append(f"{label}: the case process died: {result['crash']}")
                continue
            for command, (code, stderr) in result.items():
                counts[command][code] += 1
                reason = bad_reason(code, stderr)
                if reason:
                    problems.append(f"{label}, {command}: exit {code}, {reason}")
            (a_code, _), (p_code, p_err) = result["analyse"], result["identity"]
            runs_the_model = "onnxruntime" in p_err or "on the calibration inputs" in p_err
            if a_code == 0 and p_code == 2 and not runs_the_model:
                problems.append(f"{label}: analyse exit 0, identity refused: {p_err.strip()[:160]}")
    lines = [
        f"# Loader fuzz: {options.cases} cases, seed {options.seed}",
        "",
        f"command: `python benchmarks/fuzz_inputs.py --cases {options.cases} "
        f"--seed {options.seed}`",
        "",
    ]
    for command, counter in counts.items():
        exits = ", ".join(f"exit {code}: {n}" for code, n in sorted(counter.items()))
        lines.append(f"- {command}: {exits}")
    lines += ["", f"{len(problems)} problem(s):", *[f"- {p}" for p in problems]]
    text = "\n".join(lines) + "\n"
    print(text)
    if options.out:
        Path(options.out).write_text(text)


if __name__ == "__main__":
    main()
