"""Terminal output shared by every command: rich console, progress bars, tables or JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

# Piped or captured output is not squeezed into 80 columns: tables keep one line per row.
console = Console(width=None if sys.stdout.isatty() else 200)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)


def make_progress(transient: bool = False) -> Progress:
    """A progress bar that draws only on a TTY (disabled in CI, pipes and tests)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=err_console,
        transient=transient,
        disable=not sys.stderr.isatty(),
    )


def print_json(obj: Any) -> None:
    """Machine-readable output on stdout (no rich markup)."""
    sys.stdout.write(json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "tolist"):
        return o.tolist()
    if hasattr(o, "__fspath__"):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def render_table(
    rows: Iterable[dict[str, Any]], columns: Sequence[str], title: str | None = None, floatfmt: str = ".4g"
) -> Table:
    table = Table(title=title, show_lines=False)
    for c in columns:
        table.add_column(c, overflow="fold")
    for row in rows:
        cells = []
        for c in columns:
            v = row.get(c, "")
            cells.append(format(v, floatfmt) if isinstance(v, float) else str(v))
        table.add_row(*cells)
    return table


def emit(rows: list[dict[str, Any]], columns: Sequence[str], as_json: bool, title: str | None = None) -> None:
    """Print a listing as a rich table, or as JSON with --json."""
    if as_json:
        print_json(rows)
    else:
        console.print(render_table(rows, columns, title=title))
