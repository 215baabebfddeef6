"""`etrm report` (compare runs, pick the winner) and `etrm sweep` (the experiment matrices)."""

from __future__ import annotations

from pathlib import Path

import typer

from etrm.console import console, emit, print_json
from etrm.diagnose.cli import show_warnings

sweep_app = typer.Typer(
    help="Experiment sweeps: the torchrun commands of a phase's presets.", no_args_is_help=True
)


def report_command(
    runs: list[Path] = typer.Argument(..., help="Run folders to compare (e.g. runs/SF*)."),
    out: Path = typer.Option(
        Path("report"), "--out", help="Folder for report.md, summary.json and the plots."
    ),
    title: str = typer.Option("ETRM run comparison", "--title", help="Report title."),
    data: str = typer.Option(
        None, "--data", help="Dataset folder for the gallery's demos (default: the runs' data.path)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print summary.json to stdout instead of the table."),
) -> None:
    """Compare runs and select the winner by the semi-final rules.

    1. eligible only with grad ratio (encoder/total, pre-clip) > 0.15;
    2. highest test EM (pass@1); runs within 3 points of it stay;
    3. among those, prefer still improving (positive test-EM slope over the last evaluations)
       with train/test gap < 15%;
    4. then fewer parameters, then lower exploration, then better gradient health.
    """
    from etrm.report.build import ADAPT_COLUMNS, RANKING_COLUMNS, REPORT_FILE, build_report, ranking_rows

    report = build_report(runs, out, title=title, data=data)
    show_warnings(report.warnings)
    if as_json:
        print_json(report.to_json())
        return
    emit(ranking_rows(report), RANKING_COLUMNS, as_json=False, title=title)
    if report.adaptation:
        emit(
            report.adaptation, ADAPT_COLUMNS, as_json=False, title="test-time adaptation (etrm eval --adapt)"
        )
    selection = report.selection
    if selection.winner is None:
        console.print(f"no winner: {selection.rule_text}", markup=False)
    else:
        console.print(f"winner: {selection.winner} — decided by: {selection.rule_text}", markup=False)
    for note in selection.notes:
        console.print(f"note: {note}", markup=False)
    console.print(f"report: {out / REPORT_FILE}", markup=False)


def _sweep(
    phase: str,
    decoder: str | None,
    nproc: int | None,
    gpus_per_job: int,
    parallel: int,
    out: Path | None,
    run: bool,
    runs_dir: str,
    overrides: list[str],
    as_json: bool,
):
    from etrm.io import atomic_write_bytes
    from etrm.report.sweep import run_jobs, sweep_jobs

    nproc = nproc or gpus_per_job or 4
    jobs = sweep_jobs(
        phase, nproc, runs_dir, overrides, decoder=decoder, gpus_per_job=gpus_per_job, parallel=parallel
    )
    if out is not None:
        atomic_write_bytes(out, "".join(job.command + "\n" for job in jobs).encode())
        console.print(f"wrote {len(jobs)} commands to {out}", markup=False)
    elif as_json:
        print_json(
            [
                {
                    "preset": j.preset,
                    "run_name": j.run_name,
                    "project": j.project,
                    "env": j.env,
                    "slot": j.slot,
                    "command": j.command,
                }
                for j in jobs
            ]
        )
    elif not run:
        for job in jobs:
            typer.echo(job.command)
    if run:
        run_jobs(jobs, parallel)


NPROC = typer.Option(
    None,
    "--nproc",
    help="Processes (GPUs) per job: torchrun --nproc-per-node (default --gpus-per-job, else 4).",
)
OUT = typer.Option(None, "--out", help="Write the commands to this file, one per line.")
RUN = typer.Option(False, "--run", help="Run the jobs (--parallel at a time); report each job's exit status.")
RUNS_DIR = typer.Option("runs", "--runs-dir", help="Each job writes its run folder under this folder.")
SET = typer.Option([], "--set", help="Extra override for every job, e.g. train.lr=2e-4 (repeatable).")
DECODER = typer.Option(
    None,
    "--decoder",
    help="Every job's train.init_from: an etrm run (e.g. from `etrm train --preset trm`), a TRM checkpoint, "
    "or none (from scratch, on purpose).",
)
GPUS_PER_JOB = typer.Option(
    0, "--gpus-per-job", help="Give job i its own CUDA_VISIBLE_DEVICES block (block i mod --parallel)."
)
PARALLEL = typer.Option(1, "--parallel", help="Jobs running side by side (each with its own rendezvous).")
JSON = typer.Option(False, "--json", help="Print the jobs as JSON.")


@sweep_app.command("semi-final")
def semi_final_command(
    decoder: str = DECODER,
    nproc: int = NPROC,
    gpus_per_job: int = GPUS_PER_JOB,
    parallel: int = PARALLEL,
    out: Path = OUT,
    run: bool = RUN,
    runs_dir: str = RUNS_DIR,
    overrides: list[str] = SET,
    as_json: bool = JSON,
) -> None:
    """The six semi-final jobs, SF1–SF6, from one pretrained decoder."""
    _sweep("semi-final", decoder, nproc, gpus_per_job, parallel, out, run, runs_dir, overrides, as_json)


@sweep_app.command("overfit")
def overfit_command(
    decoder: str = DECODER,
    nproc: int = NPROC,
    gpus_per_job: int = GPUS_PER_JOB,
    parallel: int = PARALLEL,
    out: Path = OUT,
    run: bool = RUN,
    runs_dir: str = RUNS_DIR,
    overrides: list[str] = SET,
    as_json: bool = JSON,
) -> None:
    """The overfit jobs on 32 puzzle groups, E1a–E2c, from one pretrained decoder."""
    _sweep("overfit", decoder, nproc, gpus_per_job, parallel, out, run, runs_dir, overrides, as_json)
