"""Encoder collapse statistics: the spread math, fake encoders with known behaviour, and the CLI on a real checkpoint."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from etrm.diagnose.encoder_stats import COLLAPSE_RATIO, collect_contexts, context_spread
from etrm.errors import EtrmError


def test_spread_matches_a_direct_computation():
    rng = np.random.default_rng(0)
    contexts = rng.normal(size=(5, 4, 3, 6)) + 3 * rng.normal(size=(5, 1, 3, 6))  # puzzle effect + noise
    stats = context_spread(contexts)
    for t in range(3):
        within = [np.var(contexts[p, :, t, h]) for p in range(5) for h in range(6)]
        across = [np.var(contexts[:, a, t, h]) for a in range(4) for h in range(6)]
        assert stats.within[t] == pytest.approx(np.sqrt(np.mean(within)))
        assert stats.across[t] == pytest.approx(np.sqrt(np.mean(across)))
        assert stats.rms[t] == pytest.approx(np.sqrt(np.mean(contexts[:, :, t, :] ** 2)))
    assert stats.ratio == pytest.approx(stats.within / stats.across)
    assert stats.overall_ratio < 0.5 and stats.warning is None


def test_spread_needs_two_puzzles_and_two_augmentations():
    with pytest.raises(EtrmError, match="at least 2 puzzles and 2 augmentations"):
        context_spread(np.zeros((1, 4, 2, 3)))


def eval_batches(puzzles, augs, queries=2, batch_size=5):
    """Evaluation-order rows (puzzle, query, augmentation) as EpisodeSampler(mode="eval") yields them."""
    rows = [(p, q, a) for p in range(puzzles) for q in range(queries) for a in range(augs)]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        valid = [True] * len(chunk) + [False] * (batch_size - len(chunk))
        chunk = chunk + [chunk[-1]] * (batch_size - len(chunk))
        p, q, a = (torch.tensor(x) for x in zip(*chunk, strict=True))
        yield {"group_ids": p, "query_ids": q, "aug_ids": a, "valid": torch.tensor(valid)}


def fake_encoder(puzzle_scale, aug_scale, calls):
    """context[token, unit] = puzzle_scale·f(puzzle) + aug_scale·g(augmentation), known in closed form."""
    f = torch.randn(10, 3, 4, generator=torch.Generator().manual_seed(1))
    g = torch.randn(10, 3, 4, generator=torch.Generator().manual_seed(2))

    def encode(batch):
        calls.append(batch["group_ids"].tolist())
        return puzzle_scale * f[batch["group_ids"]] + aug_scale * g[batch["aug_ids"]]

    return encode


def test_collect_contexts_encodes_each_puzzle_augmentation_once_and_stops_early():
    calls = []
    contexts = collect_contexts(
        fake_encoder(1.0, 0.1, calls), eval_batches(puzzles=6, augs=3), puzzles=4, augs=3
    )
    assert contexts.shape == (4, 3, 3, 4)
    rows = [g for call in calls for g in call]
    assert sorted(rows) == sorted(p for p in range(4) for _ in range(3))  # query 0 only, each (p, a) once
    assert max(max(call) for call in calls) <= 4  # stopped at the first batch past the last wanted puzzle


@pytest.mark.parametrize(
    "puzzle_scale, aug_scale, collapsed",
    [
        (1.0, 0.05, False),  # reads the demos: puzzles far apart, augmentations close
        (0.0, 1.0, True),  # only reacts to the augmentation: nothing tells puzzles apart
        (0.0, 0.0, True),  # constant context
    ],
)
def test_collapse_warning(puzzle_scale, aug_scale, collapsed):
    contexts = collect_contexts(fake_encoder(puzzle_scale, aug_scale, []), eval_batches(6, 4), 6, 4)
    stats = context_spread(contexts)
    assert (stats.warning is not None) == collapsed
    if collapsed:
        assert "collapse" in stats.warning and stats.collapsed_tokens == [0, 1, 2]
        assert not stats.overall_ratio < COLLAPSE_RATIO
    if puzzle_scale == aug_scale == 0.0:
        assert stats.constant and "same for every puzzle" in stats.warning


@pytest.mark.parametrize(
    "per_cell",
    [[], ["arch.cell_lookup=true", "arch.seq_len=16"]],
    ids=["slots", "slots+per-cell"],
)
def test_encoder_cli_on_a_tiny_checkpoint(tmp_path, per_cell):
    """With per-cell vectors after the slots (cell lookup), only the context_len slots are listed."""
    from etrm.config import apply_overrides, get_preset
    from etrm.data.build import BuildOptions, build_dataset
    from etrm.models import build_model
    from etrm.runs.checkpoint import save_checkpoint

    rng = np.random.default_rng(0)
    for side, count in (("train", 2), ("test", 3)):
        (tmp_path / side).mkdir()
        for i in range(count):
            pairs = []
            for _ in range(3):
                grid = rng.integers(0, 9, size=(3, 3))
                pairs.append({"input": grid.tolist(), "output": np.rot90(grid).tolist()})
            task = {"train": pairs[:2], "test": pairs[2:]}
            (tmp_path / side / f"{side}{i}.json").write_text(json.dumps(task))
    data = tmp_path / "data"
    build_dataset(BuildOptions([str(tmp_path / "train")], [str(tmp_path / "test")], data, num_aug=3))
    cfg = apply_overrides(
        get_preset("SF1", size="cpu-smoke"),
        [f"data.path={data}", "arch.hidden_size=16", "arch.num_heads=2", "arch.context_len=4", *per_cell],
    )
    model = build_model(cfg.arch)
    save_checkpoint(tmp_path / "run", 7, model.state_dict(), None, cfg, {}, keep=1)

    cli = subprocess.run(
        [sys.executable, "-m", "etrm", "diagnose", "encoder", str(tmp_path / "run"), "--augs", "3", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0, cli.stderr
    out = json.loads(cli.stdout)
    assert (out["checkpoint_step"], out["puzzles"], out["augmentations"]) == (7, 3, 3)
    assert len(out["tokens"]) == 4
    assert all(t["across puzzles"] > 0 and t["ratio"] is not None for t in out["tokens"])
