"""Progress on the terminal (stderr) for the CLI: one line naming the pipeline's current step,
and a bar per long loop (done/total, elapsed, time remaining) that passes and the pipeline
open through `PassContext.progress`. A pass that outlines its loops (`PassContext.outline`)
gets one estimate of its time left on the step line, from how far its outlined loops are.
The library itself never draws anything."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text


class _CountedOnly(ProgressColumn):
    """Shows its column only for tasks with a known total (the step line has none)."""

    def __init__(self, column: ProgressColumn) -> None:
        super().__init__()
        self.column = column

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        return self.column.render(task)  # type: ignore[return-value]


class TerminalProgress:
    """Context manager around a rich `Progress`; call it as a `PassContext.progress` hook,
    and give `step` to `compress(on_step=...)` for the pipeline's own steps."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            _CountedOnly(BarColumn()),
            _CountedOnly(MofNCompleteColumn()),
            TimeElapsedColumn(),
            _CountedOnly(TimeRemainingColumn()),
            console=console,
            transient=True,
        )
        self._step: TaskID | None = None
        self._step_name = ""
        self._estimate: _Estimate | None = None

    def __enter__(self) -> TerminalProgress:
        self._progress.start()
        self._step = self._progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def step(self, name: str) -> None:
        """Name the pipeline step under way (load, analyse, pass svd, ...)."""
        self._step_name, self._estimate = name, None
        if self._step is not None:
            self._progress.reset(self._step, description=f"{name} …", total=None)

    def outline(self, shares: dict[str, float]) -> None:
        """The current pass's loops and their shares of its time (`PassContext.outline`)."""
        self._estimate = _Estimate(shares)

    def __call__(self, description: str, total: int | None = None) -> _TerminalTask:
        return _TerminalTask(self._progress, description, total, self._moved)

    def _moved(self, description: str, done: int, total: int | None) -> None:
        """A loop moved: the step line gets the pass's estimate of its time left."""
        if self._estimate is None or self._step is None:
            return
        left = self._estimate.left(description, done, total)
        if left is not None:
            text = f"{self._step_name} … about {_minutes(left)} left"
            self._progress.update(self._step, description=text)


class _Estimate:
    """Time left of a pass from its outline: the share of its time done is the shares of the
    outlined loops finished plus the running one's share times its done/total; the time left
    is the time so far scaled by what remains (said only once 2 % is done)."""

    def __init__(self, shares: dict[str, float]) -> None:
        total = sum(shares.values()) or 1.0
        self.shares = {name: share / total for name, share in shares.items()}
        self.finished: set[str] = set()
        self.start = time.monotonic()

    def left(self, description: str, done: int, total: int | None) -> float | None:
        if description not in self.shares:
            return None
        if total is not None and done >= total:
            self.finished.add(description)
        share_done = sum(self.shares[name] for name in self.finished)
        if description not in self.finished and total:
            share_done += self.shares[description] * done / total
        if share_done < 0.02:
            return None
        return (time.monotonic() - self.start) * (1 - share_done) / share_done


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}:{int(seconds % 60):02d}"


class _TerminalTask:
    """One bar: added on enter, removed on exit so finished loops do not pile up."""

    def __init__(self, progress: Progress, description: str, total: int | None, moved) -> None:
        self._progress = progress
        self._description = description
        self._total = total
        self._moved = moved  # (description, done, total) -> None
        self._done = 0
        self._id: TaskID | None = None

    def __enter__(self) -> _TerminalTask:
        self._id = self._progress.add_task(f"  {self._description}", total=self._total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._id is not None:
            self._progress.remove_task(self._id)
            self._id = None
            if self._total is not None:  # a loop left early is done all the same
                self._moved(self._description, self._total, self._total)

    def advance(self, n: int = 1) -> None:
        if self._id is not None:
            self._progress.advance(self._id, n)
            self._done += n
            self._moved(self._description, self._done, self._total)
