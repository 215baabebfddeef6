"""`etrm report` as a library function: run folders in, a Markdown report with plots out."""

from __future__ import annotations

import datetime
import json
import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from etrm.console import make_progress
from etrm.diagnose.act import act_stats
from etrm.diagnose.grad_health import grad_health
from etrm.diagnose.runs import Run, finite_values, load_run, mean
from etrm.errors import EtrmError
from etrm.io import Output, atomic_dir, atomic_write_json, check_replaceable
from etrm.report import failures as fa
from etrm.report.selection import MAX_GAP, Selection, select_winner
from etrm.report.summary import RunSummary, summarize

PlotJob = tuple[str, str, Callable[[Path], Path]]  # caption, file name, draw into a path

REPORT_FILE = "report.md"
SUMMARY_FILE = "summary.json"
# A report folder is recognised by its summary.json, which names its plots.
REPORT_OUTPUT = Output("report", SUMMARY_FILE, lambda summary: [REPORT_FILE, *summary["plots"].values()])
GALLERY_PUZZLES = 4
GALLERY_DEMOS = 3


@dataclass
class Report:
    title: str
    runs: list[Run]
    summaries: list[RunSummary]
    selection: Selection
    plots: dict[str, str] = field(default_factory=dict)  # caption → file name
    failure_plots: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    failure_notes: list[str] = field(default_factory=list)
    adaptation: list[dict[str, Any]] = field(default_factory=list)  # ADAPT_COLUMNS rows, one per run

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "runs": [s.to_json() for s in self.summaries],
            "selection": self.selection.to_json(),
            "plots": {**self.plots, **self.failure_plots},
            "warnings": self.warnings,
            "adaptation": self.adaptation,
        }


def load_runs(paths: list[str | os.PathLike]) -> list[Run]:
    if not paths:
        raise EtrmError("no run folders given; pass one or more, e.g. `etrm report runs/*`")
    runs = [load_run(p) for p in paths]
    folders: dict[Path, Path] = {}
    for run in runs:
        if run.path.resolve() in folders:
            raise EtrmError(f"run folder {run.path} is given twice (also as {folders[run.path.resolve()]})")
        folders[run.path.resolve()] = run.path
    # One preset run twice with other overrides shares a run name: label those runs by their folders.
    for label in (lambda r: r.path.resolve().name, lambda r: str(r.path)):
        counts = Counter(r.name for r in runs)
        for run in runs:
            if counts[run.name] > 1:
                run.name = label(run)
    return runs


def build_report(
    paths: list[str | os.PathLike],
    out: str | os.PathLike,
    title: str = "ETRM run comparison",
    data: str | None = None,
) -> Report:
    """Read the runs, select the winner, draw the plots and write report.md + summary.json into `out`."""
    out = Path(out)
    check_replaceable(out, REPORT_OUTPUT)
    runs = load_runs(paths)
    healths = [grad_health(r) for r in runs]
    acts = [act_stats(r) for r in runs]
    summaries = [summarize(r, h, a) for r, h, a in zip(runs, healths, acts, strict=True)]
    report = Report(title, runs, summaries, select_winner(summaries))
    report.warnings = [w for r in runs for w in r.warnings]
    report.warnings += [
        f"{s.name} is not few-shot (decoder {s.decoder}): its weights saw test puzzles or data of unknown origin"
        for s in summaries
        if s.fewshot is False
    ]
    report.warnings += [
        f"{s.name}: its test-EM slope mixes evaluation protocols ({', '.join(s.slope_protocols)}); "
        "evaluate those checkpoints alike with `etrm eval` for a fair trend"
        for s in summaries
        if len(s.slope_protocols) > 1
    ]
    report.adaptation = [row for run in runs if (row := adaptation_row(run)) is not None]
    results = {}
    for run in runs:
        latest = run.latest_results()
        if latest is None:
            report.warnings.append(
                f"{run.path}: no eval/step-N/results.json; left out of the failure analysis"
            )
        else:
            results[run.name] = latest[1]

    from etrm.report import plots

    health_table = np.array(
        [
            [
                h.ratio,
                mean(h.ratios),
                min(h.ratios, default=math.nan),
                _mean_of(r, "grad/encoder_norm"),
                _mean_of(r, "grad/inner_norm"),
            ]
            for r, h in zip(runs, healths, strict=True)
        ]
    )
    draw: list[PlotJob] = [
        (
            "Test EM per run",
            "test_em.png",
            lambda p: plots.plot_test_em(summaries, report.selection.winner, p),
        ),
        ("Learning curves", "learning_curves.png", lambda p: plots.plot_learning_curves(runs, p)),
        (
            "Gradient health",
            "grad_health.png",
            lambda p: plots.plot_grad_health([r.name for r in runs], health_table, p),
        ),
        ("Train vs test EM", "train_vs_test.png", lambda p: plots.plot_train_vs_test(summaries, p)),
        (
            "ACT steps",
            "act_steps.png",
            lambda p: plots.plot_act_steps({r.name: a.histogram for r, a in zip(runs, acts, strict=True)}, p),
        ),
        ("Accuracy vs parameters", "params_pareto.png", lambda p: plots.plot_params_pareto(summaries, p)),
    ]
    sections = [(report.plots, draw)]
    if results:
        sections.append((report.failure_plots, _failure_plots(report, results, data)))

    with atomic_dir(out, overwrite=True, output=REPORT_OUTPUT) as tmp, make_progress() as progress:
        task = progress.add_task("report", total=sum(len(d) for _, d in sections), info="")
        for drawn, plot_list in sections:
            for caption, file_name, plot in plot_list:
                progress.update(task, info=file_name)
                plot(tmp / file_name)
                drawn[caption] = file_name
                progress.advance(task)
        (tmp / REPORT_FILE).write_text(render_markdown(report))
        atomic_write_json(tmp / SUMMARY_FILE, report.to_json())
    return report


