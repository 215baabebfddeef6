"""Augmentations: the 8 dihedral transforms x permutations of colours 1-9 (0 stays fixed).

A dataset stores each original grid once plus, per puzzle, a table of
(dihedral id, colour permutation) rows; no augmented copy is ever written to disk.
Batches are augmented on the fly: index tables over the 900 canvas positions give
every stored grid's canvas under each of the 8 transforms once (CanvasBank), and a
batch row is then that canvas with its colour cells looked up in the row's
colour permutation.

Dihedral id d = 4*f + k: flip left-right when f = 1, then rotate k quarter turns
counter-clockwise (np.rot90). Rotations invert by turning back; the four
reflections are their own inverses.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math

import numpy as np

from etrm.data.encoding import CANVAS, COLOR_OFFSET, EOS_TOKEN, NUM_COLORS, PAD_TOKEN, SEQ_LEN
from etrm.errors import EtrmError

NUM_DIHEDRAL = 8
DIHEDRAL_INVERSE = np.array([0, 3, 2, 1, 4, 5, 6, 7], dtype=np.uint8)
# Canvases are extended by two cells so that an index table can point at a PAD or an EOS.
PAD_SLOT = SEQ_LEN
EOS_SLOT = SEQ_LEN + 1
# Enumerate a puzzle's whole augmentation space when it is at most this many times num_aug.
_ENUMERATE_FACTOR = 4


def apply_dihedral(grid: np.ndarray, dihedral: int) -> np.ndarray:
    """Transform the last two axes (one grid [h, w] or a stack [..., h, w]); returns a view.

    Quarter turns are written as slices and axis swaps (np.rot90's semantics without
    its per-call overhead, which dominated the build).
    """
    if dihedral >= 4:
        grid = grid[..., ::-1]
    turns = dihedral % 4
    if turns == 1:
        return np.swapaxes(grid[..., ::-1], -1, -2)
    if turns == 2:
        return grid[..., ::-1, ::-1]
    if turns == 3:
        return np.swapaxes(grid, -1, -2)[..., ::-1]
    return grid


def augment_grid(grid: np.ndarray, dihedral: int, colors: np.ndarray) -> np.ndarray:
    """Transform then recolour: colors[c] is the new colour of colour c."""
    return np.asarray(colors)[apply_dihedral(np.asarray(grid), int(dihedral))]


def invert_grid(grid: np.ndarray, dihedral: int, colors: np.ndarray) -> np.ndarray:
    """Undo augment_grid (used to map predictions back before voting)."""
    inverse_colors = np.argsort(np.asarray(colors)).astype(np.asarray(grid).dtype)
    return apply_dihedral(inverse_colors[np.asarray(grid)], int(DIHEDRAL_INVERSE[int(dihedral)]))


def invert_grids(
    colours: np.ndarray, shapes: np.ndarray, dihedral: np.ndarray, colors: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """invert_grid over a batch, without a Python loop: grids [n, 30, 30] at the top-left (0
    outside), their shapes [n, 2] ((0, 0): no grid), each row's dihedral [n] and colour map [n, 10].
    Returns the grids and shapes in the original frame, laid out the same way."""
    n = len(colours)
    inverse_colors = np.argsort(np.asarray(colors), axis=1).astype(np.uint8)
    recoloured = np.take_along_axis(inverse_colors, colours.reshape(n, SEQ_LEN).astype(np.int64), axis=1)
    extended = np.concatenate([recoloured, np.zeros((n, 2), np.uint8)], axis=1)  # PAD and EOS slots: 0
    inverse = DIHEDRAL_INVERSE[np.asarray(dihedral, dtype=np.int64)].astype(np.int64)
    shapes = np.asarray(shapes, dtype=np.int64)
    index = dihedral_index_tables()[inverse, shapes[:, 0], shapes[:, 1]].astype(np.int64)
    moved = np.take_along_axis(extended, index, axis=1)
    return moved.reshape(n, CANVAS, CANVAS), transformed_shapes(shapes, inverse)


@functools.cache
def dihedral_index_tables() -> np.ndarray:
    """tables[d, h, w] [900]: for each output canvas cell, its source in an extended input canvas.

    The source is a cell of the original h x w grid's canvas, PAD_SLOT or EOS_SLOT, so one
    gather rebuilds the transformed grid together with its EOS row and column.
    """
    tables = np.full((NUM_DIHEDRAL, CANVAS + 1, CANVAS + 1, SEQ_LEN), PAD_SLOT, dtype=np.int16)
    canvas_position = np.arange(SEQ_LEN, dtype=np.int16).reshape(CANVAS, CANVAS)
    for height in range(1, CANVAS + 1):
        for width in range(1, CANVAS + 1):
            source = canvas_position[:height, :width]
            for dihedral in range(NUM_DIHEDRAL):
                moved = apply_dihedral(source, dihedral)
                out_h, out_w = moved.shape
                table = tables[dihedral, height, width].reshape(CANVAS, CANVAS)
                table[:out_h, :out_w] = moved
                if out_h < CANVAS:
                    table[out_h, :out_w] = EOS_SLOT
                if out_w < CANVAS:
                    table[:out_h, out_w] = EOS_SLOT
    tables.setflags(write=False)
    return tables


def transformed_shapes(shapes: np.ndarray, dihedral: np.ndarray) -> np.ndarray:
    """Grid shapes [n, 2] after the dihedral transforms (odd quarter turns swap the sides)."""
    swap = (np.asarray(dihedral) % 2 == 1)[:, None]
    return np.where(swap, shapes[:, ::-1], shapes)


def all_dihedral_canvases(tokens: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Token canvases [N, 8, 900] (uint8) of every stored grid under every dihedral transform."""
    pad_eos = np.tile(np.array([PAD_TOKEN, EOS_TOKEN], np.uint8), (len(tokens), 1))
    extended = np.concatenate([tokens, pad_eos], axis=1)
    tables = dihedral_index_tables()
    rows = np.arange(len(tokens))[:, None]
    heights, widths = shapes[:, 0], shapes[:, 1]
    return np.stack([extended[rows, tables[d, heights, widths]] for d in range(NUM_DIHEDRAL)], axis=1)


