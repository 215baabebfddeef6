"""Submission files: ARC Prize `submission.json` and the older Kaggle `submission.csv`.

Both carry each query's top two candidates. A query with fewer candidates repeats its
best one; a query with none gets the placeholder [[0]], because both formats need a
grid for every test output.
"""

from __future__ import annotations

import numpy as np

PLACEHOLDER_GRID = [[0]]

Attempts = dict[str, list[list[list[list[int]]]]]  # task id → per query → two grids


def two_attempts(candidates: list[np.ndarray]) -> list[list[list[int]]]:
    """The first two candidate grids as lists, padded so there are always two."""
    grids = [np.asarray(g).tolist() for g in candidates[:2]] or [PLACEHOLDER_GRID]
    return grids if len(grids) == 2 else [grids[0], grids[0]]


def arc_prize_submission(attempts: Attempts) -> dict[str, list[dict[str, list[list[int]]]]]:
    """`{task_id: [{"attempt_1": grid, "attempt_2": grid}, ...]}`, one entry per query in order."""
    return {
        task_id: [{"attempt_1": first, "attempt_2": second} for first, second in per_query]
        for task_id, per_query in attempts.items()
    }


def kaggle_csv(attempts: Attempts) -> str:
    """`output_id,output` rows: `<task>_<query>` and space-separated `|row|row|` grids."""
    lines = ["output_id,output"]
    for task_id, per_query in attempts.items():
        for query, grids in enumerate(per_query):
            lines.append(f"{task_id}_{query},{' '.join(_grid_to_kaggle(g) for g in grids)}")
    return "\n".join(lines) + "\n"


def _grid_to_kaggle(grid: list[list[int]]) -> str:
    return "|" + "|".join("".join(str(c) for c in row) for row in grid) + "|"
