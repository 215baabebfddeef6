import itertools

import numpy as np
import pytest

from etrm.data.augment import (
    DIHEDRAL_INVERSE,
    NUM_DIHEDRAL,
    CanvasBank,
    all_dihedral_canvases,
    apply_dihedral,
    augment_grid,
    invert_grid,
    sample_augmentations,
    transformed_shapes,
)
from etrm.data.encoding import encode_grid

ASYMMETRIC = np.array([[1, 2, 3], [4, 5, 6]])


def test_eight_distinct_transforms_each_inverted():
    images = {
        apply_dihedral(ASYMMETRIC, d).tobytes() + bytes(apply_dihedral(ASYMMETRIC, d).shape) for d in range(8)
    }
    assert len(images) == 8
    for d in range(NUM_DIHEDRAL):
        back = apply_dihedral(apply_dihedral(ASYMMETRIC, d), int(DIHEDRAL_INVERSE[d]))
        np.testing.assert_array_equal(back, ASYMMETRIC)


def test_dihedral_transforms_compose_within_the_group():
    def key(grid):
        return grid.shape, grid.tobytes()

    by_image = {key(apply_dihedral(ASYMMETRIC, d)): d for d in range(8)}
    for a, b in itertools.product(range(8), repeat=2):
        assert key(apply_dihedral(apply_dihedral(ASYMMETRIC, a), b)) in by_image


def test_known_transforms():
    np.testing.assert_array_equal(apply_dihedral(ASYMMETRIC, 1), np.rot90(ASYMMETRIC))
    np.testing.assert_array_equal(apply_dihedral(ASYMMETRIC, 4), ASYMMETRIC[:, ::-1])
    np.testing.assert_array_equal(apply_dihedral(ASYMMETRIC, 5), ASYMMETRIC.T)  # flip then quarter turn


def test_colour_permutation_keeps_zero_and_inverts():
    rng = np.random.default_rng(0)
    grid = rng.integers(0, 10, (5, 7))
    colors = np.concatenate([[0], rng.permutation(9) + 1])
    for d in range(8):
        augmented = augment_grid(grid, d, colors)
        assert ((augmented == 0) == (apply_dihedral(grid, d) == 0)).all()
        np.testing.assert_array_equal(invert_grid(augmented, d, colors), grid)


def test_canvas_bank_renders_augmented_encodings():
    rng = np.random.default_rng(4)
    grids = [rng.integers(0, 10, shape) for shape in [(1, 1), (3, 7), (30, 30), (12, 30), (5, 2)]]
    tokens = np.stack([encode_grid(g) for g in grids])
    bank = CanvasBank(tokens, np.array([g.shape for g in grids], np.uint8))
    picks = [(0, 0), (1, 5), (2, 3), (3, 6), (4, 1), (1, 7)]
    colors = np.stack([np.concatenate([[0], rng.permutation(9) + 1]) for _ in picks]).astype(np.uint8)
    bank_rows = np.array([8 * g + d for g, d in picks])
    out = np.full((9, 900), -7, np.int64)
    dest = np.array([0, 1, 2, 5, 6, 8])
    bank.render_into(out, dest, bank_rows, colors)
    for row, (g, d), perm in zip(dest, picks, colors, strict=True):
        np.testing.assert_array_equal(out[row], encode_grid(augment_grid(grids[g], d, perm)))
    assert (out[[3, 4, 7]] == -7).all()  # rows not named stay untouched
    offsets = np.array([[2, 3], [0, 0], [0, 0], [0, 0], [20, 1], [0, 27]])
    bank.render_into(out, dest, bank_rows, colors, offsets)
    for row, (g, d), perm, (dr, dc) in zip(dest, picks, colors, offsets, strict=True):
        expected = np.zeros((30, 30), np.int64)
        shifted = encode_grid(augment_grid(grids[g], d, perm)).reshape(30, 30)
        expected[dr:, dc:] = shifted[: 30 - dr, : 30 - dc]
        np.testing.assert_array_equal(out[row].reshape(30, 30), expected)


@pytest.mark.parametrize("shape", [(1, 1), (2, 3), (30, 30), (30, 1), (4, 30), (17, 9)])
def test_canvas_tables_equal_encoding_the_transformed_grid(shape):
    grid = np.random.default_rng(shape[0]).integers(0, 10, shape)
    canvases = all_dihedral_canvases(encode_grid(grid)[None], np.array([shape], np.uint8))
    for d in range(8):
        np.testing.assert_array_equal(canvases[0, d], encode_grid(apply_dihedral(grid, d)))


