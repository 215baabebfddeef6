"""arch.grid_maps: a bank of symmetries-then-shifts, scored on the demos, proposes each query cell's token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_encoders import canvas_tokens, episode_batch, random_pair, tiny_arch  # tests/test_encoders.py

from etrm.data.augment import NUM_DIHEDRAL
from etrm.data.synth import Dihedral, Translate, _shift
from etrm.errors import EtrmError
from etrm.models import build_model
from etrm.models.encoders import build_encoder
from etrm.models.grid_maps import GridMapBank, demo_agreement, map_bank, map_of, transform_canvases

SIDE = 9
SHIFT = 2


def reference_canvas(grid: np.ndarray, dihedral: int, dy: int, dx: int) -> np.ndarray:
    """The map written with numpy's own rotations and flips (not the dataset's apply_dihedral), then
    the synthetic families' shift, encoded by the tests' independent encoder, cut to the corner."""
    turned = np.rot90(grid, k=dihedral % 4) if dihedral < 4 else np.rot90(np.fliplr(grid), k=dihedral % 4)
    moved = _shift(np.ascontiguousarray(turned), dy, dx)
    return canvas_tokens(moved).view(30, 30)[:SIDE, :SIDE].reshape(-1).numpy()


def test_every_map_matches_numpy_on_random_grids_of_every_shape_class():
    rng = np.random.default_rng(0)
    maps = map_bank(SHIFT)
    assert maps.shape == (NUM_DIHEDRAL * (2 * SHIFT + 1) ** 2, 5)
    shapes = [(1, 1), (1, 5), (5, 1), (3, 3), (4, 7), (8, 2), (8, 8)]
    grids = [rng.integers(0, 10, shape) for shape in shapes]
    got = transform_canvases(torch.stack([canvas_tokens(g) for g in grids]), maps, SIDE)
    for n, grid in enumerate(grids):
        for dihedral in range(NUM_DIHEDRAL):
            for dy in range(-SHIFT, SHIFT + 1):
                for dx in range(-SHIFT, SHIFT + 1):
                    want = reference_canvas(grid, dihedral, dy, dx)
                    row = map_of(dihedral, dy, dx, SHIFT)
                    np.testing.assert_array_equal(got[n, row].numpy(), want, err_msg=f"{grid.shape} {row}")


def test_numpys_rotations_are_the_dataset_dihedral_ids():
    """The reference above spells the ids with np.rot90/np.fliplr; the dataset's ids must agree with it."""
    from etrm.data.augment import apply_dihedral

    grid = np.arange(12).reshape(3, 4)
    for dihedral in range(NUM_DIHEDRAL):
        turned = np.rot90(grid, k=dihedral % 4) if dihedral < 4 else np.rot90(np.fliplr(grid), k=dihedral % 4)
        np.testing.assert_array_equal(apply_dihedral(grid, dihedral), turned)


def synth_demos(family, seed: int):
    rng = np.random.default_rng(seed)
    params = family.sample_params(rng, 3, 8)
    demos = []
    while len(demos) < 4:
        grid = family.sample_input(rng, params, 3, 8)
        if grid is not None:
            demos.append((grid, family.apply(grid, params)))
    return params, demos


def agreement_of(rows, slots: int = 5):
    batch = episode_batch(rows, slots)
    present = batch["demo_mask"].bool()
    return demo_agreement(
        batch["demo_inputs"][present], batch["demo_outputs"][present], present, map_bank(SHIFT), SIDE
    )


@pytest.mark.parametrize("seed", range(4))
def test_the_rule_that_made_the_demos_scores_one_and_a_wrong_map_less(seed):
    dihedral_params, dihedral_demos = synth_demos(Dihedral(), seed)
    shift_params, shift_demos = synth_demos(Translate(), seed)
    mean, low = agreement_of([dihedral_demos, shift_demos])
    rule = [
        map_of(dihedral_params["dihedral"], 0, 0, SHIFT),
        map_of(0, shift_params["dy"], shift_params["dx"], SHIFT),
    ]
    for row, r in enumerate(rule):
        assert mean[row, r] == 1.0 and low[row, r] == 1.0
        assert (low[row] <= mean[row] + 1e-6).all()
    identity = map_of(0, 0, 0, SHIFT)
    assert low[0, identity] < 1.0 and low[1, identity] < 1.0


def test_scores_by_hand_on_a_two_demo_puzzle():
    """Identity on demos whose outputs differ from their inputs in 1 of 6 and 0 of 2 counted cells."""
    a, b = np.array([[1, 2, 3]]), np.array([[4], [5]])
    a_out = np.array([[1, 2, 7]])
    rows = [[(a, a_out), (b, b.copy())]]
    mean, low = agreement_of(rows)
    identity = map_of(0, 0, 0, SHIFT)
    # Demo a: counted cells = 3 colours + 1 EOS right + 3 EOS below = 7, hits 6. Demo b: 2 + 2 + 1 = 5, all hit.
    assert low[0, identity].item() == pytest.approx(6 / 7)
    assert mean[0, identity].item() == pytest.approx((6 / 7 + 1) / 2)


