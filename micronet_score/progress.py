"""Progress on a terminal for the commands' steps (loading a checkpoint, counting an example input, measuring
each checkpoint of a comparison, writing a report).

Evaluations over data draw their own bars (tokens/s, images/s); this bar covers the steps around them, so that
no command sits silent for more than a second on a terminal. Nothing is drawn when stderr is not a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class Steps:
    """A bar over ``total`` steps: ``step("loading a.pt")`` finishes the previous step and names the next;
    ``pause()`` takes the bar off the screen while another bar (an evaluation's) runs."""

    def __init__(self, progress, task):
        self._progress, self._task, self._started = progress, task, False

    def step(self, description: str) -> None:
        if self._progress is None:
            return
        if self._started:
            self._progress.advance(self._task)
        self._started = True
        self._progress.update(self._task, description=description)
        self._progress.start()

    @contextmanager
    def paused(self) -> Iterator[None]:
        if self._progress is not None:
            self._progress.stop()
        yield

    def finish(self) -> None:
        if self._progress is not None:
            self._progress.stop()


@contextmanager
def steps(total: int, show: bool | None = None) -> Iterator[Steps]:
    """A transient bar of ``total`` named steps on stderr (``show`` None: when stderr is a terminal)."""
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        yield Steps(None, None)
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=Console(stderr=True), transient=True)
    bar = Steps(progress, progress.add_task("", total=total))
    try:
        yield bar
    finally:
        bar.finish()


@contextmanager
def rate_bar(total: int, label: str, unit: str, show: bool | None = None) -> Iterator[Callable[[int], None]]:
    """Yields ``advance(n)``: a bar over ``total`` units (``"tok"``, ``"images"``, or ``"bytes"``) with the rate and
    the time left, kept on stderr when done; drawn only when ``show`` (None: when stderr is a terminal)."""
    if show is None:
        show = sys.stderr.isatty()
    if not show:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TaskProgressColumn,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:,.0f} {unit}/s" if speed else f"- {unit}/s", style="progress.data.speed")

    counted = (DownloadColumn(), TransferSpeedColumn()) if unit == "bytes" else (
        TaskProgressColumn(), MofNCompleteColumn(), Rate())
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), *counted, TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
