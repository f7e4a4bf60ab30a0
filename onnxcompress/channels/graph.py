"""The channel graph of a model: its walk with every op's rule, giving the coupled channel
groups and the edits pruning them needs."""

from __future__ import annotations

import onnx

from onnxcompress.channels.groups import ChannelGraph, Walker
from onnxcompress.channels.rules import PRODUCER_OPS, RULES


def build_channel_graph(
    model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None
) -> ChannelGraph:
    """Walk `model` (not modified) and return its channel groups and the edits pruning needs."""
    walker = Walker(model, input_shapes)
    walker.walk(RULES, PRODUCER_OPS)
    return walker.result()
