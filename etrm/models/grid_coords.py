"""Grid coordinates as embeddings (`arch.grid_coords`): where a cell sits in its own grid, from all four sides.

TRM knows positions only through 1-D RoPE over the flattened 30×30 canvas: a fixed offset
(a translation) is a relative position, but a flip or a transpose maps cell (i, j) to a cell
whose canvas offset depends on (i, j) and on the grid's size. With each cell's row and column
counted from the top-left *and* from the bottom-right of its grid, out(i, j) = in(h−1−i, j)
becomes "my row from the top equals its row from the bottom": a match attention can learn.
Cells outside the grid (EOS, PAD) share one extra index. Off by default, so the model computes
TRM's function and loads its checkpoints; on, it is a new set of embedding tables.
"""

from __future__ import annotations

import torch
from torch import nn

from etrm.data.encoding import CANVAS, COLOR_OFFSET
from etrm.models.layers import CastedEmbedding

OUTSIDE = CANVAS  # the index of every cell outside its grid
SLOTS = CANVAS + 1


def grid_shape(tokens: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [N, side·side] (a grid at the top-left of a side×side canvas) → (height [N], width [N])."""
    cells = tokens.view(-1, side, side) >= COLOR_OFFSET
    return cells.any(dim=2).sum(dim=1), cells.any(dim=1).sum(dim=1)


def grid_coordinates(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """tokens [N, side·side] (a grid at the top-left of a side×side canvas) → [N, side·side, 4] int64:
    (row from the top, column from the left, rows below, columns to the right) inside the grid, OUTSIDE elsewhere.
    """
    height, width = (extent.view(-1, 1, 1) for extent in grid_shape(tokens, side))
    row = torch.arange(side, device=tokens.device).view(1, side, 1)
    col = torch.arange(side, device=tokens.device).view(1, 1, side)
    shape = (tokens.shape[0], side, side)
    coords = torch.stack(
        (
            row.expand(shape),
            col.expand(shape),
            (height - 1 - row).expand(shape),
            (width - 1 - col).expand(shape),
        ),
        dim=-1,
    )
    inside = ((row < height) & (col < width)).unsqueeze(-1)
    return torch.where(inside, coords, OUTSIDE).view(tokens.shape[0], side * side, 4)


class GridCoordinateEmbedding(nn.Module):
    """Sum of learned embeddings of the coordinates `grid_coordinates` gives (or a subset of them)."""

    def __init__(self, width: int, init_std: float, which: tuple[int, ...] = (0, 1, 2, 3)):
        super().__init__()
        self.which = which
        self.tables = nn.ModuleList(CastedEmbedding(SLOTS, width, init_std) for _ in which)

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        """coords [..., 4] → [..., width]."""
        out = self.tables[0](coords[..., self.which[0]])
        for table, index in zip(self.tables[1:], self.which[1:], strict=True):
            out = out + table(coords[..., index])
        return out
