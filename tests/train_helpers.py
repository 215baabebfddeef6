"""Shared by the train tests: a tiny built dataset and small configs that train in seconds on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from etrm.config import RunConfig, apply_overrides, get_preset


def write_tasks(folder: Path, prefix: str, count: int, seed: int) -> None:
    """ARC task JSON files with a simple rule (add 1 to each colour), small random grids."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(count):
        pairs = []
        for _ in range(4):
            h, w = rng.integers(2, 5, size=2)
            grid = rng.integers(0, 9, size=(h, w))
            pairs.append({"input": grid.tolist(), "output": (grid + 1).tolist()})
        task = {"train": pairs[:3], "test": pairs[3:]}
        (folder / f"{prefix}{i:03d}.json").write_text(json.dumps(task))


def build_tiny_dataset(root: Path, split: str = "fewshot") -> Path:
    from etrm.data.build import BuildOptions, build_dataset

    write_tasks(root / "src_train", "a", 4, seed=1)
    write_tasks(root / "src_test", "b", 2, seed=2)
    out = root / f"data-{split}"
    build_dataset(
        BuildOptions(
            train_sources=[str(root / "src_train")],
            test_sources=[str(root / "src_test")],
            out=out,
            num_aug=3,
            split=split,
        )
    )
    return out


def tiny_config(preset: str, data_path: Path, *extra: str) -> RunConfig:
    """A preset at cpu-smoke size, made smaller still so that a step takes well under a second.

    The decoder reads only the 6×6 corner of the canvas (arch.seq_len=36): the test grids are at
    most 4×4, so with their EOS row and column they fit.
    """
    return apply_overrides(
        get_preset(preset, size="cpu-smoke"),
        [
            f"data.path={data_path}",
            "arch.hidden_size=16",
            "arch.num_heads=2",
            "arch.H_cycles=2",
            "arch.L_cycles=1",
            "arch.L_layers=1",
            "arch.seq_len=36",
            "train.eval_interval=0",
            "train.ema=true",
            "train.ema_rate=0.9",
            "logging.wandb=disabled",
            "train.init_from=none",  # the presets that need a decoder choice: from scratch
            *extra,
        ],
    )
