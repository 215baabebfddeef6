"""`etrm report` end to end over hand-made runs: files, valid PNGs, the Markdown, failure analysis."""

import json
import shutil
import struct
import subprocess
import sys

import matplotlib.image
import numpy as np
import pytest
from diagnose_run_folders import grid_results, make_run

from etrm.errors import EtrmError
from etrm.report.build import build_report
from etrm.report.failures import Failure, gallery_picks, outcome_matrix, wrong_cell_confusion
from etrm.report.plots import pareto_frontier

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def etrm(*args):
    return subprocess.run([sys.executable, "-m", "etrm", *args], capture_output=True, text=True, timeout=120)


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # t1: same shape, one wrong cell (4 → 5); t2: solved; t3: wrong shape.
    shared = {
        "t1": ([[1, 2], [3, 4]], [[1, 2], [3, 5]], False),
        "t2": ([[0]], [[0]], True),
        "t3": ([[1, 1]], [[2, 2, 2]], False),
    }
    winner_results = {**shared, "t3": ([[1, 1]], [[1, 1]], True)}
    make_run(root, "SF1", test_em=[0.1, 0.2, 0.30], params=7_000_000, results=grid_results(shared))
    make_run(root, "SF2", test_em=[0.1, 0.2, 0.28], params=6_000_000, results=grid_results(winner_results))
    make_run(root, "SF3", test_em=[0.1, 0.3, 0.50], ratio=0.1, params=6_000_000)
    out = root.parent / "report-out"
    cli = etrm(
        "report", *(str(root / n) for n in ("SF1", "SF2", "SF3")), "--out", str(out), "--title", "Semi-final"
    )
    assert cli.returncode == 0, cli.stderr
    return out, cli, root


def test_report_cli_names_the_winner_and_the_deciding_rule(report_dir):
    out, cli, _ = report_dir
    assert "winner: SF2" in cli.stdout and "fewer parameters" in cli.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["selection"]["winner"] == "SF2" and summary["selection"]["rule"] == "params"
    assert summary["selection"]["ranking"] == ["SF2", "SF1", "SF3"]
    by_name = {r["name"]: r for r in summary["runs"]}
    assert by_name["SF3"]["grad_health"] == "warning" and by_name["SF1"]["num_params"] == 7_000_000
    assert "SF3" in cli.stderr and "no eval/step-N/results.json" in cli.stderr


def test_report_markdown_has_every_section_and_plot(report_dir):
    out, _, _ = report_dir
    text = (out / "report.md").read_text()
    assert text.startswith("# Semi-final\n")
    for heading in (
        "## Summary",
        "## Ranking",
        "## Selection",
        "## Plots",
        "## Failure analysis",
        "## Recommendations",
    ):
        assert heading in text
    assert (
        "**Selected: SF2**" in text
        and "Deciding rule: **within 3 points of test EM: fewer parameters**" in text
    )
    assert "| 1 | SF2 | 28.0% |" in text
    assert "SF3 (grad ratio 0.100)" in text  # set aside by eligibility, with its value
    assert "Puzzles solved within 2 attempts: SF1 1/3, SF2 2/3" in text
    assert "etrm train --preset final --set arch.encoder_type=hybrid_standard" in text
    assert "--set train.global_batch_size=128 --set train.init_from=none`" in text  # the winner's decoder
    for image in (
        "test_em",
        "learning_curves",
        "grad_health",
        "train_vs_test",
        "act_steps",
        "params_pareto",
        "outcomes",
        "confusion",
        "gallery",
    ):
        assert f"]({image}.png)" in text


def test_plots_are_valid_pngs_of_sensible_size(report_dir):
    out, _, _ = report_dir
    pngs = sorted(out.glob("*.png"))
    assert len(pngs) == 9
    for png in pngs:
        width, height = png_size(png)
        assert 300 <= width <= 4000 and 200 <= height <= 4000, (png.name, width, height)
        pixels = matplotlib.image.imread(png)
        assert pixels.shape[:2] == (height, width)
        assert pixels[..., :3].std() > 0.02, f"{png.name} is blank"


