"""The run's verdict, one line a user can act on: deployable, lossy, broken or not validated,
judged from the validation figures; and the warning when the figures rest on made-up inputs.
The thresholds are chosen, not measured: see docs/decisions.md#the-verdict-chosen-not-measured."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from scipy.stats import norm

DEPLOYABLE, LOSSY, BROKEN, NOT_VALIDATED = "deployable", "lossy", "broken", "not validated"

# At most 1 prediction in 100 changed: at most 1 top-1 point lost, the accuracy tolerance.
DEPLOYABLE_AGREEMENT = 0.99
# 1 top-1 point: the loss the README's results table accepts as "at its best setting".
DEPLOYABLE_ACCURACY_DROP = 0.01
# Outputs that are not class scores: an error a twentieth of the output's size.
DEPLOYABLE_REL_L2 = 0.05
# Most predictions changed: the model no longer does the original's job.
BROKEN_AGREEMENT = 0.5
# The result keeps under half the original's accuracy.
BROKEN_ACCURACY_KEPT = 0.5
# An error 0.8 the size of the output (1.0 is what outputting zeros scores).
BROKEN_REL_L2 = 0.8
# At 200 samples the 95 % interval of a 99 % agreement still reaches down to 96.4 %; on
# fewer, a figure is said to be uncertain (its interval is always given).
UNCERTAIN_BELOW = 200
CONFIDENCE = 0.95


def wilson_interval(
    successes: int, total: int, confidence: float = CONFIDENCE
) -> tuple[float, float]:
    """Wilson score interval of a proportion `successes / total` (better than p ± z·se near
    0 and 1, where agreement figures live)."""
    if total < 1 or not 0 <= successes <= total:
        raise ValueError(f"need 0 <= successes <= total and total >= 1, got {successes}/{total}")
    z = float(norm.ppf(0.5 + confidence / 2))
    share = successes / total
    spread = z * z / total
    centre = (share + spread / 2) / (1 + spread)
    half = z * math.sqrt(share * (1 - share) / total + spread / (4 * total)) / (1 + spread)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass
class _Figures:
    """The worst of each figure over the model's outputs."""

    samples: int
    worst_rel_l2: float
    signal_rel_l2: float | None  # over outputs that are not class scores
    agreement: float | None
    accuracy_original: float | None
    accuracy_result: float | None

    @classmethod
    def of(cls, validation: dict[str, Any]) -> _Figures:
        outputs = [o for o in validation["outputs"].values() if not o.get("empty")]
        scores = [o for o in outputs if o.get("top1_agreement") is not None]
        signals = [o["rel_l2"] for o in outputs if o.get("top1_agreement") is None]
        labelled = [o for o in scores if o.get("accuracy_result") is not None]
        worst = min(
            labelled, key=lambda o: o["accuracy_result"] - o["accuracy_original"], default={}
        )
        return cls(
            samples=validation["samples"],
            worst_rel_l2=max((o["rel_l2"] for o in outputs), default=0.0),
            signal_rel_l2=max(signals, default=None),
            agreement=min((o["top1_agreement"] for o in scores), default=None),
            accuracy_original=worst.get("accuracy_original"),
            accuracy_result=worst.get("accuracy_result"),
        )

    def kind(self) -> str:
        if self.broken():
            return BROKEN
        fine = self.signal_rel_l2 is None or self.signal_rel_l2 <= DEPLOYABLE_REL_L2
        if self.accuracy_result is not None:
            fine &= self.accuracy_original - self.accuracy_result <= DEPLOYABLE_ACCURACY_DROP
        elif self.agreement is not None:
            fine &= self.agreement >= DEPLOYABLE_AGREEMENT
        return DEPLOYABLE if fine else LOSSY

    def broken(self) -> bool:
        """Far from the original. A proportion counts only when even its interval's upper end
        is under the limit: exit 1 needs evidence, not one unlucky sample of three."""
        if not math.isfinite(self.worst_rel_l2):
            return True
        # Class scores are judged by the predictions: logits can move far (a rescaled or
        # flattened softmax) while top-1 holds. not (x < limit): NaN counts as broken.
        if self.signal_rel_l2 is not None and not self.signal_rel_l2 < BROKEN_REL_L2:
            return True
        if self.agreement is not None and self._upper(self.agreement) < BROKEN_AGREEMENT:
            return True
        if self.accuracy_original:  # an original never right has no accuracy to lose
            kept = self._upper(self.accuracy_result) / self.accuracy_original
            return kept < BROKEN_ACCURACY_KEPT
        return False

    def _upper(self, share: float) -> float:
        return wilson_interval(round(share * self.samples), self.samples)[1]


