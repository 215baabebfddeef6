"""Procedural few-shot ARC task families: a fast, honest test of whether an encoder reads the demos.

Each puzzle is one random instance of its family's rule (its own parameters: which colours,
which transform, which direction), shown through 3-5 demo pairs and asked on 1-2 query pairs.
A family's `solve` recovers the answer from the demos alone, by finding every parameter value
consistent with them: a puzzle is only kept when the demos determine its answer. Puzzles are
written as ARC task JSON files, so `etrm data build` takes them through the same pipeline as
ARC itself. Only numpy is needed here (no torch).
"""

from __future__ import annotations

import json
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from etrm.data.augment import NUM_DIHEDRAL, apply_dihedral, check_seed
from etrm.data.build import pair_key
from etrm.errors import EtrmError
from etrm.io import Output, atomic_dir, atomic_write_json, check_replaceable

Grid = np.ndarray
Pair = tuple[Grid, Grid]
Params = dict[str, Any]

DEMOS_PER_PUZZLE = (3, 5)
QUERIES_PER_PUZZLE = (1, 2)
DEFAULT_GRID_SIZE = (3, 12)
HOLDOUTS = ("instances", "families")
MANIFEST_NAME = "synth.json"
# A folder of synthetic tasks is recognised by its manifest, which names every task file.
SYNTHETIC = Output(
    "synthetic task",
    MANIFEST_NAME,
    lambda manifest: [f"{t['split']}/{i}.json" for i, t in manifest["tasks"].items()],
)
_MAX_ATTEMPTS = 200

_GRAVITY_AXES = {"down": (0, False), "up": (0, True), "right": (1, False), "left": (1, True)}
_MIRRORS = {
    "lr": (np.fliplr,),
    "ud": (np.flipud,),
    "both": (np.fliplr, np.flipud, lambda g: np.rot90(g, 2)),
}
_COLOURS = np.arange(1, 10)


@dataclass
class Puzzle:
    """One generated task: its family, the rule's parameters, and its demo and query pairs."""

    family: str
    params: Params
    demos: list[Pair]
    queries: list[Pair]

    def to_arc(self) -> dict:
        as_pair = lambda p: {"input": p[0].tolist(), "output": p[1].tolist()}  # noqa: E731
        return {"train": [as_pair(p) for p in self.demos], "test": [as_pair(p) for p in self.queries]}

    @property
    def pairs(self) -> list[Pair]:
        return self.demos + self.queries


# ---------------------------------------------------------------- grid helpers


def _shape(rng: np.random.Generator, lo: int, hi: int) -> tuple[int, int]:
    return int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))


def _noise(rng: np.random.Generator, shape: tuple[int, int], colours: Sequence[int], density: float) -> Grid:
    """Background 0 with a random fraction of cells painted in the given colours."""
    painted = rng.random(shape) < density
    return np.where(painted, rng.choice(np.asarray(colours), size=shape), 0).astype(np.int64)


def _palette(rng: np.random.Generator, lo: int, hi: int) -> np.ndarray:
    return rng.choice(_COLOURS, size=int(rng.integers(lo, hi + 1)), replace=False)


