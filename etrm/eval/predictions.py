"""Raw per-augmentation predictions (`predictions.npz`): everything voting needs, so re-voting runs no model.

Predictions are stored after cropping at EOS and inverting the augmentation, i.e. in
the original puzzle's frame. Each distinct grid is stored once in a grid table; a
[queries × augmentations] matrix of grid ids says what every augmentation predicted.
Rows select puzzles, leading columns select the first N augmentations (column a is
augmentation a, so column 0 is the identity).
"""

from __future__ import annotations

import io
import json
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from etrm.errors import EtrmError
from etrm.io import atomic_write_bytes

FORMAT = "etrm-predictions-1"
NO_GRID = -1  # the augmentation ran but its output had no valid rectangle (or the target is unknown)
NOT_EVALUATED = -2  # the puzzle has fewer augmentations than the widest one
_FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest a zip member can carry

_ARRAY_KEYS = (
    "task_ids",
    "query_task",
    "query_index",
    "grid_ids",
    "q_halt",
    "target_ids",
    "grid_cells",
    "grid_offsets",
    "grid_shapes",
    "meta",
)


@dataclass(frozen=True)
class GridTable:
    """Distinct grids, ragged: grid i is cells[offsets[i]:offsets[i+1]] reshaped to shapes[i]."""

    cells: np.ndarray  # uint8 [total cells]
    offsets: np.ndarray  # int64 [U + 1]
    shapes: np.ndarray  # int32 [U, 2]

    def __len__(self) -> int:
        return len(self.shapes)

    def check(self) -> None:
        """Offsets that cut `cells` into grids of the recorded shapes, colours 0-9 (ValueError otherwise)."""
        offsets, shapes = self.offsets, self.shapes
        sizes = np.prod(shapes, axis=1) if shapes.ndim == 2 and shapes.shape[1] == 2 else None
        if (
            sizes is None
            or offsets.shape != (len(shapes) + 1,)
            or offsets[0] != 0
            or not np.array_equal(np.diff(offsets), sizes)
            or offsets[-1] != len(self.cells)
            or (len(self.cells) and self.cells.max() > 9)
            or (len(shapes) and not 1 <= shapes.min() <= shapes.max() <= 30)
        ):
            raise ValueError("the grid table's cells, offsets and shapes disagree")

    def grid(self, grid_id: int) -> np.ndarray:
        h, w = self.shapes[grid_id]
        return self.cells[self.offsets[grid_id] : self.offsets[grid_id + 1]].reshape(int(h), int(w))


class GridInterner:
    """Assigns one id per distinct grid (shape and cells), so votes are counted by comparing ints."""

    def __init__(self) -> None:
        self._ids: dict[tuple[int, int, bytes], int] = {}
        self._grids: list[np.ndarray] = []

    def add(self, grid: np.ndarray) -> int:
        grid = np.ascontiguousarray(grid, dtype=np.uint8)
        if grid.ndim != 2:
            raise ValueError(f"a grid must be 2-D, got shape {grid.shape}")
        key = (grid.shape[0], grid.shape[1], grid.tobytes())
        grid_id = self._ids.get(key)
        if grid_id is None:
            grid_id = self._ids[key] = len(self._grids)
            self._grids.append(grid)
        return grid_id

    def table(self) -> GridTable:
        sizes = np.array([g.size for g in self._grids], dtype=np.int64)
        offsets = np.zeros(len(self._grids) + 1, dtype=np.int64)
        np.cumsum(sizes, out=offsets[1:])
        cells = np.concatenate([g.ravel() for g in self._grids]) if self._grids else np.zeros(0, np.uint8)
        shapes = np.array([g.shape for g in self._grids], dtype=np.int32).reshape(-1, 2)
        return GridTable(cells=cells, offsets=offsets, shapes=shapes)


