"""Winner selection over hand-made run folders: each of the design's rules decides once."""

import math

import pytest
from diagnose_run_folders import make_run

from etrm.diagnose.runs import load_run
from etrm.report.selection import select_winner
from etrm.report.summary import summarize

IMPROVING = [0.10, 0.20]  # two earlier evaluations below the last value: positive slope


def select(tmp_path, **runs):
    """runs: name → make_run keyword arguments; `em` is the last test EM, appended to an improving history."""
    summaries = []
    for name, kw in runs.items():
        kw = dict(kw)
        history = kw.pop("history", IMPROVING)
        em = kw.pop("em")
        train = kw.pop("train", None)
        test_em = [*history, em]
        train_em = None if train is None else [*history, train]
        summaries.append(
            summarize(load_run(make_run(tmp_path, name, test_em=test_em, train_em=train_em, **kw)))
        )
    return select_winner(summaries)


def test_summary_numbers_come_from_the_metrics(tmp_path):
    s = summarize(
        load_run(make_run(tmp_path, "A", test_em=[0.1, 0.2, 0.4], train_em=[0.2, 0.3, 0.5], params=123))
    )
    assert (s.test_em, s.train_em, s.gap) == (0.4, 0.5, pytest.approx(0.1))
    assert s.test_pass2 == pytest.approx(0.42)
    # least-squares slope of (200, .1), (400, .2), (600, .4) is .15/200 per epoch = .75 per 1000 epochs
    assert s.slope == pytest.approx(0.75) and s.improving
    assert (s.num_params, s.exploration, s.evaluations, s.epoch) == (123, 0.5, 3, 600.0)
    assert s.grad_ratio == pytest.approx(0.3) and s.grad_health == "healthy"


def test_highest_test_em_wins(tmp_path):
    sel = select(tmp_path, A={"em": 0.30}, B={"em": 0.40}, C={"em": 0.25})
    assert (sel.winner, sel.rule) == ("B", "test_em")
    assert sel.ranking == ["B", "A", "C"]
    assert "test EM 30.0%" in sel.set_aside["A"]


def test_eligibility_needs_a_grad_ratio_above_0_15(tmp_path):
    sel = select(tmp_path, A={"em": 0.30}, B={"em": 0.60, "ratio": 0.15})
    assert (sel.winner, sel.rule) == ("A", "eligibility")
    assert "grad ratio 0.150" in sel.set_aside["B"]
    sel = select(tmp_path / "2", A={"em": 0.30}, B={"em": 0.60, "ratio": 0.1501})
    assert sel.winner == "B"


def test_no_eligible_run_means_no_winner(tmp_path):
    sel = select(tmp_path, A={"em": 0.30, "ratio": 0.05}, B={"em": 0.60, "ratio": 0.12})
    assert sel.winner is None and sel.rule == "none_eligible"
    assert sel.ranking == ["B", "A"]


def test_still_improving_is_preferred_within_three_points(tmp_path):
    sel = select(tmp_path, A={"em": 0.40, "history": [0.48, 0.45]}, B={"em": 0.38})
    assert (sel.winner, sel.rule) == ("B", "preference")
    assert "not improving" in sel.set_aside["A"]


def test_a_preference_never_lifts_a_run_more_than_three_points_behind(tmp_path):
    sel = select(tmp_path, A={"em": 0.40, "history": [0.48, 0.45]}, B={"em": 0.35})
    assert (sel.winner, sel.rule) == ("A", "test_em")
    assert "test EM 35.0%" in sel.set_aside["B"]


def test_a_train_test_gap_of_15_points_loses_the_preference(tmp_path):
    sel = select(tmp_path, A={"em": 0.40, "train": 0.55}, B={"em": 0.38, "train": 0.40})
    assert (sel.winner, sel.rule) == ("B", "preference")
    assert "gap 15.0%" in sel.set_aside["A"]
    sel = select(tmp_path / "2", A={"em": 0.40, "train": 0.5499}, B={"em": 0.38, "train": 0.40})
    assert sel.winner == "A" and sel.rule != "preference"


@pytest.mark.parametrize(
    "em_b, winner, rule",
    [
        (0.38, "B", "params"),  # 2 points behind: a tie, fewer parameters win
        (0.37, "B", "params"),  # exactly 3 points: still within
        (0.365, "A", "test_em"),  # 3.5 points: test EM decides
    ],
)
def test_within_three_points_fewer_parameters_win(tmp_path, em_b, winner, rule):
    sel = select(tmp_path, A={"em": 0.40, "params": 7_000_000}, B={"em": em_b, "params": 6_000_000})
    assert (sel.winner, sel.rule) == (winner, rule)


def test_then_lower_exploration(tmp_path):
    sel = select(
        tmp_path,
        A={"em": 0.40, "params": 6_000_000, "exploration": 0.7},
        B={"em": 0.39, "params": 6_000_000, "exploration": 0.5},
        C={"em": 0.41, "params": 7_000_000, "exploration": 0.3},
    )
    assert (sel.winner, sel.rule) == ("B", "exploration")
    assert sel.set_aside["C"].endswith("7,000,000 params")
    assert sel.ranking == ["B", "A", "C"]


def test_then_better_gradient_health(tmp_path):
    sel = select(
        tmp_path,
        A={"em": 0.40, "ratio": 0.21},
        B={"em": 0.39, "ratio": 0.35},
        C={"em": 0.40, "ratio": 0.30},
    )
    assert (sel.winner, sel.rule) == ("B", "grad_health")
    assert [line.split(" — ")[0] for line in sel.reasoning][-1].startswith("then better gradient health")


def test_all_equal_falls_back_to_name_order(tmp_path):
    sel = select(tmp_path, B={"em": 0.40}, A={"em": 0.40})
    assert (sel.winner, sel.rule) == ("A", "name")


def test_a_single_run_and_a_never_evaluated_run(tmp_path):
    sel = select(tmp_path, A={"em": 0.2})
    assert (sel.winner, sel.rule) == ("A", "only_run")
    never = load_run(make_run(tmp_path, "N", test_em=[0.1]))
    never.eval_rows = []
    summary = summarize(never)
    assert math.isnan(summary.test_em) and not summary.evaluated
    sel = select_winner([summary, summarize(load_run(tmp_path / "A"))])
    assert sel.winner == "A" and sel.set_aside["N"].endswith("never evaluated")
