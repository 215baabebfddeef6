"""A bank of whole-grid coordinate maps scored on the demos (`arch.grid_maps`).

Moving cells by a symmetry or an offset is where the learned parts fail on a CPU budget: with
1-D RoPE over the canvas, "my output cell reads input cell (W−1−j, i)" is a relation between
positions that depends on the grid's size, and neither the pooled context nor the per-cell
lookup carries it (0 pass@1 on unseen dihedral and translate puzzles after 15 CPU minutes,
benchmarks/RESULTS.md).
This module gives the model those moves as a prior instead of asking it to discover them:

- the bank: every map "one of the 8 grid symmetries, then a shift by (dy, dx), |dy|, |dx| ≤ k"
  (cells shifted off the grid are lost, vacated cells are background 0). Each map turns a grid
  into a grid, with its own output size, so it turns a canvas into a canvas, EOS included.
- scores: on each demo, the fraction of canvas cells where the map applied to the demo input
  gives the demo output's token; per puzzle the mean and the minimum over its demos. A map
  that explains every demo scores 1 on both.
- the answer's candidates: each map applied to the query input, as a canvas.
- the result: per query cell, the candidates' tokens weighted by a softmax over the maps of
  (a · mean + b · min) with a, b learned, embedded through a learned table, plus a learned vector
  times the best minimum (how far a single map explains the demos). It is added to the
  decoder's token embeddings, as the cell lookup's result is.

What is learned is when to trust the bank (colour remapping, gravity and any rule outside it
score below 1) and what to do with its candidate. The candidates themselves are not learned: a
family whose rule is in the bank (dihedral, translate) is a test of that choice, not of
discovering the move, and a researcher reading scores with this option on should count it so.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import nn

from etrm.data.augment import NUM_DIHEDRAL, apply_dihedral
from etrm.data.encoding import CANVAS, COLOR_OFFSET, EOS_TOKEN, PAD_TOKEN, VOCAB_SIZE
from etrm.models.encoder_parts import mean_over_present
from etrm.models.grid_coords import canvas_corner, grid_shape
from etrm.models.layers import CastedEmbedding


def _dihedral_flags() -> list[tuple[int, int, int]]:
    """(transpose, flip rows, flip columns) of each dataset dihedral id, read off `apply_dihedral`.

    A map with these flags sends output cell (a, b) of the H'×W' result to input cell
    (b', a') if transposed else (a', b'), where a' = H'−1−a if rows are flipped else a (and
    likewise b' with W'). Found by trying the 8 flag sets on an index grid, so the bank uses
    the dataset's ids without restating `apply_dihedral`'s formulas.
    """
    grid = np.arange(6).reshape(2, 3)
    flags = []
    for dihedral in range(NUM_DIHEDRAL):
        want = apply_dihedral(grid, dihedral)
        for transpose, flip_rows, flip_cols in itertools.product((0, 1), repeat=3):
            got = grid.T if transpose else grid
            got = got[::-1] if flip_rows else got
            got = got[:, ::-1] if flip_cols else got
            if got.shape == want.shape and np.array_equal(got, want):
                flags.append((transpose, flip_rows, flip_cols))
                break
    assert len(flags) == NUM_DIHEDRAL
    return flags


DIHEDRAL_FLAGS = _dihedral_flags()


# Rows of [rows, maps, cells] index tensors built at once: bounds the bank's memory on a full
# 30×30 canvas (200 maps × 900 cells per grid) to about 256 MB of int64 whatever the batch.
CHUNK_ELEMENTS = 1 << 25


def map_bank(max_shift: int) -> torch.Tensor:
    """[R, 5] int64 rows (transpose, flip rows, flip columns, dy, dx), R = 8·(2k+1)²: each dataset
    dihedral id (0-7, in order) followed by every shift, dy-major (`map_of` finds a row)."""
    shifts = range(-max_shift, max_shift + 1)
    rows = [(*flags, dy, dx) for flags in DIHEDRAL_FLAGS for dy in shifts for dx in shifts]
    return torch.tensor(rows, dtype=torch.int64)


def map_of(dihedral: int, dy: int, dx: int, max_shift: int) -> int:
    """The bank row of `apply_dihedral(·, dihedral)` followed by a shift (dy, dx)."""
    side = 2 * max_shift + 1
    return dihedral * side * side + (dy + max_shift) * side + (dx + max_shift)


# What an output cell that reads no input cell holds: indices past the canvas's cells, into the
# three tokens `transform_canvases` appends to each canvas.
_FILLERS = (COLOR_OFFSET, EOS_TOKEN, PAD_TOKEN)  # background colour 0 (shifted in), EOS, PAD
_BACKGROUND, _EOS, _PAD = (CANVAS * CANVAS + k for k in range(3))


def source_cells(height: torch.Tensor, width: torch.Tensor, maps: torch.Tensor, side: int) -> torch.Tensor:
    """Grid shapes height, width [U] → [U, R, side·side] int64: for each map and each cell of the
    result's side×side corner, the input's canvas cell it copies, or _BACKGROUND, _EOS, _PAD."""
    u = height.shape[0]
    height, width = height.view(u, 1, 1, 1), width.view(u, 1, 1, 1)
    transpose, flip_rows, flip_cols, dy, dx = (maps[:, k].view(1, -1, 1, 1) for k in range(5))
    out_h = torch.where(transpose.bool(), width, height)  # [U, R, 1, 1]
    out_w = torch.where(transpose.bool(), height, width)
    row = torch.arange(side, device=height.device).view(1, 1, side, 1)
    col = torch.arange(side, device=height.device).view(1, 1, 1, side)
    inside = (row < out_h) & (col < out_w)
    eos = ((row == out_h) & (col < out_w)) | ((col == out_w) & (row < out_h))
    # Undo the shift, then the symmetry: where in the input each output cell comes from.
    a, b = row - dy, col - dx
    from_grid = (a >= 0) & (a < out_h) & (b >= 0) & (b < out_w)
    a = torch.where(flip_rows.bool(), out_h - 1 - a, a)
    b = torch.where(flip_cols.bool(), out_w - 1 - b, b)
    source = torch.where(transpose.bool(), b * CANVAS + a, a * CANVAS + b)
    filler = torch.where(eos, _EOS, _PAD)
    return torch.where(inside, torch.where(from_grid, source, _BACKGROUND), filler).view(u, maps.shape[0], -1)


def transform_canvases(tokens: torch.Tensor, maps: torch.Tensor, side: int) -> torch.Tensor:
    """tokens [N, 900] (a grid at the top-left of the 30×30 canvas, TRM encoding), maps [R, 5]
    (`map_bank`) → [N, R, side·side] uint8: each map applied to each grid, as the top-left
    side×side corner of the result's canvas (colours, EOS below and right of the grid, PAD elsewhere).

    Where each cell comes from depends only on the grid's shape, so it is worked out once per
    distinct shape of the batch (`torch.unique`: one host sync on a GPU); each grid is then one gather.
    """
    n = tokens.shape[0]
    height, width = grid_shape(tokens, CANVAS)
    shapes, which = torch.unique(height * (CANVAS + 1) + width, return_inverse=True)
    sources = source_cells(shapes // (CANVAS + 1), shapes % (CANVAS + 1), maps, side)  # [U, R, S]
    fillers = torch.tensor(_FILLERS, dtype=torch.uint8, device=tokens.device).expand(n, -1)
    extended = torch.cat((tokens.to(torch.uint8), fillers), dim=1)  # [N, 903]
    return extended.gather(1, sources[which].view(n, -1)).view(n, maps.shape[0], side * side)


def demo_agreement(
    inputs: torch.Tensor, outputs: torch.Tensor, present: torch.Tensor, maps: torch.Tensor, side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs, outputs [N, 900] of the N present demos (row-major order of `present` [B, D]) →
    (mean [B, R], min [B, R]) over each sample's demos of the fraction of cells where the map of
    the input matches the output. Cells counted: the side×side corner cells where either canvas
    is not PAD. A sample without demos scores 0 on both."""
    fraction = torch.cat(
        [
            _match_fraction(x, y, maps, side)
            for x, y in zip(*(t.split(_chunk_rows(maps, side)) for t in (inputs, outputs)), strict=True)
        ]
    )  # [N, R]
    b, r = present.shape[0], maps.shape[0]
    owner = present.nonzero()[:, 0]
    low = fraction.new_ones(b, r).scatter_reduce(0, owner[:, None].expand(-1, r), fraction, "amin")
    return mean_over_present(fraction, present), torch.where(present.any(dim=1, keepdim=True), low, 0.0)


