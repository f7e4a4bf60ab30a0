"""The budget a compressing pass uses when the user gives none: one with calibration data, where
the result is refit (by most passes) and judged on real inputs, and a smaller one (or none)
without, where it comes from the weights alone and only random inputs check it. The
weight-only values are measured: docs/decisions.md#weight-only-default-budgets."""

from __future__ import annotations

from dataclasses import dataclass

from onnxcompress.errors import CompressError

DECISION = "docs/decisions.md#weight-only-default-budgets"


@dataclass(frozen=True)
class DefaultBudget:
    """A pass's default for one option: `with_data`, and `weight_only` (None: no default
    without data, the pass refuses) when the run has no calibration data."""

    option: str
    with_data: float
    weight_only: float | None

    def help(self) -> str:
        """Both defaults, for the option's help text."""
        without = (
            f"{self.weight_only:g} without"
            if self.weight_only is not None
            else "none without: give one"
        )
        return f"default {self.with_data:g} with calibration data, {without}"

    def choose(self, calibrated: bool, pass_name: str) -> tuple[float, str]:
        """(value, the note saying which default it is and why); without data and without a
        weight-only default, a CompressError saying what to give."""
        if calibrated:
            return self.with_data, (
                f"default {self.option} {self.with_data:g} (calibration data given; "
                f"without it the default is {self._weight_only_text()})"
            )
        if self.weight_only is None:
            raise CompressError(
                f"{pass_name}: no default {self.option} without calibration data: from the "
                f"weights alone it lost over 5 top-1 points on a shared model at every "
                f"{self.option} measured ({DECISION}); give your data with --data/--images, "
                f"or set --opt {pass_name}.{self.option}=X to accept a weight-only result"
            )
        return self.weight_only, (
            f"no calibration data: default {self.option} {self.weight_only:g}, the budget "
            f"weight-only fits survive on the shared models ({DECISION}); give --data for "
            f"{self.with_data:g}, checked on your inputs"
        )

    def _weight_only_text(self) -> str:
        return "none" if self.weight_only is None else f"{self.weight_only:g}"
