"""What auto's search is told: its own settings, made by the `auto` pass from the user's options
(the search never reads a pass's options type)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SearchSettings:
    """The budget and how the search spends it.

    `kind` is latency, macs or bytes and `target` the fraction of the original's to keep;
    `methods` the candidate method names and `align` their rank alignment; `jobs` the worker
    processes for sensitivity; `max_rel_l2` / `max_accuracy_drop` the user's tolerance (None:
    none); `blocks` whether rounds with whole residual blocks removed are tried."""

    kind: str
    target: float
    methods: tuple[str, ...]
    align: int = 8
    sensitivity_samples: int = 64
    jobs: int = 1
    refit: bool = True
    max_rel_l2: float | None = None
    max_accuracy_drop: float | None = None
    latency_basis: str = "layer"
    blocks: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("latency", "macs", "bytes"):
            raise ValueError(f"kind must be latency, macs or bytes, got {self.kind!r}")

    @property
    def latency_target(self) -> float | None:
        """The target when it is a latency, else None (rounds are then chosen on error)."""
        return self.target if self.kind == "latency" else None

    def usable_error(self, cliff: float) -> float | None:
        """The output error over which a plan counts as broken: none when the user set a
        tolerance (the back-off and the checks hold plans to it), else `cliff`."""
        if self.max_rel_l2 is not None or self.max_accuracy_drop is not None:
            return None
        return cliff
