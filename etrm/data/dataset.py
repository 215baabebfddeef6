"""Reading a dataset folder written by `etrm data build` (layout in etrm/data/build.py)."""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from etrm.data import augment
from etrm.data.build import FORMAT_VERSION, SPLIT_FILES, SPLIT_NAMES
from etrm.data.encoding import CANVAS, COLOR_OFFSET, SEQ_LEN, VOCAB_SIZE
from etrm.errors import EtrmError


def open_dataset(path: str) -> ArcDataset:
    """The dataset `data.path` names, or an error saying how to build one there."""
    if not Path(path).exists():
        raise EtrmError(
            f"data.path={path}: no dataset there; build one with `etrm data build --out {path}` "
            f"or point --set data.path=... at a folder written by `etrm data build`"
        )
    return ArcDataset.open(path)


class ArcDataset:
    """A built dataset: its manifest and its train/test splits (loaded on first use)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self._splits: dict[str, Split] = {}

    @classmethod
    def open(cls, path: str | Path) -> ArcDataset:
        path = Path(path)
        manifest_file = path / "manifest.json"
        if not manifest_file.is_file():
            raise EtrmError(
                f"{path}: not a dataset folder (no manifest.json; build one with `etrm data build`)"
            )
        try:
            manifest = json.loads(manifest_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EtrmError(f"{manifest_file}: not valid JSON ({e})") from None
        except RecursionError:
            raise EtrmError(f"{manifest_file}: JSON nested too deeply to be a manifest") from None
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        if version != FORMAT_VERSION:
            raise EtrmError(f"{manifest_file}: format_version {version!r}, this etrm reads {FORMAT_VERSION}")
        return cls(path, manifest)

    @property
    def fewshot(self) -> bool:
        return bool(self.manifest["fewshot"])

    def split(self, name: str) -> Split:
        if name not in SPLIT_NAMES:
            raise EtrmError(f"split {name!r}: choose one of {', '.join(SPLIT_NAMES)}")
        if name not in self._splits:
            self._splits[name] = Split.load(self.path / name, name)
        return self._splits[name]


class Split:
    """One side of a dataset. Groups are original puzzles; pairs and grids are stored once,
    augmentations as (dihedral, colour permutation) rows applied on demand."""

    def __init__(self, name: str, puzzles: list[dict], arrays: dict[str, np.ndarray]):
        self.name = name
        self.puzzle_ids = [p["id"] for p in puzzles]
        self.puzzle_sources = [p["source"] for p in puzzles]
        self.tokens = arrays["tokens"]  # uint8 [grids, 900]
        self.shapes = arrays["shapes"]  # uint8 [grids, 2]
        self.pair_offsets = arrays["pair_offsets"]  # int64 [groups + 1]
        self.num_demos = arrays["num_demos"]  # int64 [groups]
        self.aug_offsets = arrays["aug_offsets"]  # int64 [groups + 1]
        self.aug_dihedral = arrays["aug_dihedral"]  # uint8 [augs]
        self.aug_colors = arrays["aug_colors"]  # uint8 [augs, 10]
        self.puzzle_identifiers = arrays["puzzle_identifiers"]  # int32 [augs]
        self._index = {task_id: g for g, task_id in enumerate(self.puzzle_ids)}

    @classmethod
    def load(cls, folder: Path, name: str) -> Split:
        for file in SPLIT_FILES:
            if not (folder / file).is_file():
                raise EtrmError(f"{folder / file}: missing (the dataset folder is incomplete)")
        arrays = {}
        for file in SPLIT_FILES:
            try:
                if file.endswith(".npy"):
                    arrays[file.removesuffix(".npy")] = np.load(folder / file, allow_pickle=False)
                else:
                    puzzles = json.loads((folder / file).read_text())
            except (ValueError, OSError) as e:  # JSONDecodeError is a ValueError
                raise EtrmError(f"{folder / file}: unreadable ({e}); rebuild the dataset") from None
        _check_grids(folder, arrays["tokens"], arrays["shapes"])
        return cls(name, puzzles, arrays)

    def __len__(self) -> int:
        return len(self.puzzle_ids)

    def group_index(self, task_id: str) -> int:
        if task_id not in self._index:
            close = difflib.get_close_matches(task_id, self.puzzle_ids, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise EtrmError(f"task {task_id!r} is not in the {self.name} split{hint}")
        return self._index[task_id]

    def subset(self, groups: Sequence[int]) -> Split:
        """A Split of its own holding these groups (in this order), with their pairs and augmentations."""
        groups = [int(g) for g in groups]
        pair_rows = [np.arange(self.pair_offsets[g], self.pair_offsets[g + 1]) for g in groups]
        aug_rows = [np.arange(self.aug_offsets[g], self.aug_offsets[g + 1]) for g in groups]
        pairs = np.concatenate(pair_rows) if groups else np.zeros(0, dtype=np.int64)
        augs = np.concatenate(aug_rows) if groups else np.zeros(0, dtype=np.int64)
        grid_rows = np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1)
        arrays = {
            "tokens": self.tokens[grid_rows],
            "shapes": self.shapes[grid_rows],
            "pair_offsets": np.concatenate([[0], np.cumsum([len(r) for r in pair_rows])]).astype(np.int64),
            "num_demos": self.num_demos[groups],
            "aug_offsets": np.concatenate([[0], np.cumsum([len(r) for r in aug_rows])]).astype(np.int64),
            "aug_dihedral": self.aug_dihedral[augs],
            "aug_colors": self.aug_colors[augs],
            "puzzle_identifiers": self.puzzle_identifiers[augs],
        }
        puzzles = [{"id": self.puzzle_ids[g], "source": self.puzzle_sources[g]} for g in groups]
        return Split(self.name, puzzles, arrays)

    def num_pairs(self, g: int) -> int:
        return int(self.pair_offsets[g + 1] - self.pair_offsets[g])

    def grid(self, row: int) -> np.ndarray:
        """Stored grid `row` of tokens.npy as colours."""
        height, width = self.shapes[row]
        return self.tokens[row].reshape(CANVAS, CANVAS)[:height, :width].astype(np.int64) - COLOR_OFFSET

    def pairs(self, g: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """All pairs of group g, demos first."""
        first = int(self.pair_offsets[g])
        return [(self.grid(2 * p), self.grid(2 * p + 1)) for p in range(first, int(self.pair_offsets[g + 1]))]

    def demos(self, g: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.pairs(g)[: int(self.num_demos[g])]

    def queries(self, g: int) -> list[tuple[np.ndarray, np.ndarray]]:
        return self.pairs(g)[int(self.num_demos[g]) :]

    def num_queries(self, g: int) -> int:
        return self.num_pairs(g) - int(self.num_demos[g])

    def num_augs(self, g: int) -> int:
        return int(self.aug_offsets[g + 1] - self.aug_offsets[g])

    def augmentation(self, g: int, a: int) -> tuple[int, np.ndarray]:
        """(dihedral id, colour permutation [10]) of augmentation a of group g."""
        if not 0 <= a < self.num_augs(g):
            raise EtrmError(
                f"augmentation {a} of {self.puzzle_ids[g]}: it has {self.num_augs(g)} (0-{self.num_augs(g) - 1})"
            )
        row = int(self.aug_offsets[g]) + a
        return int(self.aug_dihedral[row]), self.aug_colors[row]

    def augment_grid(self, grid: np.ndarray, g: int, a: int) -> np.ndarray:
        return augment.augment_grid(grid, *self.augmentation(g, a))

    def invert_grid(self, grid: np.ndarray, g: int, a: int) -> np.ndarray:
        return augment.invert_grid(grid, *self.augmentation(g, a))

    def puzzle_identifier(self, g: int, a: int) -> int:
        return int(self.puzzle_identifiers[int(self.aug_offsets[g]) + a])


def first_groups(split: Split, n: int) -> Split:
    """The first `n` puzzle groups of a split, as a Split of its own: the groups a run with
    `data.max_train_groups=n` trains on (overfit presets train on 32), so train EM scores those."""
    if n <= 0 or n >= len(split.puzzle_ids):
        return split
    return split.subset(range(n))


def _check_grids(folder: Path, tokens: np.ndarray, shapes: np.ndarray) -> None:
    """Tokens the model can embed and grid sizes that fit the canvas, or one line naming the file."""
    if (
        tokens.ndim != 2
        or tokens.shape[1] != SEQ_LEN
        or (tokens.size and not 0 <= tokens.min() <= tokens.max() < VOCAB_SIZE)
    ):
        raise EtrmError(
            f"{folder / 'tokens.npy'}: not {SEQ_LEN} tokens per grid in 0-{VOCAB_SIZE - 1}; the dataset is corrupt, rebuild it"
        )
    if shapes.shape != (len(tokens), 2) or (shapes.size and not 1 <= shapes.min() <= shapes.max() <= CANVAS):
        raise EtrmError(
            f"{folder / 'shapes.npy'}: not a height and width in 1-{CANVAS} per grid; the dataset is corrupt, rebuild it"
        )
