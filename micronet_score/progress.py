"""Progress on a terminal for the commands' steps (loading a checkpoint, counting an example input, measuring
each checkpoint of a comparison, writing a report).

Evaluations over data draw their own bars (tokens/s, images/s); this bar covers the steps around them, so that
no command sits silent for more than a second on a terminal. Nothing is drawn when stderr is not a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
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
