"""`etrm eval --from-predictions`: re-voting and re-scoring from predictions.npz alone, and user errors."""

import json

import pytest
from eval_fixtures import hand_made

from etrm.cli import main


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", *args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def ok(capsys, *args):
    try:
        main(["eval", *args])
    except SystemExit as e:
        assert e.code == 0, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.fixture
def npz(tmp_path):
    path = tmp_path / "predictions.npz"
    hand_made().save(path)
    return path


def test_revote_prints_metrics_json(capsys, npz):
    metrics = json.loads(ok(capsys, "--from-predictions", str(npz), "--json", "--k", "1", "--k", "2"))
    assert metrics["pass@1"] == pytest.approx(1 / 3) and metrics["pass@2"] == 1.0
    assert metrics["fully_solved@2"] == 3 and "pass@5" not in metrics


def test_revote_on_a_subset_writes_files(capsys, npz, tmp_path):
    out = tmp_path / "revote"
    args = ["--from-predictions", str(npz), "--num-aug", "2", "--task", "p2", "--k", "2", "--out", str(out)]
    text = ok(capsys, *args)
    assert "50.00%" in text and "0/1" in text and str(out) in text  # p2: one of two queries solved
    results = json.loads((out / "results.json").read_text())
    assert list(results["puzzles"]) == ["p2"] and results["num_aug"] == 2
    assert results["metrics"]["pass@2"] == 0.5 and results["metrics"]["num_puzzles"] == 1
    assert sorted(p.name for p in out.iterdir()) == [
        "predictions.npz",
        "results.json",
        "submission.csv",
        "submission.json",
    ]
    # the written predictions are the selection, so re-voting them again gives the same numbers
    again = json.loads(ok(capsys, "--from-predictions", str(out / "predictions.npz"), "--json", "--k", "2"))
    assert again == results["metrics"]


def test_no_vote_scores_the_identity_augmentation(capsys, npz):
    metrics = json.loads(ok(capsys, "--from-predictions", str(npz), "--no-vote", "--json"))
    assert metrics["pass@1"] == metrics["exact_no_vote"] == pytest.approx(1.5 / 3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--from-predictions", "nope.npz"], "nope.npz"),
        (["--task", "zzz"], "zzz"),
        (["--num-aug", "-1"], "--num-aug"),
        (["--k", "0"], "k must be"),
        (["--split", "valid"], "--split"),
        (["some-run"], "not both"),
    ],
)
def test_user_errors_name_the_culprit(capsys, npz, args, message):
    if args[0] != "--from-predictions":
        args = ["--from-predictions", str(npz), *args]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and message in err and "Traceback" not in err


def test_missing_run_is_a_user_error(capsys, tmp_path):
    code, _, err = run_cli(capsys)
    assert code == 2 and "RUN_OR_CHECKPOINT" in err
    code, _, err = run_cli(capsys, str(tmp_path / "no-run"))
    assert code == 2 and "no-run" in err
