"""Evaluation at the semi-final's scale: vectorised cropping and inversion, order-free predictions,
`etrm eval --nproc 2` writing the same files as one process, the design's protocol in the presets."""

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch
from train_helpers import build_tiny_dataset, tiny_config

from etrm.config import PRESETS, get_preset
from etrm.data.augment import NUM_DIHEDRAL, augment_grid, invert_grid, invert_grids
from etrm.data.encoding import CANVAS, EOS_TOKEN, decode_grid, decode_grids, encode_grid
from etrm.eval.predictions import NO_GRID, GridInterner, Predictions, PredictionsBuilder, Shard
from etrm.models import build_model
from etrm.runs.checkpoint import save_checkpoint


def _random_canvases(rng, n):
    """Predicted canvases of every kind decode_grid meets: clean grids, noisy ones, no grid at all."""
    rows = []
    for i in range(n):
        h, w = rng.integers(1, CANVAS + 1, size=2)
        tokens = encode_grid(rng.integers(0, 10, size=(h, w))).astype(np.int64)
        if i % 3 == 1:  # stray PAD/EOS/colour tokens inside and around the grid
            cells = rng.integers(0, tokens.size, size=rng.integers(1, 20))
            tokens[cells] = rng.integers(0, 12, size=len(cells))
        if i % 7 == 2:
            tokens[0] = EOS_TOKEN  # no grid
        rows.append(tokens)
    return np.stack(rows)


def test_decode_and_invert_over_a_batch_equal_the_per_row_reference():
    rng = np.random.default_rng(0)
    tokens = _random_canvases(rng, 300)
    dihedral = rng.integers(0, NUM_DIHEDRAL, size=len(tokens))
    colors = np.stack([rng.permutation(10) for _ in range(len(tokens))]).astype(np.uint8)
    colours, shapes = decode_grids(tokens.astype(np.uint8))
    colours, shapes = invert_grids(colours, shapes, dihedral, colors)
    seen_none = 0
    for row in range(len(tokens)):
        expected = decode_grid(tokens[row])
        if expected is None:
            seen_none += 1
            assert tuple(shapes[row]) == (0, 0) and not colours[row].any()
            continue
        expected = invert_grid(expected, int(dihedral[row]), colors[row])
        h, w = shapes[row]
        np.testing.assert_array_equal(colours[row, :h, :w], expected)
        assert not colours[row, h:].any() and not colours[row, :, w:].any()
    assert 0 < seen_none < len(tokens)
    # and inversion really undoes an augmentation (not merely agrees with invert_grid)
    grid = rng.integers(0, 10, size=(3, 5))
    moved = augment_grid(grid, 1, colors[0])
    out, shape = invert_grids(
        decode_grids(encode_grid(moved)[None])[0], np.array([moved.shape]), np.array([1]), colors[:1]
    )
    np.testing.assert_array_equal(out[0, :3, :5], grid)
    assert tuple(shape[0]) == (3, 5)


def _shard(entries, grids):
    table = GridInterner()
    ids = [NO_GRID if g is None else table.add(grids[g]) for *_, g, _ in entries]
    task, query, aug = (np.array([e[i] for e in entries]) for i in range(3))
    return Shard(
        task, query, aug, np.array(ids), np.array([e[-1] for e in entries], np.float32), table.table()
    )


