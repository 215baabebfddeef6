"""`etrm diagnose …`: gradient health, encoder collapse, ACT behaviour and TRM checkpoints."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import typer

from etrm.console import console, emit, err_console, print_json
from etrm.diagnose.checkpoint import checkpoint_command

app = typer.Typer(help="Diagnose checkpoints and runs.", no_args_is_help=True)

JSON_OPTION = typer.Option(False, "--json", help="Print JSON instead of a table.")
RUN_ARGUMENT = typer.Argument(..., help="Run folder (written by `etrm train --out`).")


def show_warnings(messages: Iterable[str]) -> None:
    for message in messages:
        err_console.print(f"warning: {message}", style="yellow", markup=False, highlight=False)


def _unknown(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def json_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """NaN and inf as null: JSON has no NaN."""
    return [{k: None if _unknown(v) else v for k, v in row.items()} for row in rows]


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: "—" if _unknown(v) else v for k, v in row.items()} for row in rows]


@app.command("grad-health")
def grad_health_command(run: Path = RUN_ARGUMENT, as_json: bool = JSON_OPTION) -> None:
    """Encoder share of the gradient, per evaluation window.

    ratio = grad/encoder_norm ÷ grad/total_norm (both before clipping), averaged over each window's logged steps.
    healthy: ratio > 0.2 · warning: 0.1 ≤ ratio ≤ 0.2 · unhealthy (gradient starvation): ratio < 0.1.
    The verdict is the last window's class; the trend is the ratio's change over the run.
    """
    from etrm.diagnose.grad_health import grad_health
    from etrm.diagnose.runs import load_run

    loaded = load_run(run)
    show_warnings(loaded.warnings)
    health = grad_health(loaded)
    rows = [
        {
            "window": w.label,
            "steps logged": w.rows,
            "encoder norm": w.encoder_norm,
            "inner norm": w.inner_norm,
            "ratio": w.ratio,
            "health": w.health,
        }
        for w in health.windows
    ]
    verdict = {"ratio": health.ratio, "health": health.health, "trend": health.trend, "change": health.change}
    if as_json:
        print_json({"run": loaded.name, "windows": json_rows(rows), **json_rows([verdict])[0]})
        return
    if not rows:
        show_warnings([f"{loaded.path}: no grad/encoder_norm and grad/total_norm logged yet"])
        return
    emit(table_rows(rows), list(rows[0]), as_json=False, title=f"Gradient health: {loaded.name}")
    console.print(
        f"verdict: {health.health} (ratio {health.ratio:.3f} in the last window), "
        f"trend {health.trend} ({health.change:+.3f} over the run)",
        markup=False,
    )


@app.command("encoder")
def encoder_command(
    path: Path = typer.Argument(
        ..., help="Run folder (its latest checkpoint) or a step-N/ checkpoint folder."
    ),
    data: str = typer.Option(None, "--data", help="Dataset folder (default: the run's data.path)."),
    split: str = typer.Option("test", "--split", help="Dataset split whose puzzles are encoded."),
    puzzles: int = typer.Option(32, "--puzzles", help="How many puzzles (the split's first)."),
    augs: int = typer.Option(8, "--augs", help="Augmentations per puzzle (0 is the identity)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Episodes per encoder call."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Context spread across puzzles vs across augmentations of one puzzle, per context token.

    within = spread across augmentations of one puzzle; across = spread across puzzles; ratio = within / across.
    A ratio near 1 (≥ 0.9) means the context does not tell puzzles apart: collapse; so does a constant context.
    """
    from etrm.diagnose.encoder_stats import COLLAPSE_RATIO, encoder_stats

    stats, about = encoder_stats(str(path), data, split, puzzles, augs, batch_size)
    collapsed = set(stats.collapsed_tokens)
    rows = [
        {
            "token": t,
            "rms": float(stats.rms[t]),
            "across puzzles": float(stats.across[t]),
            "within puzzle": float(stats.within[t]),
            "ratio": float(stats.ratio[t]),
            "collapsed": t in collapsed,
        }
        for t in range(len(stats.rms))
    ]
    if as_json:
        summary = {"ratio": stats.overall_ratio, "constant": stats.constant, "warning": stats.warning}
        print_json(
            {
                **about,
                "puzzles": stats.puzzles,
                "augmentations": stats.augmentations,
                "tokens": json_rows(rows),
                **json_rows([summary])[0],
            }
        )
        return
    title = (
        f"Encoder spread: {about['encoder_type']}, step {about['checkpoint_step']}, "
        f"{stats.puzzles} puzzles × {stats.augmentations} augmentations"
    )
    emit(table_rows(rows), list(rows[0]), as_json=False, title=title)
    console.print(
        f"overall ratio {stats.overall_ratio:.3f} (within {stats.overall_within:.4g}, "
        f"across {stats.overall_across:.4g}); collapse at ≥ {COLLAPSE_RATIO}",
        markup=False,
    )
    if stats.warning:
        show_warnings([stats.warning])


@app.command("act")
def act_command(run: Path = RUN_ARGUMENT, as_json: bool = JSON_OPTION) -> None:
    """ACT steps during training: distribution, Q-halt accuracy, and whether steps are stuck."""
    from etrm.diagnose.act import act_stats, step_range_text
    from etrm.diagnose.runs import load_run

    loaded = load_run(run)
    show_warnings(loaded.warnings)
    stats = act_stats(loaded)
    halted = sum(stats.histogram)
    histogram = [
        {"steps": i + 1, "halted rows": count, "share": count / halted if halted else 0.0}
        for i, count in enumerate(stats.histogram)
    ]
    if as_json:
        windows = [
            {
                "window": w.label,
                "mean steps": w.mean_steps,
                "q-halt accuracy": w.q_halt_accuracy,
                "histogram": w.histogram,
            }
            for w in stats.windows
        ]
        summary = {
            "min_steps": stats.min_steps,
            "max_steps": stats.max_steps,
            "mean_steps": stats.mean_steps,
            "q_halt_accuracy": stats.q_halt_accuracy,
            "stuck_at": stats.stuck_at,
            "warning": stats.warning,
        }
        print_json(
            {
                "run": loaded.name,
                "windows": json_rows(windows),
                "histogram": histogram,
                **json_rows([summary])[0],
            }
        )
        return
    windows = [
        {
            "window": w.label,
            "mean steps": w.mean_steps,
            "range": step_range_text(w.histogram),
            "q-halt accuracy": w.q_halt_accuracy,
        }
        for w in stats.windows
    ]
    if windows:
        emit(table_rows(windows), list(windows[0]), as_json=False, title=f"ACT steps: {loaded.name}")
    if histogram:
        emit(histogram, list(histogram[0]), as_json=False, title="Steps until halting (whole run)")
        console.print(
            f"steps used: {step_range_text(stats.histogram)}, mean {stats.mean_steps:.2f}; "
            f"q-halt accuracy {stats.q_halt_accuracy:.3f} in the last window",
            markup=False,
        )
    else:
        show_warnings([f"{loaded.path}: no train/steps_hist logged yet"])
    if stats.warning:
        show_warnings([stats.warning])


app.command("checkpoint")(checkpoint_command)