def test_translation_shifts_grid_with_its_eos():
    grid = np.array([[1, 2], [3, 4]])
    out = np.full((1, 900), 7, np.uint8)  # stale tokens: the row is drawn afresh
    bank = CanvasBank(encode_grid(grid)[None], np.array([grid.shape]))
    bank.render_into(out, np.array([0]), np.array([0]), np.arange(10)[None], np.array([[5, 27]]))
    expected = np.zeros((30, 30), np.uint8)
    expected[5:7, 27:29] = grid + 2
    expected[7, 27:29] = 1
    expected[5:7, 29] = 1  # the EOS column past the canvas edge is dropped with nothing else
    np.testing.assert_array_equal(out[0].reshape(30, 30), expected)


@pytest.mark.parametrize("dtype", [np.int64, np.uint8])
def test_translated_rendering_equals_shifting_each_augmented_canvas(dtype):
    rng = np.random.default_rng(5)
    grids = [rng.integers(0, 10, size=rng.integers(1, 31, size=2)) for _ in range(40)]
    shapes = np.array([g.shape for g in grids])
    bank = CanvasBank(np.stack([encode_grid(g) for g in grids]), shapes)
    n = 150
    bank_rows = rng.integers(0, 8 * len(grids), n)
    colors = np.stack([rng.permutation(10) for _ in range(n)]).astype(np.uint8)
    room = 30 - transformed_shapes(shapes[bank_rows // 8], bank_rows % 8) + 1
    offsets = (rng.random((n, 2)) * room).astype(np.int64)
    dest = np.sort(rng.choice(300, n, replace=False))
    out = rng.integers(0, 12, (300, 900)).astype(dtype)
    expected = out.copy()
    bank.render_into(out, dest, bank_rows, colors, offsets)
    for i in range(n):  # reference: augment the grid, encode it, shift the canvas by slicing
        grid = grids[bank_rows[i] // 8]
        canvas = encode_grid(augment_grid(grid, bank_rows[i] % 8, colors[i])).reshape(30, 30)
        dr, dc = offsets[i]
        shifted = np.zeros((30, 30), dtype)
        shifted[dr:, dc:] = canvas[: 30 - dr, : 30 - dc]
        expected[dest[i]] = shifted.reshape(-1)
    np.testing.assert_array_equal(out, expected)


def brute_force_distinct(grids, dihedral, colors):
    return {
        tuple(augment_grid(g, d, c).tobytes() + bytes(apply_dihedral(g, d).shape) for g in grids)
        for d, c in zip(dihedral, colors, strict=True)
    }


def all_contents(grids):
    """Every distinct augmented puzzle, by enumerating all 8 x 9! augmentations' effect on the used colours."""
    used = sorted(set(np.concatenate([g.ravel() for g in grids]).tolist()) - {0})
    contents = set()
    for d in range(8):
        for placement in itertools.permutations(range(1, 10), len(used)):
            colors = np.arange(10)
            colors[used] = placement
            contents.add(
                tuple(augment_grid(g, d, colors).tobytes() + bytes(apply_dihedral(g, d).shape) for g in grids)
            )
    return contents


@pytest.mark.parametrize(
    "grids",
    [
        [np.array([[1, 0], [0, 1]]), np.array([[2]])],  # diagonal symmetry, two colours
        [np.full((3, 3), 4)],  # fully symmetric, one colour: 9 distinct puzzles
        [np.array([[1, 2], [2, 1]])],  # symmetric up to swapping colours
        [np.zeros((2, 2), int)],  # only colour 0: a single distinct puzzle
    ],
)
def test_small_puzzles_get_their_whole_distinct_space(grids):
    dihedral, colors = sample_augmentations(grids, 1000, np.random.default_rng(0))
    assert len(brute_force_distinct(grids, dihedral, colors)) == len(dihedral) == len(all_contents(grids))
    assert dihedral[0] == 0 and (colors[0] == np.arange(10)).all()


def test_rich_puzzle_gets_exactly_num_aug_distinct_and_is_seeded():
    grids = [np.random.default_rng(1).integers(0, 10, (6, 5)) for _ in range(3)]
    dihedral, colors = sample_augmentations(grids, 300, np.random.default_rng(7))
    assert len(dihedral) == 300 == len(brute_force_distinct(grids, dihedral, colors))
    assert (colors[:, 0] == 0).all() and (np.sort(colors, axis=1) == np.arange(10)).all()
    again = sample_augmentations(grids, 300, np.random.default_rng(7))
    np.testing.assert_array_equal(again[0], dihedral)
    np.testing.assert_array_equal(again[1], colors)
    other = sample_augmentations(grids, 300, np.random.default_rng(8))
    assert not np.array_equal(other[1], colors)
