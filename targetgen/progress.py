"""The one progress bar every long command shows (training, compare, sample, evaluate, fid-stats).

Descriptions and fields are shown as plain text, never as rich markup, so a
run name or path with brackets in it is printed as it is.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def progress_bar(
    unit: str = "", extra: str | None = None, console: Console | None = None, disable: bool = False
) -> Progress:
    """``description  ━━━━  done/total unit  elapsed  eta remaining  {extra field}``."""
    columns = [TextColumn("{task.description}", style="bold", markup=False), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns.append(TextColumn(unit, markup=False))
    columns += [TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    if extra:
        columns.append(TextColumn(f"{{task.fields[{extra}]}}", markup=False))
    return Progress(*columns, console=console, disable=disable)
