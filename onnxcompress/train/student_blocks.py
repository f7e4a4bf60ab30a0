"""The blocks of a compressed model (the student) that block-wise distillation trains one at a
time, found by comparing it with the original, and each block as a model of its own.

A block is a part of the student between tensors both graphs compute (same name, and the
same shape where shape inference knows it). It starts as the nodes the original does not
have (a rewritten layer's replacement nodes; a node whose weights the pass changed or whose
output it narrowed), joined when one reads what another writes; then grows along the single
path after it through the elementwise ops of `GROW_OPS` (a normalization, a residual Add, a
scale) up to and including the first activation, so that its output is a tensor of the
original past the nonlinearity. Needs neither torch nor training."""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import helper, numpy_helper

from onnxcompress import graph, runtime
from onnxcompress.errors import CompressError
from onnxcompress.train.coverage import DEFAULT_DOMAINS, UnsupportedOps, supported

# Activations a block ends after: compared past them, the errors they clip away (a ReLU's
# negative side) cost nothing, as BRECQ compares blocks at their outputs.
ACTIVATIONS = frozenset(
    {"Relu", "Clip", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish",
     "Elu", "Gelu", "Softplus"}
)  # fmt: skip
# Elementwise ops a block grows through on its way to an activation.
GROW_OPS = ACTIVATIONS | {"BatchNormalization", "Add", "Sub", "Mul", "Div", "Identity"}
# At most this many nodes are added after a block's rewritten nodes (e.g. BN, Add, Relu).
MAX_GROWTH = 4


