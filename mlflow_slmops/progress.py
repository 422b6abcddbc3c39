"""Progress bars for long work (rich), shared by the stages so they look alike."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)


def make_progress(enabled: bool = True) -> Progress:
    """A rich Progress on stderr; disabled it draws nothing (tests, --quiet, pipes stay clean)."""
    return Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), console=Console(file=sys.stderr), disable=not enabled, transient=False,
    )


class _SweepBar:
    def __init__(self, progress: Progress, total: int):
        self.progress = progress
        self.task = progress.add_task("sweep", total=total)

    def stage(self, variant: str, stage: str) -> None:
        self.progress.update(self.task, description=f"{variant}: {stage}")

    def advance(self) -> None:
        self.progress.advance(self.task)


@contextlib.contextmanager
def sweep_progress(total: int, enabled: bool = True) -> Iterator[_SweepBar]:
    """One bar over the variants; its label names the variant and the stage in flight."""
    with make_progress(enabled) as progress:
        yield _SweepBar(progress, total)
