"""arch.cell_lookup: every query cell attends over the demos' cell states; the result joins its token embedding."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from test_encoders import canvas_tokens, episode_batch, random_pair  # tests/test_encoders.py

from etrm.errors import EtrmError
from etrm.models import build_model
from etrm.models.encoders import build_encoder

SIDE = 9  # a 9×9 decoder canvas: the query cells the lookup answers


@pytest.fixture
def lookup_arch(tiny_arch):
    """`lookup_arch(encoder_type="standard", **overrides)`: the tiny model with the cell lookup on a SIDE² canvas."""
    return functools.partial(tiny_arch, cell_lookup=True, seq_len=SIDE * SIDE)


def demo_rows(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [random_pair(rng, 3, 4), random_pair(rng, 5, 2), random_pair(rng, 4, 4)]


@pytest.mark.parametrize("encoder_type", ["standard", "hybrid_standard", "lpn_var"])
def test_encoder_gives_the_slots_and_one_vector_per_canvas_cell(encoder_type, lookup_arch):
    torch.manual_seed(0)
    arch = lookup_arch(encoder_type)
    encoder = build_encoder(arch).eval()
    demos = demo_rows()
    batch = episode_batch([demos, demos, demos[::-1]], 3)
    batch["demo_mask"][1] = False  # a row without demos
    batch["inputs"][2] = batch["inputs"][0]  # row 2: row 0's query and demos, in reverse order
    with torch.no_grad():
        encoded = encoder(batch)
    per_cell = encoded.cells
    assert encoded.slots.shape == (3, arch.context_len, arch.hidden_size)
    assert per_cell.shape == (3, SIDE * SIDE, arch.hidden_size)
    assert torch.count_nonzero(encoded.slots[1]) == 0 and torch.count_nonzero(per_cell[1]) == 0
    assert per_cell[0].abs().max() > 0
    # A set of demos: their order does not change what a query cell reads.
    torch.testing.assert_close(per_cell[2], per_cell[0], rtol=1e-5, atol=1e-6)


def test_the_lookup_reads_the_demos_and_reaches_the_decoder(tiny_arch, lookup_arch):
    torch.manual_seed(0)
    plain = build_model(tiny_arch("standard", seq_len=SIDE * SIDE)).eval()
    model = build_model(lookup_arch()).eval()
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(name.startswith("encoder.cell_lookup.") for name in missing)
    demos, other = demo_rows(0), demo_rows(1)

    def logits(m, rows):
        batch = episode_batch(rows, 3)
        with torch.no_grad():
            return m(m.initial_carry(batch), batch)[1]["logits"]

    # With the lookup's output projection at zero the model is the plain one, whatever the demos.
    with torch.no_grad():
        model.encoder.cell_lookup.out.weight.zero_()
    torch.testing.assert_close(logits(model, [demos]), logits(plain, [demos]), rtol=0, atol=1e-6)
    # Switched on, changing only the demos' contents changes the per-cell part of the context.
    with torch.no_grad():
        model.encoder.cell_lookup.out.weight.normal_(std=0.1)
    assert (logits(model, [demos]) - logits(plain, [demos])).abs().max() > 1e-3
    per_cell = []
    for rows in ([demos], [other]):
        with torch.no_grad():
            per_cell.append(model.encoder(episode_batch(rows, 3)).cells)
    assert (per_cell[0] - per_cell[1]).abs().max() > 1e-3


def test_encoder_reencode_false_caches_the_per_cell_vectors_until_reset(lookup_arch):
    torch.manual_seed(0)
    model = build_model(lookup_arch(encoder_reencode=False)).eval()
    demos = demo_rows()
    batch = episode_batch([demos, demos[::-1], demos[:2]], 3)
    with torch.no_grad():
        first = model.encoder(batch)
        carry, _ = model(model.initial_carry(batch), batch)
        assert torch.equal(carry.context, first.slots) and torch.equal(carry.context_cells, first.cells)
        model.encoder.cell_lookup.out.weight.mul_(2.0)  # re-encoding now doubles every per-cell vector
        carry.halted = torch.tensor([True, False, False])
        carry, _ = model(carry, batch)
    assert torch.equal(carry.context_cells[1:], first.cells[1:])  # kept from the cache
    torch.testing.assert_close(carry.context_cells[0], 2 * first.cells[0])  # the reset row, re-encoded
    assert torch.equal(carry.context[1:], first.slots[1:])
    torch.testing.assert_close(carry.context[0], first.slots[0])  # the slots do not read the lookup


def test_cell_lookup_needs_demos(lookup_arch):
    from etrm.config import RunConfig

    with pytest.raises(EtrmError, match="cell_lookup"):  # the config's one check, before any model is built
        RunConfig(arch=lookup_arch("puzzle_embedding", num_puzzle_identifiers=3)).validate()


def test_colour_match_weights_make_a_query_cell_read_the_cells_paired_with_its_colour():
    """Scores from the bias alone (q projection zero): a cell of colour c averages the values of exactly the
    demo cells whose partner (same position, other grid) has colour c — checked against a direct mean."""
    from etrm.models.encoder_parts import CellLookup, DemoGridEncoder

    torch.manual_seed(0)
    enc = DemoGridEncoder(12, 16, 2, 2.0, 1, 1e-5)
    lookup = CellLookup(12, 16, 2, 16, side=4, grid_coords=False)
    demo_in = np.array([[1, 2], [3, 1]])
    demo_out = np.array([[5, 6], [7, 5]])  # 1→5, 2→6, 3→7 cell by cell
    query_grid = np.array([[2, 1, 3]])
    tokens = {
        name: canvas_tokens(g)[None] for name, g in (("in", demo_in), ("out", demo_out), ("q", query_grid))
    }
    with torch.no_grad():
        demos = enc(tokens["in"], tokens["out"])
        states, attend, colours, partners = demos.states, demos.attend, demos.colours, demos.partners
        lookup.q_proj.weight.zero_()
        lookup.colour_match.copy_(torch.tensor([[0.0, 0.0], [60.0, 60.0]]) / lookup.MATCH_SCALE)
        got = lookup(tokens["q"], states, attend, colours, partners)
        values = lookup.kv_proj(states)[..., 16:]  # [1, S, width]
        for col, colour in enumerate(query_grid[0]):
            chosen = (partners[0] == colour + 2) & attend[0]
            # The output cells over `colour` (no output cell has a query colour, so no input cell is chosen).
            assert chosen.sum() == (demo_in == colour).sum() and (colours[0][chosen] >= 7).all()
            expected = lookup.out(values[0, chosen].double().mean(0).float())
            torch.testing.assert_close(got[0, col], expected, rtol=1e-4, atol=1e-5)