def _chunk_rows(maps: torch.Tensor, side: int) -> int:
    return max(1, CHUNK_ELEMENTS // (maps.shape[0] * side * side))


def _match_fraction(
    inputs: torch.Tensor, outputs: torch.Tensor, maps: torch.Tensor, side: int
) -> torch.Tensor:
    candidates = transform_canvases(inputs, maps, side)
    target = canvas_corner(outputs, side).to(torch.uint8)[:, None, :]
    counted = (candidates != PAD_TOKEN) | (target != PAD_TOKEN)
    hits = ((candidates == target) & counted).sum(dim=2)
    return hits.float() / counted.sum(dim=2).clamp(min=1).float()


class GridMapBank(nn.Module):
    """Scores the bank on a sample's demos and hands each query cell its candidates' tokens, weighted."""

    SCORE_SCALE = 10.0  # the two score weights are stored ÷ this, as CellLookup's colour weights are

    def __init__(self, hidden_size: int, side: int, max_shift: int):
        super().__init__()
        self.side = side
        self.register_buffer("maps", map_bank(max_shift), persistent=False)
        # Start decisive (weights 10 and 10): a map explaining every demo outweighs one that misses a
        # tenth of one demo's cells by a logit of more than 1.
        self.score_weights = nn.Parameter(torch.full((2,), 10.0 / self.SCORE_SCALE))
        std = 1.0 / math.sqrt(hidden_size)
        self.candidate_embedding = CastedEmbedding(VOCAB_SIZE, hidden_size, std)
        self.confidence = nn.Parameter(torch.zeros(hidden_size))

    def forward(
        self, inputs: torch.Tensor, outputs: torch.Tensor, present: torch.Tensor, query: torch.Tensor
    ) -> torch.Tensor:
        """inputs, outputs [N, 900] present demos; present [B, D]; query [B, 900] → [B, side², hidden]."""
        mean, low = demo_agreement(inputs, outputs, present, self.maps, self.side)
        weights = self.score_weights * self.SCORE_SCALE
        choice = torch.softmax(weights[0] * mean + weights[1] * low, dim=1)  # [B, R]
        rows = _chunk_rows(self.maps, self.side)
        mixture = torch.cat(
            [self._mixture(q, c) for q, c in zip(query.split(rows), choice.split(rows), strict=True)]
        )
        per_cell = mixture @ self.candidate_embedding.embedding_weight
        best = low.max(dim=1).values
        return per_cell + best[:, None, None] * self.confidence

    def _mixture(self, query: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """[B, S, vocab]: the weight the chosen maps give each token at each query cell."""
        candidates = transform_canvases(query, self.maps, self.side).long()  # [B, R, S]
        b, r, cells = candidates.shape
        vocab = self.candidate_embedding.embedding_weight.shape[0]
        return choice.new_zeros(b, cells, vocab).scatter_add_(
            2, candidates.transpose(1, 2), choice[:, None, :].expand(b, cells, r)
        )
