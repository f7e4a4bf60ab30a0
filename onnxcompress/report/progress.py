"""Progress on the terminal (stderr) for the CLI: one line naming the pipeline's current step,
and a bar per long loop (done/total, elapsed, time remaining) that passes and the pipeline
open through `PassContext.progress`. The library itself never draws anything."""

from __future__ import annotations

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

    def __enter__(self) -> TerminalProgress:
        self._progress.start()
        self._step = self._progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def step(self, name: str) -> None:
        """Name the pipeline step under way (load, analyse, pass svd, ...)."""
        if self._step is not None:
            self._progress.reset(self._step, description=f"{name} …", total=None)

    def __call__(self, description: str, total: int | None = None) -> _TerminalTask:
        return _TerminalTask(self._progress, description, total)


class _TerminalTask:
    """One bar: added on enter, removed on exit so finished loops do not pile up."""

    def __init__(self, progress: Progress, description: str, total: int | None) -> None:
        self._progress = progress
        self._description = description
        self._total = total
        self._id: TaskID | None = None

    def __enter__(self) -> _TerminalTask:
        self._id = self._progress.add_task(f"  {self._description}", total=self._total)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._id is not None:
            self._progress.remove_task(self._id)
            self._id = None

    def advance(self, n: int = 1) -> None:
        if self._id is not None:
            self._progress.advance(self._id, n)
