"""Voting and pass@k on hand-made predictions whose expected scores are worked out by hand."""

import math

import numpy as np
import pytest
from eval_fixtures import A, B, C, D, W, hand_made

from etrm.errors import EtrmError
from etrm.eval.predictions import NO_GRID, NOT_EVALUATED, Predictions, PredictionsBuilder
from etrm.eval.results import EvalResult
from etrm.eval.voting import NOT_FOUND, rank_candidates


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_ranking_counts_votes_then_mean_q_then_first_augmentation():
    ids = np.array([3, 5, 3, 5, 7, NO_GRID, 7, 9, 8, NOT_EVALUATED])
    q = np.array([0.0, 2.0, 1.0, -1.0, 0.5, 9.0, -0.5, 4.0, 4.0, 9.0])
    r = rank_candidates(ids, q)
    # 3, 5 and 7 have two votes each; mean sigmoid(q): 3 → (σ0+σ1)/2, 5 → (σ2+σ-1)/2, 7 → (σ.5+σ-.5)/2 = 0.5
    m3, m5, m7 = (sig(0) + sig(1)) / 2, (sig(2) + sig(-1)) / 2, 0.5
    assert m3 > m5 > m7
    # 9 and 8 tie on votes and q: 9 came first
    assert r.grid_ids.tolist() == [3, 5, 7, 9, 8]
    assert r.votes.tolist() == [2, 2, 2, 1, 1]
    np.testing.assert_allclose(r.mean_q, [m3, m5, m7, sig(4), sig(4)], rtol=1e-12)
    assert r.rank_of(7) == 2 and r.rank_of(42) == NOT_FOUND and r.rank_of(NO_GRID) == NOT_FOUND


def test_ranking_with_no_votes_is_empty_and_extreme_logits_stay_finite():
    assert len(rank_candidates(np.array([NO_GRID, NOT_EVALUATED]), np.array([0.0, 0.0])).grid_ids) == 0
    r = rank_candidates(np.array([1, 2]), np.array([-1000.0, 1000.0]))
    assert r.grid_ids.tolist() == [2, 1] and np.all(np.isfinite(r.mean_q))


def test_pass_at_k_is_the_mean_over_puzzles_of_the_fraction_of_queries_solved():
    result = EvalResult(hand_made(), ks=(1, 2, 5))
    ranks = [r.rank_of(int(t)) for r, t in zip(result.rankings, result.predictions.target_ids, strict=True)]
    assert ranks == [0, 1, 1, 1]
    m = result.metrics
    # per puzzle at k=1: p1 1, p2 0, p3 0 (a mean over queries would give 1/4); k ≥ 2: all solved
    assert m["pass@1"] == pytest.approx(1 / 3)
    assert m["pass@2"] == m["pass@5"] == 1.0
    assert (m["fully_solved@1"], m["fully_solved@2"], m["fully_solved@5"]) == (1, 3, 3)
    # identity augmentation: p1 exact, p2/q0 exact (B), p2/q1 no grid, p3 W
    assert m["exact_no_vote"] == pytest.approx((1 + 0.5 + 0) / 3)
    assert (m["num_puzzles"], m["num_queries"]) == (3, 4)
    assert "train_em" not in m


def test_select_revotes_on_fewer_augmentations_and_puzzles():
    p = hand_made()
    first_two = EvalResult(p.select(num_aug=2), ks=(1, 2))
    # p1: A, A → A first; p2/q0: B, C → C first, B second; p2/q1: none, W → D missing; p3: W, E → E second
    assert first_two.metrics["pass@1"] == pytest.approx(1 / 3)
    assert first_two.metrics["pass@2"] == pytest.approx((1 + 0.5 + 1) / 3)
    identity_only = EvalResult(p.select(num_aug=1), ks=(1, 2))
    assert identity_only.metrics["pass@1"] == identity_only.metrics["exact_no_vote"] == pytest.approx(1.5 / 3)
    only_p2 = EvalResult(p.select(num_aug=2, task_ids=["p2"]), ks=(1, 2))
    assert only_p2.metrics["num_puzzles"] == 1 and only_p2.metrics["num_queries"] == 2
    assert only_p2.metrics["pass@2"] == pytest.approx(0.5)  # divided by the puzzles evaluated, not all
    assert list(only_p2.results_json()["puzzles"]) == ["p2"]
    with pytest.raises(EtrmError, match="nope"):
        p.select(task_ids=["nope"])


def test_results_json_lists_candidates_and_targets():
    res = EvalResult(hand_made(), ks=(1, 2)).results_json()
    assert (res["split"], res["fewshot"], res["step"], res["num_aug"]) == ("test", True, 7, 3)
    q0 = res["puzzles"]["p2"]["queries"][0]
    assert q0["query"] == 0 and q0["target"] == B.tolist()
    assert q0["solved@k"] == {"1": False, "2": True}
    assert [c["grid"] for c in q0["candidates"]] == [C.tolist(), B.tolist(), W.tolist()]
    assert [c["votes"] for c in q0["candidates"]] == [1, 1, 1]
    assert q0["candidates"][0]["mean_q"] == pytest.approx(sig(3.0))
    assert res["puzzles"]["p2"]["pass@k"] == {"1": 0.0, "2": 1.0}
    q1 = res["puzzles"]["p2"]["queries"][1]
    assert q1["target"] == D.tolist() and [c["grid"] for c in q1["candidates"]] == [W.tolist(), D.tolist()]


def test_train_split_reports_train_em():
    p = hand_made()
    p.meta["split"] = "train"
    m = EvalResult(p).metrics
    assert m["train_em"] == m["pass@1"]


def test_predictions_round_trip_and_bad_files(tmp_path):
    p = hand_made()
    p.save(tmp_path / "predictions.npz")
    q = Predictions.load(tmp_path / "predictions.npz")
    assert q.task_ids == p.task_ids and q.meta == p.meta
    for name in ("query_task", "query_index", "grid_ids", "target_ids"):
        np.testing.assert_array_equal(getattr(q, name), getattr(p, name))
    np.testing.assert_array_equal(q.q_halt, p.q_halt)
    assert [q.grids.grid(i).tolist() for i in range(len(q.grids))] == [
        p.grids.grid(i).tolist() for i in range(len(p.grids))
    ]
    assert EvalResult(q).metrics == EvalResult(p).metrics
    with pytest.raises(EtrmError, match="not found"):
        Predictions.load(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(EtrmError, match="missing"):
        Predictions.load(tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "cut.npz").write_bytes((tmp_path / "predictions.npz").read_bytes()[:300])
    for bad in ("junk.npz", "cut.npz"):
        with pytest.raises(EtrmError, match=bad):
            Predictions.load(tmp_path / bad)


def test_builder_rejects_missing_and_repeated_predictions():
    b = PredictionsBuilder(["t"], [[A]], [2])
    b.add(0, 0, 0, A, 0.0)
    with pytest.raises(ValueError, match="repeated"):
        b.add(0, 0, 0, A, 0.0)
    with pytest.raises(ValueError, match="unexpected"):
        b.add(0, 0, 2, A, 0.0)
    with pytest.raises(ValueError, match="missing"):
        b.build()


def test_bad_k_is_a_user_error():
    with pytest.raises(EtrmError, match="k must be"):
        EvalResult(hand_made(), ks=(0, 1))