@dataclass
class Predictions:
    """Every (query, augmentation) prediction of one evaluation, in the original frame."""

    task_ids: list[str]  # puzzles evaluated, in split order
    query_task: np.ndarray  # int32 [Q]: index into task_ids
    query_index: np.ndarray  # int32 [Q]: position of the query (test pair) within its puzzle
    grid_ids: np.ndarray  # int32 [Q, A]: grid table id, NO_GRID or NOT_EVALUATED
    q_halt: np.ndarray  # float32 [Q, A]: q_halt logit at the last ACT step
    target_ids: np.ndarray  # int32 [Q]: grid table id of the expected output, NO_GRID if unknown
    grids: GridTable
    meta: dict[str, Any] = field(default_factory=dict)  # split, fewshot, step, dataset

    def __post_init__(self) -> None:
        q, a = self.grid_ids.shape
        if self.q_halt.shape != (q, a) or self.query_task.shape != (q,) or self.target_ids.shape != (q,):
            raise ValueError("predictions arrays disagree on the number of queries/augmentations")
        with_queries = np.bincount(self.query_task, minlength=len(self.task_ids)) if q else np.zeros(0)
        if len(with_queries) != len(self.task_ids) or not np.all(with_queries > 0):
            raise ValueError("every puzzle in task_ids needs at least one query")
        self.grids.check()
        if q and a and not NOT_EVALUATED <= self.grid_ids.min() <= self.grid_ids.max() < len(self.grids):
            raise ValueError(f"grid ids outside {NOT_EVALUATED}..{len(self.grids) - 1}")
        if q and not NO_GRID <= self.target_ids.min() <= self.target_ids.max() < len(self.grids):
            raise ValueError(f"target ids outside {NO_GRID}..{len(self.grids) - 1}")

    @property
    def num_aug(self) -> int:
        """Augmentation columns (the most any puzzle has)."""
        return self.grid_ids.shape[1]

    def select(self, num_aug: int = 0, task_ids: list[str] | None = None) -> Predictions:
        """The first `num_aug` augmentations (0 = all) of the named puzzles (None = all), for re-voting."""
        if num_aug < 0:
            raise EtrmError(f"--num-aug must be ≥ 0, got {num_aug}")
        columns = slice(0, num_aug or self.num_aug)
        if task_ids is None:
            keep_tasks = list(range(len(self.task_ids)))
        else:
            position = {t: i for i, t in enumerate(self.task_ids)}
            unknown = [t for t in task_ids if t not in position]
            if unknown:
                raise EtrmError(f"task(s) not in these predictions: {', '.join(unknown)}")
            keep_tasks = sorted({position[t] for t in task_ids})
        new_index = np.full(len(self.task_ids), -1, dtype=np.int64)
        new_index[keep_tasks] = np.arange(len(keep_tasks))
        rows = new_index[self.query_task] >= 0
        return Predictions(
            task_ids=[self.task_ids[i] for i in keep_tasks],
            query_task=new_index[self.query_task[rows]].astype(np.int32),
            query_index=self.query_index[rows],
            grid_ids=self.grid_ids[rows, columns],
            q_halt=self.q_halt[rows, columns],
            target_ids=self.target_ids[rows],
            grids=self.grids,
            meta=dict(self.meta),
        )

    def save(self, path: str | os.PathLike) -> None:
        """An npz file whose bytes depend on the predictions alone (np.savez stamps each member with
        the clock), so evaluations of one checkpoint compare byte for byte."""
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for key, value in self._arrays().items():
                member = io.BytesIO()
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
                info = zipfile.ZipInfo(f"{key}.npy", date_time=_FIXED_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                archive.writestr(info, member.getvalue())
        atomic_write_bytes(path, buffer.getvalue())

    def _arrays(self) -> dict[str, np.ndarray]:
        return {
            "task_ids": np.array(self.task_ids, dtype=np.str_),
            "query_task": self.query_task.astype(np.int32),
            "query_index": self.query_index.astype(np.int32),
            "grid_ids": self.grid_ids.astype(np.int32),
            "q_halt": self.q_halt.astype(np.float32),
            "target_ids": self.target_ids.astype(np.int32),
            "grid_cells": self.grids.cells,
            "grid_offsets": self.grids.offsets,
            "grid_shapes": self.grids.shapes,
            "meta": np.array(json.dumps({"format": FORMAT, **self.meta})),
        }

    @classmethod
    def load(cls, path: str | os.PathLike) -> Predictions:
        path = Path(path)
        if not path.is_file():
            raise EtrmError(f"predictions file not found: {path}")
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in _ARRAY_KEYS if k not in npz.files]
                if missing:
                    raise EtrmError(f"{path} is not an etrm predictions file (missing {', '.join(missing)})")
                arrays = {k: npz[k] for k in _ARRAY_KEYS}
            meta = json.loads(str(arrays["meta"]))
        except (OSError, ValueError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error) as e:
            raise EtrmError(f"cannot read predictions file {path}: {e}") from None
        if not isinstance(meta, dict) or meta.pop("format", None) != FORMAT:
            raise EtrmError(f"{path}: unsupported predictions format (expected {FORMAT})")
        try:
            return cls(
                task_ids=[str(t) for t in arrays["task_ids"]],
                query_task=arrays["query_task"],
                query_index=arrays["query_index"],
                grid_ids=arrays["grid_ids"],
                q_halt=arrays["q_halt"],
                target_ids=arrays["target_ids"],
                grids=GridTable(arrays["grid_cells"], arrays["grid_offsets"], arrays["grid_shapes"]),
                meta=meta,
            )
        except ValueError as e:
            raise EtrmError(f"{path}: inconsistent predictions ({e})") from e