def _shift(mask: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Move an array by (dy, dx); cells pushed past an edge are dropped, vacated cells are zero."""
    h, w = mask.shape
    out = np.zeros_like(mask)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


_NEIGHBOURS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def _component_labels(grid: Grid) -> np.ndarray:
    """4-connected same-colour objects of non-zero cells: each gets the smallest flat index it holds.

    Whole-array label propagation with pointer jumping (a handful of passes on ARC-sized grids)
    instead of a per-cell flood fill in Python. Background cells get -1.
    """
    filled = grid != 0
    labels = np.arange(grid.size).reshape(grid.shape)
    same_as = [(dy, dx, _shift(grid + 1, dy, dx) - 1 == grid) for dy, dx in _NEIGHBOURS]
    while True:
        previous = labels
        for dy, dx, same in same_as:
            labels = np.where(same & filled, np.minimum(labels, _shift(labels, dy, dx)), labels)
        labels = labels.ravel()[labels]  # a label is a cell of the same object: follow its label
        if np.array_equal(labels, previous):
            return np.where(filled, labels, -1)


def _reachable_from_edge(open_cells: np.ndarray) -> np.ndarray:
    """Cells of `open_cells` 4-connected to the grid's edge through other open cells."""
    edge = np.zeros_like(open_cells)
    edge[[0, -1], :] = True
    edge[:, [0, -1]] = True
    reach = open_cells & edge
    while True:
        grown = reach.copy()
        for dy, dx in _NEIGHBOURS:
            grown |= _shift(reach, dy, dx)
        grown &= open_cells
        if np.array_equal(grown, reach):
            return reach
        reach = grown


def _blob(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random connected-looking mask whose bounding box is exactly h×w."""
    mask = rng.random((h, w)) < 0.65
    mask[int(rng.integers(h)), [0, -1]] = True
    mask[[0, -1], int(rng.integers(w))] = True
    return mask


# ---------------------------------------------------------------- families


class Family(ABC):
    """A rule with parameters. Subclasses say how to draw parameters and inputs and how to apply it."""

    name = ""
    summary = ""

    @abstractmethod
    def sample_params(self, rng: np.random.Generator, lo: int, hi: int) -> Params: ...

    @abstractmethod
    def sample_input(self, rng: np.random.Generator, params: Params, lo: int, hi: int) -> Grid | None:
        """A random input for this instance, or None to draw again."""
        ...

    @abstractmethod
    def apply(self, grid: Grid, params: Params) -> Grid: ...

    def param_space(self, lo: int, hi: int) -> list[Params]:
        """Every parameter value the rule can take at these grid sizes (what the demos choose among).

        The default `solve` searches this space; a family whose parameters are read off the demos
        directly (colour_map) overrides `solve` instead and has no space to list.
        """
        raise TypeError(f"family {self.name!r} reads its parameters in solve() and lists no space")

    def supports(self, lo: int, hi: int) -> bool:
        return True

    def solve(self, demos: Sequence[Pair], query: Grid, lo: int, hi: int) -> Grid | None:
        """The query's answer from the demos alone, or None when the demos leave it undetermined.

        Keeps every parameter value that maps each demo input to its output; the answer is
        determined when all of them agree on the query.
        """
        answers: dict[bytes, Grid] = {}
        for params in self.param_space(lo, hi):
            if all(_same(self.apply(x, params), y) for x, y in demos):
                answer = self.apply(query, params)
                answers[_grid_key(answer)] = answer
        return next(iter(answers.values())) if len(answers) == 1 else None


class ColourMap(Family):
    name = "colour_map"
    summary = "recolour every cell through a puzzle-specific colour mapping (background 0 stays)"

    def sample_params(self, rng, lo, hi):
        sources = _palette(rng, 2, 4)
        targets = rng.choice(_COLOURS, size=len(sources), replace=False)
        return {"mapping": {int(s): int(t) for s, t in zip(sources, targets, strict=True)}}

    def sample_input(self, rng, params, lo, hi):
        return _noise(rng, _shape(rng, lo, hi), list(params["mapping"]), rng.uniform(0.3, 0.9))

    def apply(self, grid, params):
        lookup = np.arange(10)
        for source, target in params["mapping"].items():
            lookup[int(source)] = target
        return lookup[grid]

    def solve(self, demos, query, lo, hi):
        """Read the colour mapping cell by cell off the demos; every query colour must have been shown."""
        lookup = np.full(10, -1)
        for x, y in demos:
            if x.shape != y.shape:
                return None
            for colour in np.unique(x):
                seen = np.unique(y[x == colour])
                if len(seen) != 1 or lookup[colour] not in (-1, seen[0]):
                    return None
                lookup[colour] = seen[0]
        answer = lookup[query]
        return None if (answer < 0).any() else answer


class Dihedral(Family):
    name = "dihedral"
    summary = "rotate, flip or transpose the whole grid (one of the 7 non-identity symmetries)"

    def sample_params(self, rng, lo, hi):
        return {"dihedral": int(rng.integers(1, NUM_DIHEDRAL))}  # the dataset's ids; 0 is the identity

    def sample_input(self, rng, params, lo, hi):
        return _noise(rng, _shape(rng, lo, hi), _palette(rng, 2, 4), rng.uniform(0.4, 0.9))

    def apply(self, grid, params):
        return np.ascontiguousarray(apply_dihedral(grid, params["dihedral"]))

    def param_space(self, lo, hi):
        return [{"dihedral": d} for d in range(1, NUM_DIHEDRAL)]


class Translate(Family):
    name = "translate"
    summary = "move everything by a fixed offset; what leaves the grid is lost"

    max_offset = 2

    def sample_params(self, rng, lo, hi):
        space = self.param_space(lo, hi)
        return space[int(rng.integers(len(space)))]

    def sample_input(self, rng, params, lo, hi):
        return _noise(rng, _shape(rng, lo, hi), _palette(rng, 1, 3), rng.uniform(0.15, 0.4))

    def apply(self, grid, params):
        return _shift(grid, params["dy"], params["dx"])

    def param_space(self, lo, hi):
        r = range(-self.max_offset, self.max_offset + 1)
        return [{"dy": dy, "dx": dx} for dy in r for dx in r if (dy, dx) != (0, 0)]


class Gravity(Family):
    name = "gravity"
    summary = "every coloured cell falls toward one side, keeping its order in its row or column"

    def sample_params(self, rng, lo, hi):
        return {"direction": str(rng.choice(list(_GRAVITY_AXES)))}

    def sample_input(self, rng, params, lo, hi):
        return _noise(rng, _shape(rng, lo, hi), _palette(rng, 1, 4), rng.uniform(0.15, 0.45))

    def apply(self, grid, params):
        axis, toward_start = _GRAVITY_AXES[params["direction"]]
        filled = grid != 0
        # A stable sort on "is filled" moves the filled cells to the end, in order.
        order = np.argsort(~filled if toward_start else filled, axis=axis, kind="stable")
        return np.take_along_axis(grid, order, axis=axis)

    def param_space(self, lo, hi):
        return [{"direction": d} for d in _GRAVITY_AXES]


class Scale(Family):
    name = "scale"
    summary = "blow every cell up into a k×k block"

    def _factors(self, lo, hi):
        return [k for k in (2, 3) if k * lo <= hi]

    def supports(self, lo, hi):
        return bool(self._factors(lo, hi))

    def sample_params(self, rng, lo, hi):
        return {"factor": int(rng.choice(self._factors(lo, hi)))}

    def sample_input(self, rng, params, lo, hi):
        return _noise(
            rng, _shape(rng, lo, hi // params["factor"]), _palette(rng, 1, 4), rng.uniform(0.3, 0.8)
        )

    def apply(self, grid, params):
        k = params["factor"]
        return np.repeat(np.repeat(grid, k, axis=0), k, axis=1)

    def param_space(self, lo, hi):
        return [{"factor": k} for k in self._factors(lo, hi)]


class Border(Family):
    name = "border"
    summary = "paint the outermost ring of cells in one colour"

    def sample_params(self, rng, lo, hi):
        return {"colour": int(rng.choice(_COLOURS))}

    def sample_input(self, rng, params, lo, hi):
        return _noise(rng, _shape(rng, lo, hi), _palette(rng, 1, 3), rng.uniform(0.1, 0.5))

    def apply(self, grid, params):
        out = grid.copy()
        out[[0, -1], :] = params["colour"]
        out[:, [0, -1]] = params["colour"]
        return out

    def param_space(self, lo, hi):
        return [{"colour": int(c)} for c in _COLOURS]


class RecolourLargest(Family):
    name = "recolour_largest"
    summary = "repaint the largest object (4-connected, one colour) in one colour"

    def sample_params(self, rng, lo, hi):
        return {"colour": int(rng.choice(_COLOURS))}

    def sample_input(self, rng, params, lo, hi):
        grid = _noise(rng, _shape(rng, lo, hi), _palette(rng, 2, 3), rng.uniform(0.3, 0.55))
        sizes = np.bincount(_component_labels(grid).ravel() + 1)[1:]
        top = np.sort(sizes)[-2:]
        return grid if len(top) == 2 and top[1] > top[0] else None  # a unique largest object

    def apply(self, grid, params):
        labels = _component_labels(grid)
        sizes = np.bincount(labels.ravel() + 1)[1:]
        if not sizes.any():
            return grid.copy()
        return np.where(labels == int(np.argmax(sizes)), params["colour"], grid)

    def param_space(self, lo, hi):
        return [{"colour": int(c)} for c in _COLOURS]


class FillEnclosed(Family):
    name = "fill_enclosed"
    summary = "fill the background cells that walls cut off from the grid's edge"

    def supports(self, lo, hi):
        return hi >= 3

    def sample_params(self, rng, lo, hi):
        return {"colour": int(rng.choice(_COLOURS))}

    def sample_input(self, rng, params, lo, hi):
        h, w = _shape(rng, max(lo, 3), hi)
        wall = int(rng.choice(_COLOURS))
        grid = _noise(rng, (h, w), [wall], rng.uniform(0.0, 0.1))
        for _ in range(int(rng.integers(1, 4))):
            bh, bw = int(rng.integers(3, h + 1)), int(rng.integers(3, w + 1))
            top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
            grid[top, left : left + bw] = grid[top + bh - 1, left : left + bw] = wall
            grid[top : top + bh, left] = grid[top : top + bh, left + bw - 1] = wall
        return grid

    def apply(self, grid, params):
        background = grid == 0
        return np.where(background & ~_reachable_from_edge(background), params["colour"], grid)

    def param_space(self, lo, hi):
        return [{"colour": int(c)} for c in _COLOURS]


class MirrorComplete(Family):
    name = "mirror_complete"
    summary = "a symmetric picture has a hole (0); restore it from its mirror image"

    def supports(self, lo, hi):
        return hi >= 4

    def sample_params(self, rng, lo, hi):
        return {"axis": str(rng.choice(list(_MIRRORS)))}

    def sample_input(self, rng, params, lo, hi):
        axis = params["axis"]
        h, w = _shape(rng, max(lo, 4), hi)
        colours = _palette(rng, 2, 4)
        picture = rng.choice(colours, size=(h, w))
        if axis in ("lr", "both"):
            picture = np.where(np.arange(w) < w - np.arange(w) - 1, picture, np.fliplr(picture))
        if axis in ("ud", "both"):
            picture = np.where((np.arange(h) < h - np.arange(h) - 1)[:, None], picture, np.flipud(picture))
        hole_h, hole_w = int(rng.integers(1, h // 2 + 1)), int(rng.integers(1, w // 2 + 1))
        top, left = int(rng.integers(0, h - hole_h + 1)), int(rng.integers(0, w - hole_w + 1))
        picture[top : top + hole_h, left : left + hole_w] = 0
        return picture if (self.apply(picture, params) != 0).all() else None  # the mirror covers the hole

    def apply(self, grid, params):
        out = grid.copy()
        for mirror in _MIRRORS[params["axis"]]:
            reflected = mirror(out)
            out = np.where((out == 0) & (reflected != 0), reflected, out)
        return out

    def param_space(self, lo, hi):
        return [{"axis": a} for a in _MIRRORS]


class CropObject(Family):
    name = "crop_object"
    summary = "cut out the bounding box of the object of one colour"

    max_box = 5

    def supports(self, lo, hi):
        return lo <= self.max_box and 2 * lo + 1 <= hi  # room for two boxes and a gap

    def sample_params(self, rng, lo, hi):
        return {"colour": int(rng.choice(_COLOURS))}

    def sample_input(self, rng, params, lo, hi):
        h, w = _shape(rng, max(lo, 2 * lo + 1), hi)
        grid = np.zeros((h, w), dtype=np.int64)
        taken = np.zeros((h, w), dtype=bool)
        distractors = rng.choice(
            _COLOURS[_COLOURS != params["colour"]], size=int(rng.integers(1, 3)), replace=False
        )
        for colour in [params["colour"], *distractors]:
            for _ in range(20):
                bh = int(rng.integers(lo, min(self.max_box, h) + 1))
                bw = int(rng.integers(lo, min(self.max_box, w) + 1))
                top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
                # Boxes keep a one-cell gap so no bounding box takes in another object's cells.
                if not taken[max(top - 1, 0) : top + bh + 1, max(left - 1, 0) : left + bw + 1].any():
                    taken[top : top + bh, left : left + bw] = True
                    grid[top : top + bh, left : left + bw] = np.where(_blob(rng, bh, bw), int(colour), 0)
                    break
            else:
                return None
        return grid

    def apply(self, grid, params):
        rows, cols = np.nonzero(grid == params["colour"])
        if len(rows) == 0:
            return np.zeros((0, 0), dtype=grid.dtype)
        return grid[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].copy()

    def param_space(self, lo, hi):
        return [{"colour": int(c)} for c in _COLOURS]


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        ColourMap(),
        Dihedral(),
        Translate(),
        Gravity(),
        Scale(),
        Border(),
        RecolourLargest(),
        FillEnclosed(),
        MirrorComplete(),
        CropObject(),
    )
}


# ---------------------------------------------------------------- puzzles


def _same(a: Grid, b: Grid) -> bool:
    return a.shape == b.shape and bool((a == b).all())


def _grid_key(grid: Grid) -> bytes:
    return (
        np.asarray(grid.shape, dtype=np.int64).tobytes() + np.ascontiguousarray(grid, dtype=np.int8).tobytes()
    )


def generate_puzzle(family: Family, rng: np.random.Generator, lo: int, hi: int) -> Puzzle:
    """Draw parameters and inputs until every grid is in range, every pair shows the rule acting on
    a non-empty answer, all inputs differ, and the demos determine every query's answer."""
    for _ in range(_MAX_ATTEMPTS):
        params = family.sample_params(rng, lo, hi)
        num_demos = int(rng.integers(DEMOS_PER_PUZZLE[0], DEMOS_PER_PUZZLE[1] + 1))
        num_queries = int(rng.integers(QUERIES_PER_PUZZLE[0], QUERIES_PER_PUZZLE[1] + 1))
        pairs: list[Pair] = []
        keys: set[bytes] = set()
        for _ in range(_MAX_ATTEMPTS):
            if len(pairs) == num_demos + num_queries:
                break
            x = family.sample_input(rng, params, lo, hi)
            if x is None or _grid_key(x) in keys:
                continue
            keys.add(_grid_key(x))
            y = family.apply(x, params)
            # The rule must act, and leave something to draw: an all-background answer is guessable.
            if _same(x, y) or not y.any() or not all(lo <= side <= hi for side in (*x.shape, *y.shape)):
                continue
            pairs.append((x, y))
        demos, queries = pairs[:num_demos], pairs[num_demos:]
        if len(queries) == num_queries and all(
            (answer := family.solve(demos, x, lo, hi)) is not None and _same(answer, y) for x, y in queries
        ):
            return Puzzle(family.name, params, demos, queries)
    raise EtrmError(f"family {family.name!r}: could not generate a determined puzzle at grid size {lo}..{hi}")


def _puzzle_rng(seed: int, split: str, family: str, index: int) -> np.random.Generator:
    """One independent stream per puzzle: adding families or puzzles never changes the others."""
    return np.random.default_rng([seed, zlib.crc32(split.encode()), zlib.crc32(family.encode()), index])


def task_id(family: str, split: str, index: int) -> str:
    return f"{family}-{split}-{index:04d}"


def family_of(task_id: str) -> str:
    """The family a synthetic task id belongs to (ids read `<family>-<split>-<index>`)."""
    return task_id.split("-", 1)[0]


def parse_grid_size(text: str) -> tuple[int, int]:
    """`MIN..MAX` or a single `N` → (min, max), each side 1..30."""
    lo_text, _, hi_text = text.partition("..")
    try:
        lo, hi = int(lo_text), int(hi_text or lo_text)
    except ValueError:
        raise EtrmError(f"--grid-size {text!r}: expected MIN..MAX, e.g. 3..12") from None
    if not 1 <= lo <= hi <= 30:
        raise EtrmError(f"--grid-size {text!r}: need 1 <= MIN <= MAX <= 30")
    return lo, hi


def resolve_families(names: Sequence[str] | None, lo: int, hi: int) -> list[str]:
    """Check family names (default: all) and that each can make grids of the requested size."""
    chosen = list(names) if names else list(FAMILIES)
    for name in chosen:
        if name not in FAMILIES:
            raise EtrmError(f"--families: unknown family {name!r}; known: {', '.join(FAMILIES)}")
        if not FAMILIES[name].supports(lo, hi):
            raise EtrmError(f"--families: {name!r} cannot make grids at --grid-size {lo}..{hi}")
    if len(set(chosen)) != len(chosen):
        raise EtrmError(f"--families: a family is named twice in {', '.join(chosen)}")
    return chosen


def split_families(
    families: Sequence[str], holdout: str, test_families: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """(training families, test families) for a hold-out mode."""
    if holdout not in HOLDOUTS:
        raise EtrmError(f"--holdout {holdout!r}: expected one of {', '.join(HOLDOUTS)}")
    if holdout == "instances":
        if test_families:
            raise EtrmError("--test-families only applies with --holdout families")
        return list(families), list(families)
    held = list(test_families) if test_families else list(families[-2:])
    unknown = [f for f in held if f not in families]
    if unknown:
        raise EtrmError(f"--test-families: {', '.join(unknown)} not among --families {', '.join(families)}")
    train = [f for f in families if f not in held]
    if not train:
        raise EtrmError("--holdout families: no family left to train on; name fewer --test-families")
    return train, held


def synthesize_puzzles(
    train_families: Sequence[str],
    test_families: Sequence[str],
    train_per_family: int,
    test_per_family: int,
    grid_size: tuple[int, int] = DEFAULT_GRID_SIZE,
    seed: int = 0,
) -> dict[str, dict[str, Puzzle]]:
    """{"train": {task_id: Puzzle}, "test": {...}} with no grid pair shared between the splits.

    A test puzzle with a pair that equals a training pair up to rotation, reflection and colour
    permutation (the dataset build's own leakage key) is drawn again, so the build keeps every
    training puzzle and the test puzzles stay unseen under augmentation too.
    """
    lo, hi = grid_size
    train = {
        task_id(name, "train", index): generate_puzzle(
            FAMILIES[name], _puzzle_rng(seed, "train", name, index), lo, hi
        )
        for name in train_families
        for index in range(train_per_family)
    }
    train_keys = {pair_key(x, y) for puzzle in train.values() for x, y in puzzle.pairs}
    test = {}
    for name in test_families:
        for index in range(test_per_family):
            rng = _puzzle_rng(seed, "test", name, index)
            for _ in range(_MAX_ATTEMPTS):
                puzzle = generate_puzzle(FAMILIES[name], rng, lo, hi)
                if not any(pair_key(x, y) in train_keys for x, y in puzzle.pairs):
                    break
            else:
                raise EtrmError(
                    f"family {name!r}: test puzzles keep repeating training pairs; widen --grid-size"
                )
            test[task_id(name, "test", index)] = puzzle
    return {"train": train, "test": test}


def write_synthetic(
    out: str | Path,
    families: Sequence[str] | None = None,
    train_per_family: int = 200,
    test_per_family: int = 20,
    grid_size: tuple[int, int] = DEFAULT_GRID_SIZE,
    seed: int = 0,
    holdout: str = "instances",
    test_families: Sequence[str] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write `out/train/*.json`, `out/test/*.json` (ARC task files) and `out/synth.json` (a manifest
    naming each task's family and parameters). Returns the manifest."""
    out = Path(out)
    lo, hi = grid_size
    chosen = resolve_families(families, lo, hi)
    train_families, held_families = split_families(chosen, holdout, test_families)
    if train_per_family < 1 or test_per_family < 1:
        raise EtrmError("--train-puzzles and --test-puzzles must be at least 1")
    check_seed(seed)
    if out.exists() and not overwrite:
        raise EtrmError(f"--out {out}: already exists (pass --overwrite to replace it)")
    check_replaceable(out, SYNTHETIC)
    splits = synthesize_puzzles(
        train_families, held_families, train_per_family, test_per_family, grid_size, seed
    )
    manifest = {
        "generator": "etrm data synth",
        "seed": seed,
        "holdout": holdout,
        "grid_size": [lo, hi],
        "families": {"train": train_families, "test": held_families},
        "counts": {split: len(puzzles) for split, puzzles in splits.items()},
        "tasks": {
            tid: {"split": split, "family": p.family, "params": p.params}
            for split, puzzles in splits.items()
            for tid, p in puzzles.items()
        },
    }
    with atomic_dir(out, overwrite=overwrite, output=SYNTHETIC) as tmp:
        for split, puzzles in splits.items():
            (tmp / split).mkdir()
            for tid, puzzle in puzzles.items():
                (tmp / split / f"{tid}.json").write_text(json.dumps(puzzle.to_arc(), separators=(",", ":")))
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
    return manifest
