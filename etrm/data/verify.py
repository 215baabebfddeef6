"""`etrm data verify`: re-check a built dataset folder from its files alone."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from etrm.data.augment import DIHEDRAL_INVERSE, apply_dihedral
from etrm.data.build import SPLIT_NAMES, pair_key
from etrm.data.dataset import ArcDataset, Split
from etrm.data.encoding import NUM_COLORS


def verify_dataset(path: str | Path, progress=None) -> list[dict]:
    """Rows {check, ok, detail}: checksums, counts, leakage (few-shot only), augmentations per split."""
    dataset = ArcDataset.open(path)
    manifest = dataset.manifest
    checks = [_check_checksums(Path(path), manifest["files"])]
    splits = {name: dataset.split(name) for name in SPLIT_NAMES}
    mismatched = [
        name
        for name, split in splits.items()
        if manifest["counts"][name]["puzzles"] != len(split)
        or manifest["counts"][name]["augmentations"] != len(split.aug_dihedral)
    ]
    checks.append(
        {
            "check": "counts",
            "ok": not mismatched,
            "detail": f"differ from manifest: {mismatched}" if mismatched else "match manifest",
        }
    )
    checks.append(_check_leakage(splits, manifest["fewshot"]))
    for name, split in splits.items():
        task = (
            None
            if progress is None
            else progress.add_task(f"augmentations ({name})", total=len(split), info="")
        )
        problems = []
        for g in range(len(split)):
            problems += _augmentation_problems(split, g)
            if task is not None:
                progress.advance(task)
        detail = (
            "; ".join(problems[:5])
            if problems
            else f"{len(split.aug_dihedral)} augmentations invert and are distinct"
        )
        checks.append({"check": f"augmentations ({name})", "ok": not problems, "detail": detail})
    return checks


def _check_checksums(path: Path, files: dict[str, str]) -> dict:
    bad = []
    for relative, expected in files.items():
        file = path / relative
        if not file.is_file():
            bad.append(f"{relative} missing")
        elif hashlib.sha256(file.read_bytes()).hexdigest() != expected:
            bad.append(f"{relative} changed")
    return {
        "check": "checksums",
        "ok": not bad,
        "detail": "; ".join(bad) if bad else f"{len(files)} files match",
    }


def _check_leakage(splits: dict[str, Split], fewshot: bool) -> dict:
    if not fewshot:
        return {
            "check": "leakage",
            "ok": True,
            "detail": "not checked: TRM split trains on test demos by design",
        }
    test = splits["test"]
    test_keys = {pair_key(*pair): test.puzzle_ids[g] for g in range(len(test)) for pair in test.pairs(g)}
    train = splits["train"]
    leaks = sorted(
        {
            f"{train.puzzle_ids[g]} ~ {test_keys[key]}"
            for g in range(len(train))
            for key in (pair_key(*pair) for pair in train.pairs(g))
            if key in test_keys
        }
    )
    detail = "; ".join(leaks) if leaks else f"no test pair in {len(train)} training puzzles"
    return {"check": "leakage", "ok": not leaks, "detail": detail}


def _augmentation_problems(split: Split, g: int) -> list[str]:
    """Identity first, valid permutations fixing 0, every augmentation inverts, no two give the same puzzle."""
    task_id = split.puzzle_ids[g]
    rows = slice(int(split.aug_offsets[g]), int(split.aug_offsets[g + 1]))
    dihedral, colors = split.aug_dihedral[rows], split.aug_colors[rows].astype(np.int64)
    if len(dihedral) == 0:
        return [f"{task_id}: no augmentations"]
    problems = []
    if dihedral[0] != 0 or not np.array_equal(colors[0], np.arange(NUM_COLORS)):
        problems.append(f"{task_id}: augmentation 0 is not the identity")
    if (
        np.any(dihedral >= len(DIHEDRAL_INVERSE))
        or np.any(colors[:, 0] != 0)
        or not np.array_equal(np.sort(colors, axis=1), np.broadcast_to(np.arange(NUM_COLORS), colors.shape))
    ):
        return problems + [f"{task_id}: an augmentation has an invalid dihedral id or colour permutation"]
    inverse_colors = np.argsort(colors, axis=1)
    grids = [grid for pair in split.pairs(g) for grid in pair]
    contents = [b""] * len(dihedral)
    for d in np.unique(dihedral):
        chosen = np.flatnonzero(dihedral == d)
        parts = []
        for grid in grids:
            moved = apply_dihedral(grid, int(d))
            augmented = colors[chosen][:, moved]  # [k, h', w']
            recoloured = np.take_along_axis(
                inverse_colors[chosen], augmented.reshape(len(chosen), -1), axis=1
            )
            restored = apply_dihedral(recoloured.reshape(augmented.shape), int(DIHEDRAL_INVERSE[d]))
            bad = np.flatnonzero((restored != grid).reshape(len(chosen), -1).any(axis=1))
            if len(bad):
                problems.append(f"{task_id}: augmentation {int(chosen[bad[0]])} does not invert")
            parts.append(np.full((len(chosen), 2), moved.shape, np.uint8))
            parts.append(augmented.reshape(len(chosen), -1).astype(np.uint8))
        content = np.concatenate(parts, axis=1)
        for i, a in enumerate(chosen):
            contents[a] = content[i].tobytes()
    if len(set(contents)) != len(contents):
        problems.append(
            f"{task_id}: {len(contents) - len(set(contents))} augmentations repeat another's puzzle"
        )
    return problems
