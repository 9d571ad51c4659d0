"""Rich progress bars that show rows/s and tokens/s, for every long step."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

console = Console(stderr=True, soft_wrap=True)  # an error line stays one line, whatever the width


class RateColumn(ProgressColumn):
    """rows/s and tokens/s since the bar started."""

    def render(self, task) -> Text:
        elapsed = task.elapsed or 0.0
        if elapsed <= 0 or not task.completed:
            return Text("", style="progress.data.speed")
        return Text(
            f"{task.completed / elapsed:.2f} rows/s {task.fields.get('tokens', 0) / elapsed:.1f} tok/s",
            style="progress.data.speed",
        )


@contextmanager
def progress_bar(description: str, total: int, already_done: int = 0) -> Iterator[Callable[[int, int], None]]:
    """Yields `advance(rows, tokens)`. Rows done by an earlier, interrupted run are announced
    and left out of the bar, so its rates are this run's."""
    if already_done:
        console.print(f"  resuming {description}: {already_done} rows already written, {total} to go")
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
    )
    with progress:
        task = progress.add_task(description, total=total, tokens=0)
        tokens = 0

        def advance(rows: int, new_tokens: int = 0) -> None:
            nonlocal tokens
            tokens += new_tokens
            progress.update(task, advance=rows, tokens=tokens)

        yield advance
