"""Typed pass options: coercion from CLI strings, unknown options, help text."""

from dataclasses import dataclass

import pytest

from onnxcompress.errors import CompressError
from onnxcompress.passkit import PassResult, PassSpec, option, option_help


@dataclass(frozen=True)
class DemoOptions:
    groups: int = option(4, "number of groups")
    energy: float | None = option(None, "energy to keep")
    refit: bool = option(True, "refit on data")
    variant: str = option("plain", "plain or btd")

    def __post_init__(self):
        if self.groups < 1:
            raise ValueError("groups must be >= 1")


def _spec():
    return PassSpec("demo", lambda m, o, c: PassResult(m, False), DemoOptions, "demo pass")


def test_strings_become_declared_types():
    opts = _spec().make_options(
        {"groups": "8", "energy": "0.9", "refit": "false", "variant": "btd"}
    )
    assert opts == DemoOptions(groups=8, energy=0.9, refit=False, variant="btd")


def test_typed_values_from_toml_pass_through():
    assert _spec().make_options({"groups": 2, "refit": True}).groups == 2


def test_optional_accepts_none():
    assert _spec().make_options({"energy": "none"}).energy is None


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ({"groups": "four"}, "demo.groups='four': expected int"),
        ({"refit": "maybe"}, "demo.refit='maybe': expected bool"),
        (
            {"rank": "3"},
            "unknown option demo.rank; options of demo: energy, groups, refit, variant",
        ),
        ({"groups": "0"}, "demo: groups must be >= 1"),
        ({"groups": True}, "expected int"),
    ],
)
def test_bad_options_raise_one_clear_error(raw, words):
    with pytest.raises(CompressError, match=words.replace("(", r"\(").replace(")", r"\)")):
        _spec().make_options(raw)


def test_help_comes_from_field_metadata():
    fields = {f.name: f for f in _spec().option_fields()}
    assert option_help(fields["groups"]) == "number of groups"


@pytest.mark.parametrize("raw", ["nan", "inf", "-inf", float("nan"), float("inf")])
def test_float_options_must_be_finite(raw):
    """From --opt strings and from TOML (which has nan and inf literals) alike (issue 27)."""
    with pytest.raises(CompressError, match="demo.energy=.*: expected a finite number"):
        _spec().make_options({"energy": raw})


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("svd.target_macs", "0"),
        ("svd.energy", "0"),
        ("svd.energy", "1.5"),
        ("cp.target_macs", "0"),
        ("fga.energy", "-0.1"),
        ("tucker2.target_macs", "2"),
        ("lrs.target_macs", "0"),
    ],
)
def test_factorization_fractions_refused_when_the_options_are_read(option, value):
    """Not after every layer was factorized and measured, as the budget used to refuse them."""
    from onnxcompress import passes

    pass_name, name = option.split(".")
    with pytest.raises(CompressError, match=f"{name} must be a fraction in"):
        passes.get_pass(pass_name).make_options({name: value})


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_cp_seed_within_numpys_range(seed):
    from onnxcompress import passes

    with pytest.raises(CompressError, match="seed must be from 0 to 4294967295"):
        passes.get_pass("cp").make_options({"seed": seed})
