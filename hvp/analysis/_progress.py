"""Rich progress display for the stages of an analysis (one line per stage).

Each algorithm runs as one compiled call (the Lanczos iterations live inside a
``lax.while_loop``), so progress is shown per stage: a spinner and the elapsed
time while it runs, then its cost (matvecs) when it ends. Reading the data
advances per batch.
"""

from __future__ import annotations

import contextlib

__all__ = ["Stages"]


class _NullStage:
    def done(self, text: str = "") -> None:
        pass

    def advance_to(self, completed: int) -> None:
        pass


class _Stage(_NullStage):
    def __init__(self, progress, task):
        self._progress = progress
        self._task = task

    def done(self, text: str = "") -> None:
        self._progress.update(self._task, info=text)

    def advance_to(self, completed: int) -> None:
        self._progress.update(self._task, completed=completed)


class Stages:
    """Context manager showing one rich progress line per stage (no-op when disabled)."""

    def __init__(self, *, enabled: bool = True, console=None):
        self.enabled = enabled
        self._console = console
        self._progress = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            console = self._console or Console(stderr=True)
            if not console.is_terminal and self._console is None:
                # not a terminal (a log file, a pipe, a test): no progress lines, stderr stays clean
                self.enabled = False
                return self
            self._progress = Progress(
                SpinnerColumn(finished_text="[green]✓"),
                TextColumn("{task.description}"),
                BarColumn(bar_width=24),
                TimeElapsedColumn(),
                TextColumn("[dim]{task.fields[info]}"),
                console=console,
            )
            self._progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.__exit__(*exc)
            self._progress = None
        return False

    @contextlib.contextmanager
    def stage(self, description: str, *, total: int | None = None):
        if self._progress is None:
            yield _NullStage()
            return
        task = self._progress.add_task(description, total=total, info="")
        try:
            yield _Stage(self._progress, task)
        except BaseException:
            self._progress.update(task, info="[red]failed")
            self._progress.stop_task(task)
            raise
        t = self._progress.tasks[task]
        # mark complete (an unknown total becomes the count reached, at least 1)
        final = t.total if t.total is not None else max(t.completed, 1)
        self._progress.update(task, total=final, completed=final)
        self._progress.stop_task(task)