def test_demo_order_does_not_matter_and_a_row_without_demos_scores_zero():
    _, demos = synth_demos(Dihedral(), 0)
    batch_rows = [demos, demos[::-1], demos]
    batch = episode_batch(batch_rows, 5)
    batch["demo_mask"][2] = False
    present = batch["demo_mask"].bool()
    mean, low = demo_agreement(
        batch["demo_inputs"][present], batch["demo_outputs"][present], present, map_bank(SHIFT), SIDE
    )
    torch.testing.assert_close(mean[1], mean[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(low[1], low[0], rtol=0, atol=0)
    assert torch.count_nonzero(mean[2]) == 0 and torch.count_nonzero(low[2]) == 0


def test_a_decisive_bank_hands_each_cell_the_embedding_of_the_rules_answer():
    torch.manual_seed(0)
    params, demos = synth_demos(Translate(), 1)
    query = np.random.default_rng(9).integers(0, 10, (5, 6))
    answer = canvas_tokens(_shift(query, params["dy"], params["dx"])).view(30, 30)[:SIDE, :SIDE].reshape(-1)
    bank = GridMapBank(hidden_size=16, side=SIDE, max_shift=SHIFT)
    with torch.no_grad():
        bank.score_weights.fill_(100.0)  # ×10: a softmax that puts all weight on the map scoring 1
        bank.confidence.normal_()
    batch = episode_batch([demos], 5)
    present = batch["demo_mask"].bool()
    got = bank(
        batch["demo_inputs"][present], batch["demo_outputs"][present], present, canvas_tokens(query)[None]
    )
    table = bank.candidate_embedding.embedding_weight
    torch.testing.assert_close(got[0], table[answer] + bank.confidence, rtol=1e-5, atol=1e-5)


def test_chunking_the_rows_changes_memory_not_results(monkeypatch):
    from etrm.models import grid_maps

    torch.manual_seed(0)
    rows = [synth_demos(Dihedral(), seed)[1] for seed in range(3)]
    batch = episode_batch(rows, 5)
    present = batch["demo_mask"].bool()
    args = (batch["demo_inputs"][present], batch["demo_outputs"][present], present, batch["inputs"])
    bank = GridMapBank(hidden_size=16, side=SIDE, max_shift=SHIFT)
    whole = bank(*args)
    monkeypatch.setattr(grid_maps, "CHUNK_ELEMENTS", 1)  # one grid per chunk
    assert grid_maps._chunk_rows(bank.maps, SIDE) == 1
    torch.testing.assert_close(bank(*args), whole, rtol=0, atol=0)


def test_model_with_the_bank_reads_the_demos_and_the_option_is_checked():
    torch.manual_seed(0)
    arch = tiny_arch("standard", grid_maps=True, seq_len=SIDE * SIDE)
    plain = build_model(tiny_arch("standard", seq_len=SIDE * SIDE)).eval()
    model = build_model(arch).eval()
    missing, unexpected = model.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(name.startswith("encoder.grid_maps.") for name in missing)
    rng = np.random.default_rng(0)
    demos = [random_pair(rng, 3, 4), random_pair(rng, 4, 4)]
    turned = [(x, np.rot90(x).copy()) for x, _ in demos]

    def logits(m, rows):
        batch = episode_batch(rows, 3)
        with torch.no_grad():
            return m(m.initial_carry(batch), batch)[1]["logits"]

    # With the bank's embeddings at zero the model is the plain one, whatever the demos.
    bank = model.encoder.grid_maps
    table = bank.candidate_embedding.embedding_weight.clone()
    with torch.no_grad():
        bank.candidate_embedding.embedding_weight.zero_()
        bank.confidence.zero_()
    for rows in ([demos], [turned]):
        torch.testing.assert_close(logits(model, rows), logits(plain, rows), rtol=0, atol=1e-6)
    # On, what it adds follows the demos: rotated outputs propose other tokens than the random ones.
    with torch.no_grad():
        bank.candidate_embedding.embedding_weight.copy_(table)
        bank.confidence.normal_()
    added = [logits(model, rows) - logits(plain, rows) for rows in ([demos], [turned])]
    assert added[0].abs().max() > 1e-3 and (added[0] - added[1]).abs().max() > 1e-3
    with pytest.raises(EtrmError, match="grid_maps"):
        build_encoder(tiny_arch("puzzle_embedding", grid_maps=True, num_puzzle_identifiers=3))
    with pytest.raises(EtrmError, match="grid_map_shift"):
        build_encoder(tiny_arch("standard", grid_maps=True, grid_map_shift=-1))
