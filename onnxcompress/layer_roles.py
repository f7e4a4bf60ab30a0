"""The roles of a model's layers a user recognises, read off the graph: its first weighted
layer (reached first from the inputs) and its last (the classifier when the output it feeds
holds class scores, else the output layer). The core names them once, for the report."""

from __future__ import annotations

import onnx

from onnxcompress import graph

LAYER_OPS = ("Conv", "Gemm", "MatMul")
FIRST, LAST, CLASSIFIER = "first layer", "last layer", "classifier"


def weighted_layers(model: onnx.ModelProto) -> list[tuple[int, onnx.NodeProto]]:
    """(index, node) of the model's Conv/Gemm/MatMul nodes reading a fixed weight (stored, or
    an int8 model's stored weight dequantized), in graph order (topological: the first one is
    reached from the inputs before any other)."""
    fixed = {init.name for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" or (
            node.op_type == "DequantizeLinear" and node.input[0] in fixed
        ):
            fixed.update(node.output)
    return [
        (index, node)
        for index, node in enumerate(model.graph.node)
        if node.op_type in LAYER_OPS and fixed.intersection(node.input[:2])
    ]


def last_weighted_layer(model: onnx.ModelProto) -> str | None:
    """The name of the model's last weighted layer: a classifier, or an embedding model's
    output projection."""
    layers = weighted_layers(model)
    return layers[-1][1].name if layers else None


def layer_roles(model: onnx.ModelProto) -> dict[str, str]:
    """Layer name → its role, for the first and the last weighted layer. A nameless node is
    listed under every name a pass's record may give it: its first output, and `<op>_<index>`
    (the name `analyse` and `layers.named_copy` give it)."""
    layers = weighted_layers(model)
    if not layers:
        return {}
    (first_index, first), (last_index, last) = layers[0], layers[-1]
    last_role = CLASSIFIER if _feeds_class_scores(model, last) else LAST
    roles = dict.fromkeys(_names(last, last_index), last_role)
    first_role = FIRST if first_index != last_index else f"{FIRST}, {last_role}"
    roles.update(dict.fromkeys(_names(first, first_index), first_role))
    return roles


def _names(node: onnx.NodeProto, index: int) -> list[str]:
    return [node.name] if node.name else [node.output[0], f"{node.op_type}_{index}"]


def _feeds_class_scores(model: onnx.ModelProto, layer: onnx.NodeProto) -> bool:
    """Whether a graph output the layer reaches with no other layer between (a product
    with a computed weight, say) is class scores ([N, C] or [N, C, 1, 1])."""
    users = graph.consumers(model)
    outputs = {value.name: value for value in model.graph.output}
    seen, stack = set(), list(layer.output)
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in outputs and _class_scores(outputs[name]):
            return True
        stack += [
            out
            for user in users.get(name, [])
            if user.op_type not in graph.LAYER_OPS
            for out in user.output
        ]
    return False


def _class_scores(value: onnx.ValueInfoProto) -> bool:
    # Imported here: validate loads onnxruntime, which `import onnxcompress.pipeline` defers.
    from onnxcompress.validate import is_classifier_output

    dims = graph.dim_values(value)
    # The batch dimension may be named; the others must be known numbers.
    if len(dims) < 2 or not all(isinstance(d, int) for d in dims[1:]):
        return False
    return is_classifier_output(tuple([1, *dims[1:]]))
