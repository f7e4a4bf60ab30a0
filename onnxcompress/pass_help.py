"""`--list-passes`: one line a pass saying what it is for and when to use it, in the order
the passes package advises trying them; `--list-passes NAME`: that pass's options in words."""

from __future__ import annotations

from typing import Any

from onnxcompress import registry
from onnxcompress.passkit import PassSpec, option_help


def pass_list() -> list[str]:
    """The header, then one line per pass: name, what it does, when to use it."""
    guide = registry.guide()
    width = max(len(spec.name) for spec, _ in guide)
    lines = [
        "passes, in the order to try them (run: --passes a,b; a pass's options: "
        "--list-passes NAME):"
    ]
    for spec, when in guide:
        lines.append(f"  {spec.name:<{width}}  {spec.help}" + (f" — {when}" if when else ""))
    return lines


def pass_details(name: str) -> list[str]:
    """What one pass does, when to use it, and each option with its default, in words."""
    spec = registry.get_pass(name)
    when = dict((s.name, text) for s, text in registry.guide())[name]
    lines = [f"{spec.name}: {spec.help}"]
    if when:
        lines.append(f"when: {when}")
    return lines + _option_lines(spec)


def _option_lines(spec: PassSpec) -> list[str]:
    fields = spec.option_fields()
    if not fields:
        return ["options: none"]
    lines = [f"options (--opt {spec.name}.NAME=VALUE, or a [{spec.name}] table in --config):"]
    for field in fields:
        lines.append(f"  {field.name} (default {as_typed(field.default)}): {option_help(field)}")
    return lines


def as_typed(value: Any) -> str:
    """A default as the user would type it."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if value == "":
        return "empty"
    return str(value)