class CanvasBank:
    """Every stored grid under every dihedral transform (row 8 * grid + dihedral), with the list
    of each row's colour cells.

    Augmenting a batch is then a row copy widened to int64 plus a recolouring of the
    colour cells alone: grids cover about a seventh of the canvas on average, so this is
    several times cheaper than a lookup over all 900 cells.
    """

    def __init__(self, tokens: np.ndarray, shapes: np.ndarray):
        self.canvases = all_dihedral_canvases(tokens, shapes).reshape(-1, SEQ_LEN)
        is_colour = self.canvases >= COLOR_OFFSET
        self.cell_offsets = np.concatenate([[0], np.cumsum(is_colour.sum(axis=1))])
        bank_row, position = np.nonzero(is_colour)
        self.cell_positions = position.astype(np.int16)
        self.cell_colours = self.canvases[bank_row, position] - COLOR_OFFSET  # uint8
        # EOS cells likewise: a translated canvas is drawn cell by cell rather than gathered whole.
        is_eos = self.canvases == EOS_TOKEN
        self.eos_offsets = np.concatenate([[0], np.cumsum(is_eos.sum(axis=1))])
        self.eos_positions = np.nonzero(is_eos)[1].astype(np.int16)

    def render_into(
        self,
        out: np.ndarray,
        dest_rows: np.ndarray,
        bank_rows: np.ndarray,
        colors: np.ndarray,
        offsets: np.ndarray | None = None,
    ) -> None:
        """out[dest_rows] = augmented tokens. out: C-contiguous int64 or uint8 [*, 900]; dest_rows [m] increasing;
        bank_rows [m] pick (grid, dihedral); colors [m, 10] the colour permutations; offsets [m, 2] an
        optional translation (row, column). Rows of out not named are left untouched."""
        # Copy runs of consecutive destination rows as slices (a casting fancy-index store is slow);
        # a translated row starts empty and gets its EOS cells moved (those pushed off the canvas dropped).
        run_starts = np.flatnonzero(np.diff(dest_rows, prepend=-2) != 1)
        run_ends = np.append(run_starts[1:], len(dest_rows))
        for start, end in zip(run_starts.tolist(), run_ends.tolist(), strict=True):
            first = int(dest_rows[start])
            out[first : first + end - start] = (
                self.canvases[bank_rows[start:end]] if offsets is None else PAD_TOKEN
            )
        if offsets is not None:
            owner, cell = _cells_of(self.eos_offsets, bank_rows)
            row, col = np.divmod(self.eos_positions[cell].astype(np.int64), CANVAS)
            row, col = row + offsets[owner, 0], col + offsets[owner, 1]
            inside = (row < CANVAS) & (col < CANVAS)
            out.reshape(-1)[(dest_rows[owner] * SEQ_LEN + row * CANVAS + col)[inside]] = EOS_TOKEN
        owner, cell = _cells_of(self.cell_offsets, bank_rows)
        position = dest_rows[owner] * SEQ_LEN + self.cell_positions[cell]
        if offsets is not None:
            position += (offsets[:, 0] * CANVAS + offsets[:, 1])[owner]
        out.reshape(-1)[position] = (
            colors.reshape(-1)[owner * NUM_COLORS + self.cell_colours[cell]] + COLOR_OFFSET
        )


