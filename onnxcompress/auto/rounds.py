"""The rounds of the auto search: each plan it built and measured, the report's entry for it
beside what it built, kept in one list instead of two parallel ones."""

from __future__ import annotations

from typing import Any, NamedTuple

import onnx


class Built(NamedTuple):
    """What a round built: the plan, the model it gave, its refit summary, its check, and the
    layers restored to keep it within the tolerance."""

    plan: dict
    model: onnx.ModelProto
    refit: Any
    check: dict
    restored: list[str]


class Rounds(list):
    """The rounds the search built and measured, in order: each one's check (the report's
    round entry, this list's items) with what it built beside it in `built`."""

    def __init__(self) -> None:
        super().__init__()
        self.built: list[Built] = []

    def add(self, entry: dict, plan, model, refit, check: dict, restored) -> dict:
        self.append(entry)
        self.built.append(Built(plan, model, refit, check, restored))
        return entry

    def merge(self, other: Rounds) -> None:
        self.extend(other)
        self.built.extend(other.built)
