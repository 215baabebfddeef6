"""What the runs got wrong, from their saved evaluation results (results.json; no model run)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from etrm.data.encoding import NUM_COLORS

OUTCOME_K = "2"  # a puzzle counts as solved within two attempts, as ARC scores it


@dataclass
class Outcomes:
    runs: list[str]
    puzzles: list[str]
    solved: np.ndarray  # [runs, puzzles]: share of the puzzle's queries solved; NaN = not evaluated


def puzzle_score(puzzle: dict[str, Any]) -> float:
    scores = puzzle.get("pass@k", {})
    value = scores.get(OUTCOME_K, scores.get("1"))
    return float(value) if isinstance(value, (int, float)) else float("nan")


def outcome_matrix(results: dict[str, dict[str, Any]]) -> Outcomes:
    """Runs × test puzzles, from each run's results.json (run name → parsed JSON)."""
    runs = list(results)
    puzzles = sorted({task for r in results.values() for task in r.get("puzzles", {})})
    solved = np.full((len(runs), len(puzzles)), np.nan)
    column = {task: j for j, task in enumerate(puzzles)}
    for i, run in enumerate(runs):
        for task, puzzle in results[run].get("puzzles", {}).items():
            solved[i, column[task]] = puzzle_score(puzzle)
    return Outcomes(runs, puzzles, solved)


@dataclass
class Failure:
    task_id: str
    query: int
    target: np.ndarray
    predicted: np.ndarray | None  # the top-voted candidate; None when the model produced no grid


def failures(result: dict[str, Any]) -> list[Failure]:
    """Queries whose first attempt is wrong, with the expected and the top predicted grid."""
    out = []
    for task, puzzle in sorted(result.get("puzzles", {}).items()):
        for query in puzzle.get("queries", []):
            if query.get("solved@k", {}).get("1") or query.get("target") is None:
                continue
            candidates = query.get("candidates") or []
            predicted = np.array(candidates[0]["grid"], dtype=np.int64) if candidates else None
            out.append(
                Failure(
                    task, int(query.get("query", 0)), np.array(query["target"], dtype=np.int64), predicted
                )
            )
    return out


@dataclass
class Confusion:
    counts: np.ndarray  # [expected colour, predicted colour], wrong cells only (diagonal stays 0)
    shape_mismatches: int  # failed queries whose prediction has another shape (no cell-wise comparison)
    no_prediction: int


def wrong_cell_confusion(failed: list[Failure]) -> Confusion:
    counts = np.zeros((NUM_COLORS, NUM_COLORS), dtype=np.int64)
    shape_mismatches = no_prediction = 0
    for f in failed:
        if f.predicted is None:
            no_prediction += 1
        elif f.predicted.shape != f.target.shape:
            shape_mismatches += 1
        else:
            in_palette = (
                (f.target >= 0) & (f.target < NUM_COLORS) & (f.predicted >= 0) & (f.predicted < NUM_COLORS)
            )
            wrong = (f.predicted != f.target) & in_palette
            np.add.at(counts, (f.target[wrong], f.predicted[wrong]), 1)
    return Confusion(counts, shape_mismatches, no_prediction)


def gallery_picks(outcomes: Outcomes, run: str, failed: list[Failure], limit: int) -> list[Failure]:
    """A few of `run`'s failures, those other runs solved first (the most telling), one per puzzle."""
    row = outcomes.runs.index(run)
    others = np.delete(outcomes.solved, row, axis=0)
    solved_elsewhere = {
        task: int(np.sum(others[:, j] >= 1.0)) if others.size else 0
        for j, task in enumerate(outcomes.puzzles)
    }
    first_per_puzzle = {}
    for f in failed:
        first_per_puzzle.setdefault(f.task_id, f)
    ranked = sorted(first_per_puzzle.values(), key=lambda f: (-solved_elsewhere.get(f.task_id, 0), f.task_id))
    return ranked[:limit]