class PredictionsBuilder:
    """Collects predictions as batches arrive; `build()` checks every (query, augmentation) came in once."""

    def __init__(
        self,
        task_ids: list[str],
        targets: list[list[np.ndarray | None]],
        num_augs: list[int],
        meta: dict[str, Any] | None = None,
    ) -> None:
        if not (len(task_ids) == len(targets) == len(num_augs)):
            raise ValueError("task_ids, targets and num_augs must have one entry per puzzle")
        self._grids = GridInterner()
        self._task_ids = list(task_ids)
        self._meta = dict(meta or {})
        self._max_queries = max((len(q) for q in targets), default=0)
        # Row of (task, query) at task * max_queries + query; -1 where the puzzle has fewer queries.
        self._row_of = np.full(len(targets) * self._max_queries, -1, dtype=np.int64)
        query_task, query_index, target_ids, row_augs = [], [], [], []
        for task, per_query in enumerate(targets):
            for query, target in enumerate(per_query):
                self._row_of[task * self._max_queries + query] = len(query_task)
                query_task.append(task)
                query_index.append(query)
                target_ids.append(NO_GRID if target is None else self._grids.add(target))
                row_augs.append(num_augs[task])
        width = max(num_augs, default=0)
        self._query_task = np.array(query_task, dtype=np.int32)
        self._query_index = np.array(query_index, dtype=np.int32)
        self._target_ids = np.array(target_ids, dtype=np.int32)
        self._expected = np.arange(width)[None, :] < np.array(row_augs, dtype=np.int64).reshape(-1, 1)
        self._filled = np.zeros_like(self._expected)
        self._grid_ids = np.full(self._expected.shape, NOT_EVALUATED, dtype=np.int32)
        self._q_halt = np.full(self._expected.shape, np.nan, dtype=np.float32)

    def add(self, task: int, query: int, aug: int, grid: np.ndarray | None, q_halt: float) -> None:
        """Record what augmentation `aug` of a query predicted (already de-augmented; None = no grid)."""
        grid_id = NO_GRID if grid is None else self._grids.add(grid)
        self._fill(
            np.array([task]), np.array([query]), np.array([aug]), np.array([grid_id]), np.array([q_halt])
        )

    def add_shard(self, shard: Shard) -> None:
        """Record a shard's predictions (one process's share of an evaluation), in any order."""
        table = shard.grids
        ids = np.array([self._grids.add(table.grid(i)) for i in range(len(table))] + [NO_GRID], np.int64)
        self._fill(shard.task, shard.query, shard.aug, ids[shard.grid_ids], shard.q_halt)

    def _fill(self, task, query, aug, grid_ids, q_halt) -> None:
        task, query, aug = (np.asarray(x, dtype=np.int64) for x in (task, query, aug))
        width = self._expected.shape[1]
        key = task * self._max_queries + query
        known = (task >= 0) & (task < len(self._task_ids)) & (query >= 0) & (query < self._max_queries)
        row = np.where(known, self._row_of[np.where(known, key, 0)], -1)
        ok = (row >= 0) & (aug >= 0) & (aug < width)
        ok[ok] = self._expected[row[ok], aug[ok]]
        if not ok.all():
            i = int(np.argmin(ok))
            raise ValueError(f"unexpected prediction: task {task[i]}, query {query[i]}, aug {aug[i]}")
        cells = row * width + aug
        unique, counts = np.unique(cells, return_counts=True)
        repeated = unique[(counts > 1) | self._filled.reshape(-1)[unique]]
        if len(repeated):
            r, a = divmod(int(repeated[0]), width)
            raise ValueError(
                f"repeated prediction: task {self._query_task[r]}, query {self._query_index[r]}, aug {a}"
            )
        self._filled.reshape(-1)[cells] = True
        self._grid_ids.reshape(-1)[cells] = grid_ids
        self._q_halt.reshape(-1)[cells] = q_halt

    def build(self) -> Predictions:
        """The predictions, grids numbered by first use (targets, then row by row), so the result does
        not depend on the order predictions arrived in (how many processes ran, say)."""
        missing = np.argwhere(self._expected & ~self._filled)
        if len(missing):
            row, aug = missing[0]
            raise ValueError(f"{len(missing)} predictions missing, e.g. row {row}, aug {aug}")
        table = self._grids.table()
        used = np.concatenate([self._target_ids, self._grid_ids.reshape(-1)])
        used = used[used >= 0]
        _, first = np.unique(used, return_index=True)
        order = used[np.sort(first)]  # old ids in order of first use
        renumber = np.full(len(table) + 2, NOT_EVALUATED, dtype=np.int32)  # [-2, -1] map to themselves
        renumber[order] = np.arange(len(order), dtype=np.int32)
        renumber[NO_GRID] = NO_GRID
        interner = GridInterner()
        for old in order:
            interner.add(table.grid(int(old)))
        return Predictions(
            task_ids=self._task_ids,
            query_task=self._query_task,
            query_index=self._query_index,
            grid_ids=renumber[self._grid_ids],
            q_halt=self._q_halt,
            target_ids=renumber[self._target_ids],
            grids=interner.table(),
            meta=self._meta,
        )


@dataclass(frozen=True)
class Shard:
    """Some (query, augmentation) predictions with their own grid table: what one process sends."""

    task: np.ndarray  # int64 [n]
    query: np.ndarray  # int64 [n]
    aug: np.ndarray  # int64 [n]
    grid_ids: np.ndarray  # int64 [n]: into `grids`, NO_GRID for none
    q_halt: np.ndarray  # float32 [n]
    grids: GridTable