def _mean_of(run: Run, key: str) -> float:
    return mean(finite_values(run.train_rows, key))


def _failure_plots(report: Report, results: dict[str, dict], data: str | None) -> list[PlotJob]:
    from etrm.report import plots

    outcomes = fa.outcome_matrix(results)
    failed = {name: fa.failures(result) for name, result in results.items()}
    solved = {name: int(np.sum(row >= 1.0)) for name, row in zip(outcomes.runs, outcomes.solved, strict=True)}
    report.failure_notes.append(
        "Puzzles solved within 2 attempts: "
        + ", ".join(
            f"{name} {count}/{int(np.sum(np.isfinite(row)))}"
            for (name, count), row in zip(solved.items(), outcomes.solved, strict=True)
        )
    )
    if len(outcomes.runs) > 1:
        by_any = int(np.sum(np.any(outcomes.solved >= 1.0, axis=0)))
        by_all = int(np.sum(np.all(outcomes.solved >= 1.0, axis=0)))
        report.failure_notes.append(
            f"Solved by at least one run: {by_any}; by every run: {by_all}, of {len(outcomes.puzzles)}."
        )
    confusions = {name: fa.wrong_cell_confusion(f) for name, f in failed.items()}
    draw = [
        ("Runs × puzzles outcomes", "outcomes.png", lambda p: plots.plot_outcomes(outcomes, p)),
        ("Colour confusion of wrong cells", "confusion.png", lambda p: plots.plot_confusions(confusions, p)),
    ]
    focus = report.selection.winner if report.selection.winner in results else next(iter(results))
    picks = fa.gallery_picks(outcomes, focus, failed[focus], GALLERY_PUZZLES)
    if picks:
        rows = _gallery_rows(report, picks, data or _data_path(report, focus))
        draw.append((f"Failed puzzles of {focus}", "gallery.png", lambda p: plots.plot_gallery(rows, p)))
    return draw


def _data_path(report: Report, run_name: str) -> str | None:
    run = next(r for r in report.runs if r.name == run_name)
    return run.config_value("data", "path")


def _gallery_rows(report: Report, picks: list[fa.Failure], data: str | None) -> list:
    test_split = _open_test_split(report, data)
    index = {task: g for g, task in enumerate(test_split.puzzle_ids)} if test_split is not None else {}
    rows = []
    for f in picks:
        panels: list[tuple[str, np.ndarray | None]] = []
        if f.task_id in index:
            g = index[f.task_id]
            for k, (demo_in, demo_out) in enumerate(test_split.demos(g)[:GALLERY_DEMOS]):
                panels += [
                    (f"demo {k + 1} in", np.asarray(demo_in)),
                    (f"demo {k + 1} out", np.asarray(demo_out)),
                ]
            queries = test_split.queries(g)
            if f.query < len(queries):
                panels.append(("query in", np.asarray(queries[f.query][0])))
        panels += [("expected", f.target), ("predicted", f.predicted)]
        rows.append((f"{f.task_id} #{f.query}", panels))
    return rows


