"""How a distillation trains (`Schedule`) and the defaults every pass that distils shares
(`distill`, `rdprune.retrain_steps`); no torch here, so a pass can build one before it loads."""

from __future__ import annotations

from dataclasses import dataclass

# AdamW's learning rate and the batch (docs/decisions.md#distill-issue-24).
DEFAULT_LR = 3e-4
DEFAULT_BATCH = 64
# Share of the calibration samples held out to choose the best weights.
DEFAULT_HOLDOUT = 0.1


@dataclass(frozen=True)
class Schedule:
    """How long and how to train."""

    steps: int
    lr: float
    batch_size: int
    seed: int
    threads: int
    time_limit: float | None = None
    # Image augmentations of each training batch ("flip", "shift"), teacher and student alike.
    augment: tuple[str, ...] = ()
    # Graph outputs shaped (batch, classes) matched by KL of their softmaxes instead of MSE.
    kl: bool = False
    device: str = "cpu"  # where torch trains: "cpu" or "cuda" (see torch_distill.device_for)
