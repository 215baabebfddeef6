"""An evaluation's outcome: votes, scores, results.json and the files written beside it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from etrm.errors import EtrmError
from etrm.eval.predictions import Predictions
from etrm.eval.submission import Attempts, arc_prize_submission, kaggle_csv, two_attempts
from etrm.eval.voting import KS, Ranking, Scores, score_predictions, vote
from etrm.io import Output, atomic_dir, atomic_write_json

TOP_CANDIDATES = 10  # candidates per query kept in results.json
# results.json's `evaluated_by`: `etrm report` prefers a checkpoint's full `etrm eval` to training's own.
BY_TRAINING, BY_EVAL_COMMAND = "training", "etrm eval"
# An eval folder is recognised by its results.json (with metrics); the other files have fixed names.
EVAL_OUTPUT = Output(
    "eval",
    "results.json",
    lambda results: (
        ("predictions.npz", "submission.json", "submission.csv") if "metrics" in results else None
    ),
)


def protocol_name(num_aug: int) -> str:
    """`vote@N` for a vote over N augmentations, `identity` for the identity augmentation alone."""
    return f"vote@{num_aug}" if num_aug > 1 else "identity"


class EvalResult:
    """Voted and scored predictions; built by `evaluate` or from a saved predictions.npz."""

    def __init__(self, predictions: Predictions, ks: Sequence[int] = KS) -> None:
        ks = tuple(sorted(set(ks)))
        if not ks or ks[0] < 1:
            raise EtrmError(f"k must be ≥ 1, got {list(ks)}")
        self.predictions = predictions
        self.ks = ks
        self.rankings: list[Ranking] = vote(predictions)
        self.scores: Scores = score_predictions(predictions, self.rankings, ks)

    @classmethod
    def from_predictions_file(
        cls,
        path: str | os.PathLike,
        *,
        num_aug: int = 0,
        task_ids: list[str] | None = None,
        ks: Sequence[int] = KS,
    ) -> EvalResult:
        """Re-vote a saved evaluation, optionally on fewer augmentations or puzzles."""
        return cls(Predictions.load(path).select(num_aug=num_aug, task_ids=task_ids), ks=ks)

    @property
    def protocol(self) -> str:
        """How the figures were made: `vote@N` over N augmentations, or `identity` (one, no vote)."""
        return protocol_name(self.predictions.num_aug)

    @property
    def metrics(self) -> dict[str, float | int]:
        metrics = self.scores.metrics()
        if self.predictions.meta.get("split") == "train":
            # voted exact match on the training puzzles' held-out pairs, to read the train/test gap
            metrics["train_em"] = metrics["pass@1"]
        return metrics

    def metrics_row(self) -> dict[str, Any]:
        """The metrics as metrics.jsonl logs an evaluation: eval/... keys, with the protocol."""
        row: dict[str, Any] = {f"eval/{k}": v for k, v in self.metrics.items() if k != "num_queries"}
        row["eval/protocol"] = self.protocol
        return row

    def _grid(self, grid_id: int) -> np.ndarray:
        return self.predictions.grids.grid(int(grid_id))

    def _query_rows(self) -> dict[str, list[int]]:
        """Row numbers of each puzzle's queries, in query order."""
        p = self.predictions
        rows: dict[str, list[int]] = {t: [] for t in p.task_ids}
        for row in np.lexsort((p.query_index, p.query_task)):
            rows[p.task_ids[p.query_task[row]]].append(int(row))
        return rows

    def attempts(self) -> Attempts:
        """Each query's two submitted grids."""
        return {
            task_id: [two_attempts([self._grid(g) for g in self.rankings[r].grid_ids[:2]]) for r in rows]
            for task_id, rows in self._query_rows().items()
        }

    def results_json(self) -> dict[str, Any]:
        p, s = self.predictions, self.scores
        puzzles: dict[str, Any] = {}
        for task_id, rows in self._query_rows().items():
            task = int(p.query_task[rows[0]])
            queries = []
            for r in rows:
                ranking, target = self.rankings[r], int(p.target_ids[r])
                queries.append(
                    {
                        "query": int(p.query_index[r]),
                        "solved@k": {str(k): bool(s.solved[r, j]) for j, k in enumerate(self.ks)},
                        "target": self._grid(target).tolist() if target >= 0 else None,
                        "candidates": [
                            {"grid": self._grid(g).tolist(), "votes": int(v), "mean_q": float(q)}
                            for g, v, q in zip(
                                ranking.grid_ids[:TOP_CANDIDATES],
                                ranking.votes[:TOP_CANDIDATES],
                                ranking.mean_q[:TOP_CANDIDATES],
                                strict=True,
                            )
                        ],
                    }
                )
            puzzles[task_id] = {
                "pass@k": {str(k): float(s.puzzle_pass[task, j]) for j, k in enumerate(self.ks)},
                "queries": queries,
            }
        return {
            "split": p.meta.get("split"),
            "fewshot": p.meta.get("fewshot"),
            "num_aug": p.num_aug,
            "protocol": self.protocol,
            "evaluated_by": p.meta.get("evaluated_by"),
            "step": p.meta.get("step"),
            "metrics": self.metrics,
            "puzzles": puzzles,
        }

    def write(self, out_dir: str | os.PathLike, overwrite: bool = True) -> Path:
        """results.json, predictions.npz, submission.json and submission.csv, as one atomic folder."""
        out_dir = Path(out_dir)
        attempts = self.attempts()
        with atomic_dir(out_dir, overwrite=overwrite, output=EVAL_OUTPUT) as tmp:
            atomic_write_json(tmp / "results.json", self.results_json())
            self.predictions.save(tmp / "predictions.npz")
            atomic_write_json(tmp / "submission.json", arc_prize_submission(attempts), indent=None)
            (tmp / "submission.csv").write_text(kaggle_csv(attempts))
        return out_dir
