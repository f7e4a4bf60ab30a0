"""Help that tells a user what to try: --help lists the commands, --list-passes says what each
pass is for and when to use it, --list-passes NAME gives its options in words."""

import subprocess
import sys

import pytest

from onnxcompress import registry
from onnxcompress.cli import main
from onnxcompress.pass_help import as_typed
from onnxcompress.passkit import option_help
from tests.conftest import REPO


def test_help_lists_the_commands_and_where_to_start():
    done = subprocess.run(
        [sys.executable, "-m", "onnxcompress", "--help"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    commands = done.stdout.split("commands:")[1]
    for command in ("MODEL.onnx --passes", "analyse MODEL.onnx", "decode MODEL.onnxc"):
        assert f"python -m onnxcompress {command}" in commands, command
    assert "--list-passes" in commands.split("where to start:")[1]


def test_list_passes_is_one_line_a_pass_in_the_guide_order(capsys):
    assert main(["--list-passes"]) == 0
    header, *lines = capsys.readouterr().out.strip().splitlines()
    guide = registry.guide()
    assert "--list-passes NAME" in header
    assert len(lines) == len(guide) == len(registry.all_passes())
    for line, (spec, when) in zip(lines, guide, strict=True):
        assert line.split()[0] == spec.name
        assert spec.help in line and when and when in line, spec.name
    assert lines[0].split()[0] == "int8" and "first try" in lines[0]


@pytest.mark.parametrize("name", sorted(registry.all_passes()))
def test_list_passes_name_gives_every_option_with_its_default(capsys, name):
    assert main(["--list-passes", name]) == 0
    text = capsys.readouterr().out
    spec = registry.get_pass(name)
    assert text.startswith(f"{name}: {spec.help}\nwhen: ")
    for field in spec.option_fields():
        line = f"  {field.name} (default {as_typed(field.default)}): {option_help(field)}"
        assert line in text.splitlines(), line
    if not spec.option_fields():
        assert "options: none" in text


def test_defaults_read_as_typed():
    assert [as_typed(v) for v in (True, None, "", 0.5, "uint8")] == [
        "true", "none", "empty", "0.5", "uint8",
    ]  # fmt: skip


def test_unknown_pass_is_one_line_and_exit_2(capsys):
    assert main(["--list-passes", "nope"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: unknown pass 'nope'; passes are: ")
