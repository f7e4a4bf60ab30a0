"""The passes, one module each, installed as `onnxcompress.passes`. Importing this package
imports every module, and each registers itself in `onnxcompress.registry`."""

from __future__ import annotations

from onnxcompress.passes import (  # noqa: F401  (importing registers them)
    auto,
    blocks,
    channels,
    cp,
    distill,
    fga,
    fold_bn,
    identity,
    int8,
    lrs,
    prune,
    rdprune,
    svd,
    tucker2,
    upcast,
)

from onnxcompress.registry import all_passes, get_pass, register

__all__ = ["GUIDE", "all_passes", "get_pass", "register"]

# When to use each pass, in the order to try them: `--list-passes` prints one line each.
# The figures are the README's headline results.
GUIDE = {
    "int8": "first try, with your data (--data or --images): about 4x smaller, 1.6-2x faster "
    "on the CNNs measured for about a top-1 point; on transformers it can ruin the outputs",
    "auto": "smaller and faster in one go, with your data: --opt auto.target_latency=0.5 "
    "tries factorizations, int8 and block removal per layer and keeps the least error on "
    "target",
    "fold_bn": "always safe (exact); run it before the other passes",
    "upcast": "a float16 model on CPU: computes it in float32, exactly (int8 does it itself)",
    "blocks": "ResNet-style models, with your data: fewer ops, faster at batch 1; then int8: "
    "--passes blocks,int8",
    "channels": "faster without int8: fewer channels in every layer; loses accuracy without "
    "fine-tuning, so check the verdict",
    "svd": "fewer MACs in Gemm/MatMul (transformers, linear heads) and convs, refit on your "
    "data; check that the latency fell",
    "cp": "fewer MACs in k×k convolutions: of the factorizations, the accuracy kept best",
    "tucker2": "fewer MACs in k×k convolutions; at half the MACs no faster on ResNet-20",
    "fga": "fewer MACs in k×k convolutions as grouped ones; at half the MACs no faster on "
    "ResNet-20",
    "lrs": "low-rank plus sparse branches; at half the MACs no faster on ResNet-20",
    "prune": "a smaller file, not a faster model: write it with -o out.onnxc",
    "rdprune": "the smallest .onnxc file for its error: write it with -o out.onnxc",
    "distill": "last, after a lossy pass, with your data: trains the result to match the "
    "original (needs torch: pip install 'onnxcompress[train]'); e.g. --passes fga,distill",
    "identity": "check the tool on your model: loads, validates and times it, changes nothing",
}
