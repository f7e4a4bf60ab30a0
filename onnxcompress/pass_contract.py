"""The contract every pass keeps (see passkit.PassResult), checked after each pass runs: a
broken contract is a bug in the pass, reported to its author."""

from __future__ import annotations

import onnx

STATUSES = ("rewritten", "skipped", "reverted")


class PassContractError(RuntimeError):
    """A pass broke the pass contract: a bug in the pass, reported to its author."""


def check_contract(name: str, model: onnx.ModelProto, before: tuple, result) -> None:
    """The contract every pass keeps (see passkit.PassResult): `changed=False` means the
    model, handed back, is the one it was given, untouched; every record's status is one of
    STATUSES; a skipped or reverted node says why."""
    touched = fingerprint(model) != before
    if not result.changed:
        # The model handed back is most often the one given: no deep compare with itself.
        if touched or (result.model is not model and result.model != model):
            raise PassContractError(f"pass {name} says changed=False but changed the model")
    elif touched:
        raise PassContractError(f"pass {name} changed the model it was given in place")
    for record in result.records:
        if record.status not in STATUSES:
            raise PassContractError(
                f"pass {name}: record of {record.node} has status {record.status!r}, "
                f"not one of {', '.join(STATUSES)}"
            )
        if record.status != "rewritten" and not record.reason:
            raise PassContractError(f"pass {name}: {record.status} {record.node} without a reason")


def fingerprint(model: onnx.ModelProto) -> tuple:
    """What a pass could change, cheaply: the nodes, and each initializer's name, type,
    dims and size (not its bytes: a 2 GB model is not copied to be compared)."""
    nodes = tuple(node.SerializeToString() for node in model.graph.node)
    tensors = tuple(
        (t.name, t.data_type, tuple(t.dims), t.ByteSize()) for t in model.graph.initializer
    )
    return nodes, tensors, tuple(model.graph.input), tuple(model.graph.output)
