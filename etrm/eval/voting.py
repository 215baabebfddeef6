"""Voting and pass@k over de-augmented predictions; pure functions, no model.

A query's candidates are the distinct grids its augmentations predicted, ranked by
vote count, then by mean sigmoid(q_halt) over the augmentations that voted for the
grid, then by the first augmentation that produced it (the identity first). A query
is solved at k when its output is among the top k; a puzzle scores the fraction of
its queries solved; ARC/pass@k is the mean over the puzzles evaluated, and
fully_solved@k counts the puzzles with every query solved.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from etrm.eval.predictions import Predictions

KS = (1, 2, 5, 10, 100, 1000)
NOT_FOUND = np.iinfo(np.int64).max  # rank of a target no candidate matches


@dataclass(frozen=True)
class Ranking:
    """One query's candidates, best first."""

    grid_ids: np.ndarray  # int64 [C]
    votes: np.ndarray  # int64 [C]
    mean_q: np.ndarray  # float64 [C]: mean sigmoid(q_halt) of the voters

    def rank_of(self, grid_id: int) -> int:
        """0-based position of `grid_id` among the candidates, NOT_FOUND if absent."""
        hits = np.flatnonzero(self.grid_ids == grid_id) if grid_id >= 0 else ()
        return int(hits[0]) if len(hits) else NOT_FOUND


def sigmoid(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.exp(-np.logaddexp(0.0, -x))


def rank_candidates(grid_ids: np.ndarray, q_halt: np.ndarray) -> Ranking:
    """Rank the grids one query's augmentations predicted (negative ids: no vote)."""
    voted = grid_ids >= 0
    ids = np.asarray(grid_ids)[voted].astype(np.int64)
    q = sigmoid(np.asarray(q_halt)[voted])
    unique, first, inverse, votes = np.unique(ids, return_index=True, return_inverse=True, return_counts=True)
    mean_q = np.bincount(inverse, weights=q, minlength=len(unique)) / np.maximum(votes, 1)
    order = np.lexsort((first, -mean_q, -votes))
    return Ranking(grid_ids=unique[order], votes=votes[order], mean_q=mean_q[order])


def vote(predictions: Predictions) -> list[Ranking]:
    """Candidates for every query (row) of `predictions`."""
    return [rank_candidates(ids, q) for ids, q in zip(predictions.grid_ids, predictions.q_halt, strict=True)]


@dataclass(frozen=True)
class Scores:
    """pass@k per query, per puzzle and overall."""

    ks: tuple[int, ...]
    solved: np.ndarray  # bool [Q, K]: query solved at ks[j]
    puzzle_pass: np.ndarray  # float64 [P, K]: fraction of the puzzle's queries solved at ks[j]
    exact_no_vote: (
        np.ndarray
    )  # float64 [P]: fraction of the puzzle's queries the identity augmentation got exact

    def metrics(self) -> dict[str, float | int]:
        num_puzzles, num_queries = len(self.puzzle_pass), len(self.solved)
        out: dict[str, float | int] = {}
        for j, k in enumerate(self.ks):
            out[f"pass@{k}"] = float(self.puzzle_pass[:, j].mean()) if num_puzzles else 0.0
        for j, k in enumerate(self.ks):
            out[f"fully_solved@{k}"] = int(np.sum(self.puzzle_pass[:, j] == 1.0))
        out["exact_no_vote"] = float(self.exact_no_vote.mean()) if num_puzzles else 0.0
        out["num_puzzles"] = num_puzzles
        out["num_queries"] = num_queries
        return out


def score(
    target_ranks: np.ndarray,
    identity_exact: np.ndarray,
    query_task: np.ndarray,
    num_puzzles: int,
    ks: Sequence[int] = KS,
) -> Scores:
    """pass@k from each query's target rank; every puzzle counts once, whatever its number of queries."""
    ks = tuple(ks)
    target_ranks = np.asarray(target_ranks, dtype=np.int64)
    solved = target_ranks[:, None] < np.asarray(ks, dtype=np.int64)[None, :]
    queries_per_puzzle = np.bincount(query_task, minlength=num_puzzles).astype(np.float64)
    puzzle_pass = np.zeros((num_puzzles, len(ks)))
    np.add.at(puzzle_pass, query_task, solved)
    puzzle_pass /= queries_per_puzzle[:, None]
    exact = np.bincount(query_task, weights=identity_exact, minlength=num_puzzles) / queries_per_puzzle
    return Scores(ks=ks, solved=solved, puzzle_pass=puzzle_pass, exact_no_vote=exact)


def score_predictions(predictions: Predictions, rankings: list[Ranking], ks: Sequence[int] = KS) -> Scores:
    """Scores of voted `rankings` against the targets stored in `predictions`."""
    targets = predictions.target_ids
    ranks = np.array([r.rank_of(int(t)) for r, t in zip(rankings, targets, strict=True)], dtype=np.int64)
    if predictions.num_aug:
        identity = predictions.grid_ids[:, 0]
        identity_exact = (identity >= 0) & (identity == targets)
    else:
        identity_exact = np.zeros(len(targets), dtype=bool)
    return score(ranks, identity_exact, predictions.query_task, len(predictions.task_ids), ks)
