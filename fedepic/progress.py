"""Rich progress bars on stderr for long work; a no-op when disabled, so callers need no branches."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class Bar:
    """One task of a rich Progress (or nothing)."""

    def __init__(self, progress: Optional[Progress], description: str, total: int, completed: int = 0) -> None:
        self._progress = progress
        # work done before (a resumed sweep's finished cells) starts the bar without counting in its pace
        self._task = progress.add_task(description, total=total, completed=completed, info="") if progress else None

    def advance(self, step: int = 1, **fields: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, advance=step, **fields)

    def describe(self, text: str) -> None:
        if self._progress is not None:
            self._progress.update(self._task, description=text)


@contextmanager
def progress_bars(enabled: bool) -> Iterator[Optional[Progress]]:
    if not enabled:
        yield None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True), transient=False,
    )
    with progress:
        yield progress


def bar(progress: Optional[Progress], description: str, total: int, completed: int = 0) -> Bar:
    return Bar(progress, description, total, completed)