def _open_test_split(report: Report, data: str | None):
    """The dataset's test split for the gallery's demos; without it the gallery shows outputs only."""
    if not data:
        report.warnings.append("gallery without demos: no dataset path (pass --data)")
        return None
    try:
        from etrm.data.dataset import ArcDataset

        return ArcDataset.open(data).split("test")
    except (ImportError, OSError, EtrmError) as e:
        report.warnings.append(f"gallery without demos: dataset {data} cannot be opened ({e})")
        return None


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%" if math.isfinite(x) else "—"


def _num(x: float, fmt: str = ".3f") -> str:
    return format(x, fmt) if math.isfinite(x) else "—"


RANKING_COLUMNS = (
    "rank",
    "run",
    "test@1",
    "test@2",
    "train",
    "gap",
    "slope/1k ep",
    "ratio",
    "health",
    "params",
    "explore",
    "ACT",
    "evals",
    "decoder",
    "protocol",
)


ADAPT_COLUMNS = (
    "run",
    "eval",
    "mode",
    "unadapted@1",
    "adapted@1",
    "solved→unsolved",
    "unsolved→solved",
    "skipped",
    "s/puzzle",
)


def adaptation_row(run: Run) -> dict[str, Any] | None:
    """The newest test-time-adapted evaluation of a run (`etrm eval --adapt`), unadapted beside adapted."""
    found = []
    for path in (run.path / "eval").glob("step-*-adapt-*/results.json"):
        step = path.parent.name.removeprefix("step-").split("-")[0]
        if step.isdigit():
            found.append((int(step), path))
    if not found:
        return None
    path = max(found)[1]
    try:
        results = json.loads(path.read_text())
        block = results["adapt"]
        return {
            "run": run.name,
            "eval": path.parent.name,
            "mode": block["mode"],
            "unadapted@1": _pct(block["unadapted_metrics"]["pass@1"]),
            "adapted@1": _pct(results["metrics"]["pass@1"]),
            "solved→unsolved": len(block["solved_to_unsolved"]),
            "unsolved→solved": len(block["unsolved_to_solved"]),
            "skipped": len(block["skipped_single_demo"]),
            "s/puzzle": f"{block['mean_adapt_seconds']:.2f}",
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EtrmError(f"{path}: not an adapted evaluation's results ({type(e).__name__}: {e})") from None


def ranking_rows(report: Report) -> list[dict[str, Any]]:
    by_name = {s.name: s for s in report.summaries}
    rows = []
    for rank, name in enumerate(report.selection.ranking, start=1):
        s = by_name[name]
        rows.append(
            {
                "rank": rank,
                "run": name,
                "test@1": _pct(s.test_em),
                "test@2": _pct(s.test_pass2),
                "train": _pct(s.train_em),
                "gap": _pct(s.gap),
                "slope/1k ep": f"{s.slope * 100:+.1f} pts" if math.isfinite(s.slope) else "—",
                "ratio": _num(s.grad_ratio),
                "health": s.grad_health,
                "params": f"{s.num_params / 1e6:.2f}M" if s.num_params is not None else "—",
                "explore": "—" if s.exploration is None else f"{s.exploration:g}",
                "ACT": s.act_range,
                "evals": s.evaluations,
                "decoder": s.decoder + (" (NOT few-shot)" if s.fewshot is False else ""),
                "protocol": _protocols(s),
            }
        )
    return rows


def _protocols(s) -> str:
    """Which protocol made the test (and, when it differs, the train) figures, and the file they came from."""
    if not s.protocol:
        return "—"
    train = f", train {s.train_protocol}" if s.train_protocol and s.train_protocol != s.protocol else ""
    return f"{s.protocol}{train} ({s.source})"


def recommendations(report: Report) -> list[str]:
    by_name = {s.name: s for s in report.summaries}
    out = []
    winner = by_name.get(report.selection.winner or "")
    if winner is not None:
        run = next(r for r in report.runs if r.name == winner.name)
        overrides = [
            f"arch.{key}={run.config_value('arch', key)}"
            for key in ("encoder_type", "encoder_num_layers", "halt_exploration_prob", "kl_weight")
            if run.config_value("arch", key) is not None
        ]
        batch = run.config_value("train", "global_batch_size")
        if batch is not None:
            overrides.append(f"train.global_batch_size={batch}")
        # The final preset needs a decoder choice: the winner's own (its config's train.init_from).
        overrides.append(f"train.init_from={run.config_value('train', 'init_from') or 'none'}")
        command = "etrm train --preset final " + " ".join(f"--set {o}" for o in overrides)
        out.append(f"Run the final (50k-epoch) training with {winner.name}'s configuration: `{command}`.")
    else:
        out.append("No run qualifies for the final run; fix gradient starvation first (see below).")
    if report.summaries and all(s.improving for s in report.summaries):
        out.append(
            "Every run is still improving at its last evaluations: the design extends the semi-final "
            "(`etrm train --resume RUN --set train.epochs=2000`) before choosing."
        )
    starved = [s.name for s in report.summaries if s.grad_health in ("unhealthy", "warning")]
    if starved:
        out.append(
            f"Encoder gradient share is low for {', '.join(starved)}: check `etrm diagnose encoder` for "
            "collapse; a larger `train.encoder_lr_scale` or re-encoding at every step (`arch.encoder_reencode=true`) may help."
        )
    overfit = [s.name for s in report.summaries if math.isfinite(s.gap) and s.gap >= MAX_GAP]
    if overfit:
        out.append(
            f"Train/test gap of {MAX_GAP:.0%} or more (memorising training puzzles): {', '.join(overfit)}."
        )
    stuck = [f"{s.name} (at {s.act_stuck_at})" for s in report.summaries if s.act_stuck_at is not None]
    if stuck:
        out.append(f"ACT steps stuck at one value: {', '.join(stuck)}; see `etrm diagnose act RUN`.")
    return out


def _markdown_table(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]).replace("|", "\\|") for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(report: Report) -> str:
    sel = report.selection
    by_name = {s.name: s for s in report.summaries}
    if sel.winner is not None:
        w = by_name[sel.winner]
        verdict = (
            f"**Selected: {sel.winner}** (test EM {_pct(w.test_em)}, grad ratio {_num(w.grad_ratio)}, "
            f"{f'{w.num_params:,}' if w.num_params is not None else 'unknown'} parameters). Decided by: *{sel.rule_text}*."
        )
    else:
        verdict = f"**No run selected**: {sel.rule_text} (grad ratio above 0.15 after an evaluation)."
    parts = [
        f"# {report.title}",
        f"Generated {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC from {len(report.runs)} run(s): "
        + ", ".join(f"`{r.path}`" for r in report.runs)
        + ".",
        "## Summary",
        verdict,
        *(f"**Note:** {note}." for note in sel.notes),
        "## Ranking",
        _markdown_table(ranking_rows(report), RANKING_COLUMNS),
        "Test EM is the last evaluation's pass@1; gap = train EM − test EM; slope = test EM change per 1000 "
        "epochs over the last evaluations; grad ratio = encoder/total gradient norm before clipping, last window; "
        "decoder = where the decoder's weights started (etrm:<run> pretrained by etrm on recorded data, foreign = "
        "a checkpoint of unknown training data, none = from scratch); "
        "protocol: how the figures were made (vote@N: voted over N augmentations, vote@all: over every stored "
        "one, identity: the identity augmentation alone) and where they come from (a full `etrm eval` of the "
        "checkpoint, eval/step-N/results.json, is preferred to the training's metrics.jsonl row).",
        "## Selection",
        "Rules applied in order:\n\n"
        + "\n".join(f"{i}. {line}" for i, line in enumerate(sel.reasoning, start=1)),
        f"Deciding rule: **{sel.rule_text}**.",
        "## Plots",
        *(f"### {caption}\n\n![{caption}]({file_name})" for caption, file_name in report.plots.items()),
    ]
    if report.failure_notes:
        parts += [
            "## Failure analysis",
            "\n".join(f"- {n}" for n in report.failure_notes),
            *(
                f"### {caption}\n\n![{caption}]({file_name})"
                for caption, file_name in report.failure_plots.items()
            ),
        ]
    if report.adaptation:
        parts += [
            "## Test-time adaptation",
            _markdown_table(report.adaptation, ADAPT_COLUMNS),
            "pass@1 of the same checkpoint and augmentations without and with `etrm eval --adapt`; puzzles "
            "solved counted at the evaluation's smallest k; single-demo puzzles are not adapted (skipped).",
        ]
    parts += ["## Recommendations for the final run", "\n".join(f"- {r}" for r in recommendations(report))]
    if report.warnings:
        parts += ["## Warnings", "\n".join(f"- {w}" for w in report.warnings)]
    return "\n\n".join(parts) + "\n"