def _cells_of(offsets: np.ndarray, bank_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(which of `bank_rows` owns each cell, the cell's index) of the ragged cell lists `offsets` cuts."""
    starts = offsets[bank_rows]
    counts = offsets[bank_rows + 1] - starts
    owner = np.repeat(np.arange(len(bank_rows)), counts)
    cell = np.arange(int(counts.sum())) + np.repeat(starts - (np.cumsum(counts) - counts), counts)
    return owner, cell


def check_seed(seed: int) -> None:
    """Seeds are non-negative (numpy refuses others deep inside the build)."""
    if seed < 0:
        raise EtrmError(f"--seed {seed}: must be 0 or a positive integer")


def task_seed(seed: int, task_id: str) -> list[int]:
    """A per-task RNG seed that does not depend on which other tasks are in the build."""
    return [seed, int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:8], "little")]


def sample_augmentations(grids: list[np.ndarray], num_aug: int, rng: np.random.Generator):
    """Up to num_aug augmentations giving pairwise distinct versions of a puzzle; identity first.

    Two augmentations are the same when they produce the same augmented puzzle. The
    8 transformed puzzles are grouped into classes that differ only by a relabelling
    of colours; an augmentation's content is then fixed by (class, where its
    permutation sends the puzzle's colours), which makes deduplication exact and cheap.
    Returns (dihedral uint8 [A], colors uint8 [A, 10]).
    """
    identity = np.arange(NUM_COLORS, dtype=np.uint8)
    if num_aug == 1:
        return np.zeros(1, np.uint8), identity[None]
    used = np.unique(np.concatenate([g.ravel() for g in grids]))
    used = used[used != 0]
    class_of, relabel = _symmetry_classes(grids)
    num_classes = len(set(class_of.tolist()))
    space = num_classes * math.perm(NUM_COLORS - 1, len(used))

    if space <= _ENUMERATE_FACTOR * num_aug:
        dihedral, colors = _enumerate_space(sorted(set(class_of.tolist())), used)
        order = np.concatenate([[0], 1 + rng.permutation(len(dihedral) - 1)])[:num_aug]
        return dihedral[order], colors[order]

    dihedral = np.zeros(1, np.uint8)
    colors = identity[None]
    while True:
        draws = 2 * num_aug
        new_dihedral = rng.integers(0, NUM_DIHEDRAL, draws).astype(np.uint8)
        new_colors = np.zeros((draws, NUM_COLORS), np.uint8)
        new_colors[:, 1:] = np.argsort(rng.random((draws, NUM_COLORS - 1)), axis=1) + 1
        dihedral = np.concatenate([dihedral, new_dihedral])
        colors = np.concatenate([colors, new_colors])
        keys = np.concatenate(
            [class_of[dihedral][:, None], np.take_along_axis(colors, relabel[dihedral][:, used], axis=1)],
            axis=1,
        )
        # One base-10 number per key (class < 8, colours < 10, at most 10 digits) makes np.unique 1-D.
        codes = keys.astype(np.int64) @ (NUM_COLORS ** np.arange(keys.shape[1], dtype=np.int64))
        _, first = np.unique(codes, return_index=True)
        if len(first) >= num_aug:
            keep = np.sort(first)[:num_aug]
            return dihedral[keep], colors[keep]


