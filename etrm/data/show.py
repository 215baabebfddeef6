"""Terminal drawing of ARC grids (the standard ARC palette, two characters per cell)."""

from __future__ import annotations

import numpy as np
from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from etrm.console import console

ARC_PALETTE = (
    "#000000",  # 0 black
    "#0074D9",  # 1 blue
    "#FF4136",  # 2 red
    "#2ECC40",  # 3 green
    "#FFDC00",  # 4 yellow
    "#AAAAAA",  # 5 grey
    "#F012BE",  # 6 magenta
    "#FF851B",  # 7 orange
    "#7FDBFF",  # 8 light blue
    "#870C25",  # 9 maroon
)


def grid_text(grid: np.ndarray) -> Text:
    text = Text()
    for r, row in enumerate(np.asarray(grid)):
        if r:
            text.append("\n")
        for cell in row:
            text.append("  ", style=f"on {ARC_PALETTE[int(cell)]}")
    return text


def render_task(split, g: int, aug: int = 0) -> None:
    """Print every demo and query pair of group g under augmentation `aug`."""
    dihedral, colors = split.augmentation(g, aug)
    rows = []
    for kind, pairs in (("demo", split.demos(g)), ("query", split.queries(g))):
        for i, (inp, out) in enumerate(pairs):
            inp, out = split.augment_grid(inp, g, aug), split.augment_grid(out, g, aug)
            table = Table.grid(padding=(0, 2))
            table.add_row(
                f"{kind} {i} input {inp.shape[0]}x{inp.shape[1]}", f"output {out.shape[0]}x{out.shape[1]}"
            )
            table.add_row(grid_text(inp), grid_text(out))
            rows.append(table)
    title = (
        f"{split.puzzle_ids[g]} ({split.name} split, {split.puzzle_sources[g]}) - augmentation {aug} of "
        f"{split.num_augs(g)}: dihedral {dihedral}, colours {' '.join(map(str, colors.tolist()))}"
    )
    console.print(Panel(Group(*rows), title=title, expand=False))
