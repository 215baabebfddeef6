"""Reading run folders: truncated metrics, missing files, and folders that are not runs."""

import json
import subprocess
import sys

import pytest
from diagnose_run_folders import TRAIN_ROWS_PER_WINDOW, make_run

from etrm.diagnose.runs import least_squares_slope, load_run
from etrm.errors import EtrmError


def etrm(*args):
    return subprocess.run([sys.executable, "-m", "etrm", *args], capture_output=True, text=True, timeout=120)


def test_run_folder_rows_are_split_into_train_eval_and_events(tmp_path):
    path = make_run(tmp_path, "A", test_em=[0.1, 0.2])
    with open(path / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 99, "epoch": 400.0, "event": "lr_halved", "lr": 5e-5}) + "\n")
    run = load_run(path)
    assert run.name == "A"
    assert len(run.train_rows) == 2 * TRAIN_ROWS_PER_WINDOW
    assert [r["eval/pass@1"] for r in run.eval_rows] == [0.1, 0.2]
    assert [e["event"] for e in run.events] == ["lr_halved"]
    assert run.warnings == []
    windows = run.windows()
    assert [w.end_step for w in windows] == [40, 80]
    assert all(len(w.rows) == TRAIN_ROWS_PER_WINDOW and w.evaluated for w in windows)


def test_rows_after_the_last_evaluation_form_an_unevaluated_window(tmp_path):
    path = make_run(tmp_path, "A", test_em=[0.1])
    with open(path / "metrics.jsonl", "a") as f:
        f.write(
            json.dumps({"step": 50, "epoch": 250.0, "grad/encoder_norm": 1.0, "grad/total_norm": 2.0}) + "\n"
        )
    windows = load_run(path).windows()
    assert [(w.end_step, w.evaluated, len(w.rows)) for w in windows] == [(40, True, 4), (50, False, 1)]


def test_truncated_last_line_is_dropped_with_a_warning(tmp_path):
    path = make_run(tmp_path, "A", test_em=[0.1, 0.2])
    complete = load_run(path)
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"step": 90, "epoch": 450.0, "train/lm_lo')  # killed mid-write: no closing brace, no newline
    run = load_run(path)
    assert len(run.train_rows) == len(complete.train_rows) and len(run.eval_rows) == 2
    assert len(run.warnings) == 1
    assert (
        "truncated" in run.warnings[0] and "line 11" in run.warnings[0] and "metrics.jsonl" in run.warnings[0]
    )

    cli = etrm("diagnose", "grad-health", str(path))
    assert cli.returncode == 0, cli.stderr
    assert "warning" in cli.stderr and "truncated" in cli.stderr
    assert "verdict: healthy" in cli.stdout


def test_a_bad_line_before_the_end_is_an_error_naming_the_line(tmp_path):
    path = make_run(tmp_path, "A", test_em=[0.1])
    lines = (path / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:10]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(EtrmError, match=r"metrics\.jsonl: line 3 is not valid JSON"):
        load_run(path)


def test_rows_without_an_integer_step_are_rejected(tmp_path):
    path = make_run(tmp_path, "A", test_em=[0.1])
    (path / "metrics.jsonl").write_text('{"epoch": 1.0}\n[1, 2]\n')
    with pytest.raises(EtrmError, match="line 1 is not a metrics row"):
        load_run(path)


def test_empty_and_unrelated_folders_give_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EtrmError, match=r"empty is not a run folder: it has no metrics\.jsonl"):
        load_run(empty)
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(EtrmError, match="photos is not a run folder"):
        load_run(unrelated)
    with pytest.raises(EtrmError, match="does not exist"):
        load_run(tmp_path / "missing")
    with pytest.raises(EtrmError, match="is not a run folder"):
        load_run(unrelated / "cat.jpg")

    cli = etrm("diagnose", "act", str(empty))
    assert cli.returncode == 2
    assert "error:" in cli.stderr and "not a run folder" in cli.stderr and "Traceback" not in cli.stderr


def test_a_folder_of_runs_suggests_passing_the_runs(tmp_path):
    make_run(tmp_path / "runs", "SF1", test_em=[0.1])
    make_run(tmp_path / "runs", "SF2", test_em=[0.1])
    with pytest.raises(EtrmError, match=r"holds runs \(SF1, SF2\).*runs/\*"):
        load_run(tmp_path / "runs")


def test_empty_metrics_file_and_corrupt_run_info(tmp_path):
    path = make_run(tmp_path, "A", test_em=[0.1])
    (path / "run_info.json").write_text("{not json")
    with pytest.raises(EtrmError, match=r"run_info\.json: cannot read JSON"):
        load_run(path)
    (path / "metrics.jsonl").write_text("\n")
    with pytest.raises(EtrmError, match="has no metrics rows yet"):
        load_run(path)


def test_missing_run_info_is_a_warning_and_the_folder_name_is_used(tmp_path):
    run = load_run(make_run(tmp_path, "folder-name", test_em=[0.1], write_info=False))
    assert run.name == "folder-name"
    assert any("no run_info.json" in w for w in run.warnings)


def test_least_squares_slope_matches_the_closed_form():
    assert least_squares_slope([0, 1, 2], [1, 3, 5]) == pytest.approx(2.0)
    # y = [0, 2, 1] at x = [0, 1, 2]: slope = Σ(x-1)(y-1) / Σ(x-1)² = (1 + 0 + 0) / 2
    assert least_squares_slope([0, 1, 2], [0, 2, 1]) == pytest.approx(0.5)
    assert least_squares_slope([1], [1]) != least_squares_slope([1], [1])  # NaN: one point has no slope
