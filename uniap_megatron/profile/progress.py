"""Progress of a profile run on stderr (rich), shown by rank 0 only."""

from __future__ import annotations


class Reporter:
    def __init__(self, *, enabled: bool, total: int):
        self.enabled = enabled and total > 0
        self.progress = None
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("profiling"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[what]}"), console=Console(stderr=True), transient=True,
            )
            self.task = self.progress.add_task("profile", total=total, what="")

    def __enter__(self) -> Reporter:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def step(self, what: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, what=what)