def judge(validation: dict[str, Any]) -> dict[str, Any]:
    """The verdict (JSON-ready): kind, one line of text, and the figures it rests on."""
    if not validation.get("validated", True):
        text = f"not validated: {validation.get('detail') or validation['status']}"
        return {"kind": NOT_VALIDATED, "text": text, "samples": 0}
    figures = _Figures.of(validation)
    entry: dict[str, Any] = {
        "kind": figures.kind(),
        "samples": figures.samples,
        "worst_rel_l2": figures.worst_rel_l2,
        "confidence": CONFIDENCE,
    }
    if figures.accuracy_result is not None:
        entry.update(
            accuracy_original=figures.accuracy_original,
            accuracy_result=figures.accuracy_result,
            accuracy_result_interval=_interval(figures.accuracy_result, figures.samples),
        )
    if figures.agreement is not None:
        entry["top1_agreement"] = figures.agreement
        entry["top1_agreement_interval"] = _interval(figures.agreement, figures.samples)
    # Only proportions get intervals; a relative L2 is a measured figure, not an estimate.
    proportions = figures.agreement is not None or figures.accuracy_result is not None
    entry["uncertain"] = proportions and figures.samples < UNCERTAIN_BELOW
    entry["text"] = _text(entry, validation)
    return entry


def _text(entry: dict[str, Any], validation: dict[str, Any]) -> str:
    """The verdict's line: kind, the figures with their intervals, what they were measured on."""
    parts = []
    if "accuracy_result" in entry:
        parts.append(_accuracy_text(entry))
    if "top1_agreement" in entry:
        parts.append(f"top-1 agreement {share_text(entry, 'top1_agreement')}")
    parts.append(f"worst relative L2 {entry['worst_rel_l2']:.3g}")
    basis = f"on {entry['samples']} {_samples_word(validation)}"
    if entry["uncertain"]:
        basis += f" (under {UNCERTAIN_BELOW}: uncertain figures)"
    far = "outputs far from the original's: " if entry["kind"] == BROKEN else ""
    return f"{entry['kind']}: {far}{', '.join(parts)} {basis}"


def _interval(share: float, samples: int) -> list[float] | None:
    if samples < 1:
        return None
    return list(wilson_interval(round(share * samples), samples))


def share_text(entry: dict[str, Any], key: str) -> str:
    """A proportion of the verdict (`key`) in percent, with its interval when it has one."""
    interval = entry.get(f"{key}_interval")
    text = f"{100 * entry[key]:.1f}%"
    if interval is None:
        return text
    low, high = (100 * bound for bound in interval)
    return f"{text} ({100 * CONFIDENCE:.0f}% CI {low:.1f}–{high:.1f}%)"


def _accuracy_text(entry: dict[str, Any]) -> str:
    return (
        f"top-1 accuracy {100 * entry['accuracy_original']:.1f}% → "
        f"{share_text(entry, 'accuracy_result')} ({accuracy_change(entry)})"
    )


def accuracy_change(entry: dict[str, Any]) -> str:
    """The verdict's accuracy change in top-1 points, signed."""
    return f"{100 * (entry['accuracy_result'] - entry['accuracy_original']):+.1f} points"


def _samples_word(validation: dict[str, Any]) -> str:
    if validation.get("source", "").startswith("random"):
        return "random inputs, not your data"
    return "held-out samples" if "held-out" in validation.get("source", "") else "samples"


def weight_only_warning(passes: list[str]) -> str:
    """What a run without the user's data cannot promise, and how to give the data."""
    return (
        f"no calibration data: {', '.join(passes)} changed the weights from the weights alone "
        "(nothing refit on real inputs), and the result was validated only on made-up random "
        "inputs; give your data with --data FILE.npz (one array per input name) or "
        "--images DIR --preprocess SPEC"
    )