@dataclass(frozen=True)
class StudentBlock:
    """Nodes of the student (indices into its graph, in graph order), the tensors they read
    from the rest of it (weights excluded) and those the rest reads from them. `rewritten`
    of the nodes are ones the original lacks; the others were grown onto them."""

    nodes: tuple[int, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    rewritten: int

    @property
    def name(self) -> str:
        """The block by its first output: a tensor both graphs compute."""
        return self.outputs[0]


def student_blocks(student: onnx.ModelProto, teacher: onnx.ModelProto) -> list[StudentBlock]:
    """The blocks of `student` (a rewrite of `teacher` keeping the names of the tensors it
    did not change), ordered by their last node: a block's inputs are computed by the blocks
    before it. Empty when no node differs."""
    nodes = list(student.graph.node)
    shared = _shared_tensors(student, teacher)
    changed = _changed_nodes(student, teacher, shared)
    readers = graph.consumers(student)
    outputs = {value.name for value in student.graph.output}
    position = {id(node): index for index, node in enumerate(nodes)}
    constants = {init.name for init in student.graph.initializer}
    constants |= {node.output[0] for node in nodes if node.op_type == "Constant"}
    claimed = set(changed)
    blocks = []
    for group in _joined(nodes, changed):
        grown = _grown(nodes, group, readers, outputs, position, claimed)
        claimed.update(grown)
        members = sorted(group + grown)
        blocks.append(_block(nodes, members, readers, outputs, constants, len(group)))
    return sorted(blocks, key=lambda block: block.nodes[-1])


def _shared_tensors(student: onnx.ModelProto, teacher: onnx.ModelProto) -> set[str]:
    """The tensors both graphs compute: by name, unless shape inference gives them another
    shape in each (the narrower output of a layer whose channels were pruned)."""
    theirs = {name for node in teacher.graph.node for name in node.output}
    theirs |= {value.name for value in teacher.graph.input}
    our_shapes, their_shapes = _shapes(student), _shapes(teacher)
    return {name for name in theirs if _may_match(our_shapes.get(name), their_shapes.get(name))}


def _shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Every tensor's inferred dims (ints where fixed); empty when inference fails."""
    try:
        infos = graph.value_infos(graph.infer_shapes(model))
    except CompressError:
        return {}
    return {
        name: graph.dim_values(info)
        for name, info in infos.items()
        if info.type.tensor_type.HasField("shape")
    }


def _may_match(ours: list | None, theirs: list | None) -> bool:
    """False only for shapes known to differ: in rank, or in a dim fixed in both."""
    if ours is None or theirs is None:
        return True
    if len(ours) != len(theirs):
        return False
    return all(
        a == b or not isinstance(a, int) or not isinstance(b, int)
        for a, b in zip(ours, theirs, strict=True)
    )


def _changed_nodes(
    student: onnx.ModelProto, teacher: onnx.ModelProto, shared: set[str]
) -> list[int]:
    """Indices of the student's nodes (Constants aside: they are weights) that the teacher
    lacks, that read a weight the teacher lacks or holds with other values, or that write a
    tensor the teacher computes in another shape."""
    theirs = {_node_key(node) for node in teacher.graph.node}
    their_weights = {init.name: _array_key(init) for init in teacher.graph.initializer}
    new_weights = {
        init.name
        for init in student.graph.initializer
        if their_weights.get(init.name) != _array_key(init)
    }
    new_weights |= {
        node.output[0]
        for node in student.graph.node
        if node.op_type == "Constant" and _node_key(node) not in theirs
    }
    return [
        index
        for index, node in enumerate(student.graph.node)
        if node.op_type != "Constant"
        and (
            _node_key(node) not in theirs
            or new_weights.intersection(node.input)
            or not shared.issuperset(name for name in node.output if name)
        )
    ]


def _node_key(node: onnx.NodeProto) -> tuple:
    """What a node computes, whatever its name, doc string or the encoding of its attributes
    (a graph tool's round trip changes those): op, tensors and attribute values."""
    attributes = sorted((attr.name, _attribute_key(attr)) for attr in node.attribute)
    domain = "" if node.domain in DEFAULT_DOMAINS else node.domain
    return (domain, node.op_type, tuple(node.input), tuple(node.output), tuple(attributes))


def _attribute_key(attr: onnx.AttributeProto):
    value = helper.get_attribute_value(attr)
    values = value if isinstance(value, list) else [value]
    return tuple(
        _array_key(one) if isinstance(one, onnx.TensorProto)
        else onnx.printer.to_text(one) if isinstance(one, onnx.GraphProto)
        else repr(one)
        for one in values
    )  # fmt: skip


def _array_key(tensor: onnx.TensorProto) -> tuple:
    """A tensor by its values (raw bytes or typed lists alike)."""
    array = numpy_helper.to_array(tensor)
    return (array.dtype.str, array.shape, array.tobytes())


def _joined(nodes: list, changed: list[int]) -> list[list[int]]:
    """The changed nodes in groups joined by the tensors one writes and another reads: the
    teacher's tensor there is no target for the first when the second differs (a refit bias
    after a factorized MatMul)."""
    group_of = {index: index for index in changed}

    def root(index: int) -> int:
        while group_of[index] != index:
            index = group_of[index]
        return index

    writer = {name: index for index in changed for name in nodes[index].output if name}
    for index in changed:
        for name in nodes[index].input:
            if name in writer:
                group_of[root(index)] = root(writer[name])
    groups: dict[int, list[int]] = {}
    for index in changed:
        groups.setdefault(root(index), []).append(index)
    return list(groups.values())


def _grown(nodes, group, readers, outputs, position, claimed) -> list[int]:
    """The unchanged nodes a block takes on after `group`: the only reader of its only
    output, while that reader is an elementwise op no other block took, up to the first
    activation."""
    members, grown = set(group), []
    for _ in range(MAX_GROWTH):
        exits = _exits(nodes, members, readers, outputs)
        if len(exits) != 1 or exits[0] in outputs or len(readers.get(exits[0], [])) != 1:
            break
        reader = readers[exits[0]][0]
        index = position[id(reader)]
        if reader.op_type not in GROW_OPS or index in claimed or len(reader.output) != 1:
            break
        members.add(index)
        grown.append(index)
        if reader.op_type in ACTIVATIONS:
            break
    return grown


def _exits(nodes, members: set[int], readers, outputs: set[str]) -> list[str]:
    """Tensors the `members` write that a node outside them reads, or the graph returns."""
    inside = {id(nodes[index]) for index in members}
    return [
        name
        for index in sorted(members)
        for name in nodes[index].output
        if name and (name in outputs or any(id(r) not in inside for r in readers.get(name, [])))
    ]


def _block(nodes, members: list[int], readers, outputs, constants, rewritten) -> StudentBlock:
    written = {name for index in members for name in nodes[index].output}
    read = [name for index in members for name in nodes[index].input if name]
    inputs = [name for name in dict.fromkeys(read) if name not in written | constants]
    exits = _exits(nodes, set(members), readers, outputs)
    return StudentBlock(tuple(members), tuple(inputs), tuple(exits), rewritten)


def block_model(student: onnx.ModelProto, block: StudentBlock) -> onnx.ModelProto:
    """The block as a model of its own: its nodes, the weights and Constant nodes they read,
    its inputs as graph inputs (untyped: `runtime.type_inputs` types them for onnxruntime)
    and its outputs as graph outputs."""
    nodes = [student.graph.node[index] for index in block.nodes]
    read = {name for node in nodes for name in node.input}
    constants = [n for n in student.graph.node if n.op_type == "Constant" and n.output[0] in read]
    outputs = [onnx.ValueInfoProto(name=name) for name in block.outputs]
    part, _ = runtime.nodes_as_model(student, constants + nodes, outputs)
    return part


def convertible_blocks(student: onnx.ModelProto, teacher: onnx.ModelProto) -> list[StudentBlock]:
    """`student_blocks`, refused in one line when torch cannot run one of them: a rewritten
    layer that cannot train."""
    blocks = student_blocks(student, teacher)
    for block in blocks:
        missing = supported(block_model(student, block))
        if missing:
            where = f"the rewritten layer ending at {block.name}"
            raise CompressError(f"distill: {UnsupportedOps(missing, where)}")
    return blocks
