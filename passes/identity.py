"""`identity`: changes nothing; exercises the whole flow (load, check, validate, write)."""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from onnxcompress.passkit import PassContext, PassResult
from onnxcompress.registry import register


@dataclass(frozen=True)
class IdentityOptions:
    pass


@register("identity", IdentityOptions, "no-op: returns the model unchanged", idempotent=True)
def identity(model: onnx.ModelProto, options: IdentityOptions, context: PassContext) -> PassResult:
    return PassResult(model=model, changed=False)
