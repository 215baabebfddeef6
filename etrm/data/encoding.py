"""TRM's token encoding of ARC grids, kept exactly so that TRM checkpoints read our data.

PAD=0, EOS=1, colour c -> c+2 (vocabulary 12). A grid sits at the top-left of a
30x30 canvas flattened row-major to 900 tokens; EOS fills the row below the grid
(over its columns) and the column right of it (over its rows); the corner stays
PAD and a side touching the canvas edge gets no EOS. Labels are the same tokens
with PAD replaced by IGNORE_LABEL_ID so that the loss skips the empty canvas.
"""

from __future__ import annotations

import numpy as np

PAD_TOKEN = 0
EOS_TOKEN = 1
COLOR_OFFSET = 2
NUM_COLORS = 10  # ARC's colours 0-9
VOCAB_SIZE = 12
CANVAS = 30
SEQ_LEN = CANVAS * CANVAS
IGNORE_LABEL_ID = -100


def encode_grid(grid: np.ndarray) -> np.ndarray:
    """Tokens [900] (uint8) of a grid of colours 0-9 placed at the canvas's top-left."""
    grid = np.asarray(grid)
    height, width = grid.shape
    canvas = np.zeros((CANVAS, CANVAS), dtype=np.uint8)
    canvas[:height, :width] = grid.astype(np.uint8) + COLOR_OFFSET
    if height < CANVAS:
        canvas[height, :width] = EOS_TOKEN
    if width < CANVAS:
        canvas[:height, width] = EOS_TOKEN
    return canvas.reshape(SEQ_LEN)


def labels_from_tokens(tokens: np.ndarray) -> np.ndarray:
    """Label tokens as int64 with PAD cells set to IGNORE_LABEL_ID (EOS stays a target)."""
    labels = np.asarray(tokens).astype(np.int64)
    labels[labels == PAD_TOKEN] = IGNORE_LABEL_ID
    return labels


def canvas_corner(tokens, side: int):
    """[N, 900] canvas tokens (numpy or torch) → [N, side·side]: the top-left side×side corner, the part
    of the canvas a decoder of `arch.seq_len` = side² sees."""
    return tokens.reshape(-1, CANVAS, CANVAS)[:, :side, :side].reshape(tokens.shape[0], side * side)


def decode_grid(tokens: np.ndarray) -> np.ndarray | None:
    """Crop a predicted canvas to the grid it draws: the largest top-left rectangle of colour tokens.

    Follows TRM's evaluator: scanning rows down, the usable width is the run of colour
    tokens from column 0, never growing again; the row count with the largest area wins
    (first on ties). Returns None when the top-left cell is not a colour.
    """
    canvas = np.asarray(tokens).reshape(CANVAS, CANVAS)
    is_color = (canvas >= COLOR_OFFSET) & (canvas < VOCAB_SIZE)
    run = np.where(is_color.all(axis=1), CANVAS, np.argmin(is_color, axis=1))
    width = np.minimum.accumulate(run)
    area = width * np.arange(1, CANVAS + 1)
    best = int(np.argmax(area))
    if area[best] == 0:
        return None
    return canvas[: best + 1, : width[best]].astype(np.int64) - COLOR_OFFSET


def decode_grids(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """decode_grid over a batch of canvases [n, 900], without a Python loop.

    Returns (colours [n, 30, 30] uint8, 0 outside each grid; shapes [n, 2] int64, (0, 0) where
    decode_grid finds no grid).
    """
    canvas = np.asarray(tokens).reshape(-1, CANVAS, CANVAS)
    is_color = (canvas >= COLOR_OFFSET) & (canvas < VOCAB_SIZE)
    run = np.where(is_color.all(axis=2), CANVAS, np.argmin(is_color, axis=2))
    width = np.minimum.accumulate(run, axis=1)
    area = width * np.arange(1, CANVAS + 1)
    best = np.argmax(area, axis=1)
    rows = np.arange(len(canvas))
    found = area[rows, best] > 0
    shapes = np.stack([np.where(found, best + 1, 0), np.where(found, width[rows, best], 0)], axis=1)
    cells = np.arange(CANVAS)
    inside = (cells[None, :, None] < shapes[:, 0, None, None]) & (
        cells[None, None, :] < shapes[:, 1, None, None]
    )
    colours = np.where(inside, canvas.astype(np.int16) - COLOR_OFFSET, 0).astype(np.uint8)
    return colours, shapes.astype(np.int64)
