"""A MatMul stack as large as asked (2.2 GB and more), written straight to disk with its weights
in one external data file: no copy of the whole model is ever in memory, so a model over
protobuf's 2 GB limit can be built on a machine that runs it.

Each layer is `Relu(x @ W + b)` with W of shape [hidden, hidden] float32: a rank-`rank` part
(the structure a truncated SVD keeps) plus a small full-rank rest, scaled so activations keep
their size through the stack. Seeded: the same arguments give the same bytes.

Usage: python models/large.py OUT.onnx [--gigabytes 2.2] [--hidden 4096] [--rank 256]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

INPUT, OUTPUT = "x", "y"
# The full-rank rest of each weight, relative to its low-rank part (Frobenius norms).
NOISE = 0.05


def layer_weight(rng: np.random.Generator, hidden: int, rank: int) -> np.ndarray:
    """W = A·B + rest, He-scaled: ‖x·W‖ ≈ ‖x‖·√2 for x of unit variance, as Relu halves it."""
    left = rng.standard_normal((hidden, rank), dtype=np.float32)
    right = rng.standard_normal((rank, hidden), dtype=np.float32)
    weight = left @ right
    weight *= np.float32(1 / math.sqrt(rank))
    weight += rng.standard_normal((hidden, hidden), dtype=np.float32) * np.float32(NOISE)
    weight *= np.float32(math.sqrt(2.0 / hidden))
    return weight


def layers_for(gigabytes: float, hidden: int) -> int:
    """Layers whose weights add up to at least `gigabytes` (10⁹ bytes)."""
    return max(1, math.ceil(gigabytes * 1e9 / (hidden * hidden * 4)))


def write_matmul_stack(
    path: str | Path, layers: int, hidden: int = 4096, rank: int = 256, seed: int = 0
) -> Path:
    """Write the model to `path` and its weights to `<path name>.data` beside it."""
    path = Path(path)
    data_name = f"{path.name}.data"
    rng = np.random.default_rng(seed)
    nodes, initializers, offset, x = [], [], 0, INPUT
    with open(path.with_name(data_name), "wb") as data:
        for index in range(layers):
            tensors = {
                f"w{index}": layer_weight(rng, hidden, rank),
                f"b{index}": np.zeros(hidden, np.float32),
            }
            for name, value in tensors.items():
                data.write(value.tobytes())
                initializers.append(_external(name, value, data_name, offset))
                offset += value.nbytes
            out = OUTPUT if index == layers - 1 else f"h{index}"
            nodes += [
                helper.make_node("MatMul", [x, f"w{index}"], [f"m{index}"], name=f"matmul{index}"),
                helper.make_node(
                    "Add", [f"m{index}", f"b{index}"], [f"a{index}"], name=f"add{index}"
                ),
                helper.make_node("Relu", [f"a{index}"], [out], name=f"relu{index}"),
            ]
            x = out
    graph = helper.make_graph(
        nodes,
        "matmul_stack",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", hidden])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", hidden])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    path.write_bytes(model.SerializeToString())
    return path


def _external(name: str, value: np.ndarray, location: str, offset: int) -> TensorProto:
    tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=value.shape)
    tensor.data_location = TensorProto.EXTERNAL
    for key, entry in (("location", location), ("offset", offset), ("length", value.nbytes)):
        tensor.external_data.add(key=key, value=str(entry))
    return tensor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the .onnx file to write (data goes beside it)")
    parser.add_argument("--gigabytes", type=float, default=2.2, help="weights, in 10⁹ bytes")
    parser.add_argument("--hidden", type=int, default=4096, help="width of every layer")
    parser.add_argument("--rank", type=int, default=256, help="rank of each weight's main part")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    layers = layers_for(args.gigabytes, args.hidden)
    write_matmul_stack(args.out, layers, args.hidden, args.rank, args.seed)
    print(f"wrote {args.out}: {layers} layers of {args.hidden}x{args.hidden}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