def test_report_refuses_to_overwrite_a_folder_that_is_not_a_report(tmp_path, report_dir):
    out, _, root = report_dir
    run = root / "SF1"
    precious = tmp_path / "project"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(EtrmError, match="is not an etrm report folder"):
        build_report([run], precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    earlier = tmp_path / "earlier"
    shutil.copytree(out, earlier)
    rebuilt = build_report([run], earlier)  # an earlier report is replaced
    assert rebuilt.selection.winner == "SF1" and rebuilt.selection.rule == "only_run"
    assert [r["name"] for r in json.loads((earlier / "summary.json").read_text())["runs"]] == ["SF1"]


def test_report_errors_on_empty_folder_and_duplicate_names(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    cli = etrm("report", str(empty), "--out", str(tmp_path / "r"))
    assert cli.returncode == 2 and "empty is not a run folder" in cli.stderr
    assert not (tmp_path / "r").exists()
    run = make_run(tmp_path, "A", test_em=[0.1])
    with pytest.raises(EtrmError, match="run folder .*A is given twice"):
        build_report([run, run], tmp_path / "r")


def test_wrong_cell_confusion_counts_by_hand():
    target = np.array([[1, 2, 3], [4, 4, 0]])
    predicted = np.array([[1, 5, 3], [4, 6, 0]])  # 2 → 5 and 4 → 6
    failed = [
        Failure("a", 0, target, predicted),
        Failure("b", 0, np.array([[7, 7]]), np.array([[8, 9]])),  # 7 → 8, 7 → 9
        Failure("c", 0, np.array([[1]]), np.array([[1, 1]])),  # wrong shape
        Failure("d", 0, np.array([[1]]), None),  # no grid
    ]
    confusion = wrong_cell_confusion(failed)
    expected = np.zeros((10, 10), dtype=np.int64)
    expected[2, 5] = expected[4, 6] = expected[7, 8] = expected[7, 9] = 1
    assert np.array_equal(confusion.counts, expected)
    assert (confusion.shape_mismatches, confusion.no_prediction) == (1, 1)


def test_outcome_matrix_and_gallery_picks():
    a = grid_results({"p1": ([[1]], [[2]], False), "p2": ([[1]], [[1]], True), "p3": ([[3]], [[4]], False)})
    b = grid_results({"p1": ([[1]], [[1]], True), "p3": ([[3]], [[4]], False)})
    outcomes = outcome_matrix({"A": a, "B": b})
    assert outcomes.puzzles == ["p1", "p2", "p3"]
    assert np.array_equal(outcomes.solved, np.array([[0, 1, 0], [1, np.nan, 0]]), equal_nan=True)
    failed = [
        Failure("p3", 0, np.array([[3]]), np.array([[4]])),
        Failure("p1", 0, np.array([[1]]), np.array([[2]])),
    ]
    picks = gallery_picks(outcomes, "A", failed, limit=2)
    assert [p.task_id for p in picks] == ["p1", "p3"]  # p1 first: another run solved it


def test_pareto_frontier():
    points = [(3, 20.0), (1, 10.0), (2, 5.0), (3, 15.0), (4, 20.0), (5, 30.0)]
    assert pareto_frontier(points) == [(1, 10.0), (3, 20.0), (5, 30.0)]
    assert pareto_frontier([]) == []


def test_report_shows_each_runs_decoder_and_marks_runs_that_are_not_few_shot(tmp_path):
    from etrm.report.build import ranking_rows

    provenance = {"SFa": ("etrm:trm-decoder", True), "SFb": ("foreign", False), "SFc": None}
    for name, given in provenance.items():
        run = make_run(tmp_path / "runs", name, test_em=[0.1, 0.2])
        if given is not None:
            info = json.loads((run / "run_info.json").read_text())
            info["decoder_provenance"], info["fewshot"] = given
            (run / "run_info.json").write_text(json.dumps(info))
    report = build_report([tmp_path / "runs" / n for n in provenance], tmp_path / "out")
    decoders = {row["run"]: row["decoder"] for row in ranking_rows(report)}
    assert decoders == {"SFa": "etrm:trm-decoder", "SFb": "foreign (NOT few-shot)", "SFc": "unknown"}
    assert [w for w in report.warnings if "few-shot" in w] == [
        "SFb is not few-shot (decoder foreign): its weights saw test puzzles or data of unknown origin"
    ]
    assert "foreign (NOT few-shot)" in (tmp_path / "out" / "report.md").read_text()


def test_a_full_eval_of_a_step_replaces_the_training_figures_and_names_its_protocol(tmp_path):
    from etrm.diagnose.runs import load_run
    from etrm.report.summary import summarize

    root = tmp_path / "runs"
    make_run(root, "A", test_em=[0.1, 0.2, 0.30], params=7_000_000, results=grid_results({}))
    make_run(root, "B", test_em=[0.1, 0.2, 0.28], params=6_000_000)
    last = load_run(root / "B").eval_rows[-1]["step"]

    def write(run, folder, evaluated_by, metrics, protocol):
        results = {"split": "test", "num_aug": 912, "protocol": protocol, "evaluated_by": evaluated_by}
        (root / run / "eval" / folder).mkdir(parents=True, exist_ok=True)
        (root / run / "eval" / folder / "results.json").write_text(
            json.dumps({**results, "metrics": metrics})
        )

    # B's last checkpoint was evaluated in full, test and train; A's file is training's own (its row stays).
    write("B", f"step-{last}", "etrm eval", {"pass@1": 0.5, "pass@2": 0.6, "num_puzzles": 400}, "vote@912")
    write("B", f"step-{last}-train", "etrm eval", {"pass@1": 0.7, "train_em": 0.7}, "vote@912")
    write("A", f"step-{last}", "training", {"pass@1": 0.9, "pass@2": 0.9}, "vote@8")
    b, a = summarize(load_run(root / "B")), summarize(load_run(root / "A"))
    assert (b.test_em, b.test_pass2, b.train_em, b.gap) == (0.5, 0.6, 0.7, pytest.approx(0.2))
    assert (b.protocol, b.train_protocol, b.source) == (
        "vote@912",
        "vote@912",
        f"eval/step-{last}/results.json",
    )
    assert (a.test_em, a.protocol, a.train_protocol, a.source) == (
        0.30,
        "unknown",
        "identity",
        "metrics.jsonl",
    )

    report = build_report([root / "A", root / "B"], tmp_path / "out")
    assert report.selection.winner == "B"
    assert report.selection.notes == [
        "test EM compared across evaluation protocols: A unknown, B vote@912; "
        "evaluate the runs alike (`etrm eval RUN/step-N`) for a fair comparison"
    ]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "**Note:** test EM compared across evaluation protocols" in text
    assert f"| vote@912 (eval/step-{last}/results.json) |" in text
    assert "| unknown, train identity (metrics.jsonl) |" in text
    assert "test EM 50.0% (vote@912)" in text
    # B's slope runs over two training evaluations and the full one: the report warns of the mix.
    assert b.slope_protocols == ("unknown", "vote@912") and a.slope_protocols == ("unknown",)
    assert any(w.startswith("B: its test-EM slope mixes evaluation protocols") for w in report.warnings)
    assert not any(w.startswith("A: its test-EM slope") for w in report.warnings)


def test_report_shows_unadapted_and_adapted_results_when_a_run_has_an_adapted_evaluation(tmp_path):
    from etrm.report.build import adaptation_row

    plain = make_run(tmp_path / "runs", "SFa", test_em=[0.1, 0.2])
    adapted = make_run(tmp_path / "runs", "SFb", test_em=[0.1, 0.2])
    block = {
        "mode": "latent",
        "unadapted_metrics": {"pass@1": 0.25},
        "solved_to_unsolved": ["p1"],
        "unsolved_to_solved": ["p2", "p3"],
        "skipped_single_demo": ["p4"],
        "mean_adapt_seconds": 1.234,
    }
    for step, em in ((2, 0.5), (10, 0.75)):  # the newest step is the one shown
        folder = adapted / "eval" / f"step-{step}-adapt-latent"
        folder.mkdir(parents=True)
        (folder / "results.json").write_text(json.dumps({"metrics": {"pass@1": em}, "adapt": block}))
    report = build_report([plain, adapted], tmp_path / "out")
    assert adaptation_row(report.runs[0]) is None
    assert report.adaptation == [
        {
            "run": "SFb",
            "eval": "step-10-adapt-latent",
            "mode": "latent",
            "unadapted@1": "25.0%",
            "adapted@1": "75.0%",
            "solved→unsolved": 1,
            "unsolved→solved": 2,
            "skipped": 1,
            "s/puzzle": "1.23",
        }
    ]
    text = (tmp_path / "out" / "report.md").read_text()
    assert (
        "## Test-time adaptation" in text
        and "| SFb | step-10-adapt-latent | latent | 25.0% | 75.0% |" in text
    )
    (adapted / "eval" / "step-10-adapt-latent" / "results.json").write_text("{}")
    with pytest.raises(EtrmError, match="step-10-adapt-latent/results.json: not an adapted evaluation"):
        build_report([plain, adapted], tmp_path / "out")
