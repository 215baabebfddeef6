"""arch.grid_coords: each cell's row and column from both ends of its own grid, in the decoder and the demo encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_encoders import canvas_tokens, episode_batch, random_pair  # tests/test_encoders.py

from etrm.models import build_model
from etrm.models.grid_coords import OUTSIDE, grid_coordinates


def coordinates_by_loop(grid_shape: tuple[int, int], side: int) -> np.ndarray:
    """The expected coordinates, cell by cell: (i, j, h−1−i, w−1−j) inside the grid, OUTSIDE elsewhere."""
    h, w = grid_shape
    out = np.full((side, side, 4), OUTSIDE)
    for i in range(h):
        for j in range(w):
            out[i, j] = (i, j, h - 1 - i, w - 1 - j)
    return out.reshape(side * side, 4)


@pytest.mark.parametrize("side", [30, 9])
def test_grid_coordinates_match_a_cell_by_cell_count(side):
    rng = np.random.default_rng(0)
    shapes = [(1, 1), (3, 5), (8, 2), (side - 1, side - 1)] + ([(30, 30), (30, 4)] if side == 30 else [])
    tokens = torch.stack(
        [canvas_tokens(rng.integers(0, 10, shape)).view(30, 30)[:side, :side].reshape(-1) for shape in shapes]
    )
    got = grid_coordinates(tokens, side)
    for row, shape in enumerate(shapes):
        np.testing.assert_array_equal(got[row].numpy(), coordinates_by_loop(shape, side), err_msg=str(shape))


def test_a_flip_swaps_rows_from_the_top_and_from_the_bottom():
    """The property the embedding is for: out = flipud(in) puts in's 'rows below' where out has 'row from top'."""
    grid = np.random.default_rng(1).integers(0, 10, (4, 6))
    source = grid_coordinates(canvas_tokens(grid)[None], 30)[0].view(30, 30, 4)
    flipped = grid_coordinates(canvas_tokens(np.flipud(grid).copy())[None], 30)[0].view(30, 30, 4)
    assert torch.equal(flipped[:4, :6, 0], source[:4, :6, 2].flip(0))
    assert torch.equal(flipped[:4, :6, 2], source[:4, :6, 0].flip(0))
    assert torch.equal(flipped[:4, :6, 1], source[:4, :6, 1].flip(0))


def coordinate_parameters(model) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if "grid_coords" in name or "far_side" in name}


@pytest.mark.parametrize("encoder_type", ["standard", "hybrid_standard"])
def test_grid_coords_off_is_the_plain_model_and_on_uses_the_tables(encoder_type, tiny_arch):
    torch.manual_seed(0)
    plain = build_model(tiny_arch(encoder_type)).eval()
    with_coords = build_model(tiny_arch(encoder_type, grid_coords=True)).eval()
    assert not coordinate_parameters(plain)
    extra = coordinate_parameters(with_coords)
    assert any(name.startswith("decoder.") for name in extra) and any(
        name.startswith("encoder.") for name in extra
    )
    # Every other parameter has the same name and shape: copy the plain model's weights over.
    missing, unexpected = with_coords.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and set(missing) == set(extra)

    rng = np.random.default_rng(0)
    demos = [random_pair(rng, 3, 4), random_pair(rng, 5, 2)]
    batch = episode_batch([demos, demos], 3)

    def logits(model):
        with torch.no_grad():
            return model(model.initial_carry(batch), batch)[1]["logits"]

    with torch.no_grad():
        for table in extra.values():
            table.zero_()
    torch.testing.assert_close(logits(with_coords), logits(plain), rtol=0, atol=1e-6)
    for name in (
        "decoder.grid_coords.tables.2.embedding_weight",
        "encoder.grid_encoder.cell_embedding.far_side_embedding.tables.1.embedding_weight",
    ):
        with torch.no_grad():
            for table in extra.values():
                table.zero_()
            extra[name].normal_()
        assert (logits(with_coords) - logits(plain)).abs().max() > 1e-3, name