def test_predictions_do_not_depend_on_the_order_or_split_of_shards(tmp_path, monkeypatch):
    grids = [np.full((1, 1), c, np.uint8) for c in range(4)] + [np.eye(2, dtype=np.uint8)]
    targets = [[grids[4]], [grids[1], grids[2]]]
    entries = [
        (0, 0, 0, 4, 0.5),
        (0, 0, 1, 3, -1.0),
        (1, 0, 0, None, 2.0),
        (1, 0, 1, 0, 0.25),
        (1, 1, 0, 2, 1.0),
        (1, 1, 1, 3, 0.0),
    ]

    def built(shards):
        b = PredictionsBuilder(["p", "q"], targets, [2, 2], meta={"split": "test"})
        for s in shards:
            b.add_shard(_shard(s, grids))
        return b.build()

    reference = PredictionsBuilder(["p", "q"], targets, [2, 2], meta={"split": "test"})
    for t, q, a, g, v in entries:
        reference.add(t, q, a, None if g is None else grids[g], v)
    one = reference.build()
    two = built([entries[1::2], entries[0::2]])  # interleaved and out of order
    # numbered by first use: targets (4, 1, 2), then row by row (3, then 0)
    assert [one.grids.grid(i).tolist() for i in range(5)] == [grids[i].tolist() for i in (4, 1, 2, 3, 0)]
    for name in ("grid_ids", "q_halt", "target_ids", "query_task", "query_index"):
        np.testing.assert_array_equal(getattr(one, name), getattr(two, name))
    np.testing.assert_array_equal(one.grids.cells, two.grids.cells)
    # the saved bytes depend on the predictions alone, not on the clock
    one.save(tmp_path / "a.npz")
    monkeypatch.setattr(zipfile.time, "time", lambda: 2e9)
    two.save(tmp_path / "b.npz")
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    np.testing.assert_array_equal(Predictions.load(tmp_path / "b.npz").grid_ids, one.grid_ids)
    with pytest.raises(ValueError, match="repeated prediction: task 1, query 1, aug 0"):
        built([entries, entries[4:5]])
    with pytest.raises(ValueError, match="unexpected prediction: task 0, query 1, aug 0"):
        built([[(0, 1, 0, 0, 0.0)]])
    with pytest.raises(ValueError, match="2 predictions missing"):
        built([entries[:4]])


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "ETRM_KERNELS": "torch", "WANDB_MODE": "disabled"}


def test_eval_on_two_processes_writes_the_same_files_as_one(tmp_path):
    data = build_tiny_dataset(tmp_path)
    cfg = tiny_config("SF1", data)
    torch.manual_seed(3)
    model = build_model(cfg.arch)
    save_checkpoint(tmp_path / "run", 4, model.state_dict(), None, cfg, {"step": 4}, keep=1)
    base = [sys.executable, "-m", "etrm", "eval", str(tmp_path / "run"), "--batch-size", "2"]
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        proc = subprocess.run(
            [*base, "--out", str(tmp_path / name), *extra],
            capture_output=True,
            text=True,
            timeout=300,
            env=_env(),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = tmp_path / "one", tmp_path / "two"
    assert (one / "predictions.npz").read_bytes() == (two / "predictions.npz").read_bytes()
    results = json.loads((one / "results.json").read_text())
    assert results == json.loads((two / "results.json").read_text())
    # 2 test puzzles × 1 query × 3 augmentations, batches of 2 per process: rank 1 had a padded batch
    predictions = Predictions.load(one / "predictions.npz")
    assert predictions.grid_ids.shape == (2, 3) and (predictions.grid_ids >= 0).all()  # grids to vote on
    assert results["protocol"] == "vote@3" and results["num_aug"] == 3


def test_semi_final_and_final_presets_vote_over_every_stored_augmentation():
    voted = [name for name, info in PRESETS.items() if info.phase in ("semi-final", "final")]
    assert {"SF1", "SF6", "final"} <= set(voted)
    for name in voted:
        assert get_preset(name).train.eval_num_aug == 0, name  # 0 = all stored (~912 on ARC-AGI-1)
        assert get_preset(name, size="cpu-smoke").train.eval_num_aug == 1, name  # smoke runs stay quick


def test_eval_refuses_what_a_shared_run_or_compile_cannot_do(tmp_path, capsys):
    from etrm.cli import main

    data = build_tiny_dataset(tmp_path)
    cfg = tiny_config("SF1", data)
    save_checkpoint(tmp_path / "run", 4, build_model(cfg.arch).state_dict(), None, cfg, {"step": 4}, keep=1)
    cases = [
        (["--nproc", "0"], "--nproc must be ≥ 1, got 0"),
        (["--nproc", "2", "--device", "cpu"], "--nproc and torchrun share out a model run"),
        (["--compile", "--device", "cpu"], "--compile needs a CUDA device; this evaluation runs on cpu"),
    ]
    for args, message in cases:
        with pytest.raises(SystemExit) as error:
            main(["eval", str(tmp_path / "run"), *args])
        assert error.value.code == 2 and message in capsys.readouterr().err, args
    assert not (tmp_path / "run" / "eval").exists()
