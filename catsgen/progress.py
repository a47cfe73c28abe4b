"""Progress bars on stderr (rich.progress): on a terminal one bar redrawn in place with the rate
and the time left; when stderr is not a terminal (logs, pipes, tests), only the final state once."""

from __future__ import annotations

import os

import rich.progress
from rich.console import Console
from rich.text import Text


class _RateColumn(rich.progress.ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(f"{task.speed:.0f} {self.unit}/s" if task.speed else f"? {self.unit}/s")


class Progress:
    """`with Progress("calibrating", total) as p: ... p.update(done)`."""

    def __init__(self, label: str, total: int, unit: str = "tokens"):
        self.total, self.done = total, 0
        console = Console(stderr=True)  # resolves sys.stderr when it writes
        self._bar = rich.progress.Progress(
            rich.progress.TextColumn("{task.description}"), rich.progress.BarColumn(),
            rich.progress.MofNCompleteColumn(), rich.progress.TextColumn(unit), _RateColumn(unit),
            rich.progress.TimeElapsedColumn(), rich.progress.TextColumn("eta"), rich.progress.TimeRemainingColumn(),
            console=console, auto_refresh=console.is_terminal,
            disable=os.environ.get("RANK", "0") != "0")  # under torchrun, rank 0 alone draws
        self._task = self._bar.add_task(label, total=total)
        self._bar.start()

    def update(self, done: int):
        self.done = done
        self._bar.update(self._task, completed=done)

    def close(self):
        self._bar.stop()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc):
        self.close()