def _symmetry_classes(grids: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """class_of[d]: first transform whose puzzle equals transform d's up to a colour relabelling q;
    relabel[d] [10]: that q (transform d's puzzle = q applied to class_of[d]'s puzzle)."""
    shapes = []
    cells = []
    for dihedral in range(NUM_DIHEDRAL):
        moved = [apply_dihedral(g, dihedral) for g in grids]
        shapes.append(tuple(m.shape for m in moved))
        cells.append(np.concatenate([m.ravel() for m in moved]).astype(np.int64))
    class_of = np.arange(NUM_DIHEDRAL)
    relabel = np.tile(np.arange(NUM_COLORS, dtype=np.intp), (NUM_DIHEDRAL, 1))
    for dihedral in range(1, NUM_DIHEDRAL):
        for representative in range(dihedral):
            if class_of[representative] != representative or shapes[representative] != shapes[dihedral]:
                continue
            mapping = _colour_bijection(cells[representative], cells[dihedral])
            if mapping is not None:
                class_of[dihedral] = representative
                relabel[dihedral] = mapping
                break
    return class_of, relabel


def _colour_bijection(source: np.ndarray, target: np.ndarray) -> np.ndarray | None:
    """The permutation q with q[source] == target cell by cell and q[0] == 0, or None."""
    links = np.flatnonzero(np.bincount(source * NUM_COLORS + target, minlength=NUM_COLORS * NUM_COLORS))
    from_colour, to_colour = np.divmod(links, NUM_COLORS)
    if np.bincount(from_colour).max() > 1 or np.bincount(to_colour).max() > 1:
        return None
    if np.any((from_colour == 0) != (to_colour == 0)):
        return None
    mapping = np.arange(NUM_COLORS, dtype=np.intp)
    mapping[from_colour] = to_colour
    return mapping


def _enumerate_space(classes: list[int], used: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every distinct augmentation: one representative transform per class x every placement
    of the used colours (other colours fill the free values in increasing order); identity first."""
    placements = np.array(list(itertools.permutations(range(1, NUM_COLORS), len(used))), dtype=np.uint8)
    placements = placements.reshape(len(placements), len(used))
    taken = np.zeros((len(placements), NUM_COLORS), bool)
    np.put_along_axis(taken, placements.astype(np.intp), True, axis=1)
    taken[:, 0] = True
    free_values = np.nonzero(~taken)[1].reshape(len(placements), -1)
    free_colours = np.setdiff1d(np.arange(1, NUM_COLORS), used)
    colors = np.zeros((len(placements), NUM_COLORS), np.uint8)
    colors[:, used] = placements
    colors[:, free_colours] = free_values
    all_colors = np.tile(colors, (len(classes), 1))
    all_dihedral = np.repeat(np.array(classes, np.uint8), len(placements))
    # The identity placement comes first among the placements of class 0 (= identity transform).
    identity_row = int(np.nonzero((colors == np.arange(NUM_COLORS)).all(axis=1))[0][0])
    order = np.concatenate([[identity_row], np.delete(np.arange(len(all_colors)), identity_row)])
    return all_dihedral[order], all_colors[order]
