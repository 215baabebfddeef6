"""`etrm quickstart`: the whole workflow on one CPU in minutes: synthesise, build, train, evaluate, report.

It answers the project's question at laptop scale: does the encoder infer a rule from the demos of
puzzles it has never seen? The recipe here (a small ETRM that a CPU can train, scored per task
family) is also the one `benchmarks/bench_fewshot.py` runs for every encoder, so the quickstart and
the benchmark measure the same thing.
"""

from __future__ import annotations

import math
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import typer

from etrm.errors import EtrmError

# Rules whose parameters the demos must reveal: a colour table, one of 7 symmetries, an offset, a side.
FEWSHOT_FAMILIES = ("colour_map", "dihedral", "translate", "gravity")
FEWSHOT_GRID_SIZE = (3, 8)
EVAL_NUM_AUG = 8

# A model a CPU trains in minutes. Every ACT step is one optimizer step, so few ACT steps and a
# short recursion (H_cycles × (L_cycles + 1) passes of the 2-layer net) buy many more optimizer
# steps; the encoder runs once per sample; lr is high and constant after a short warmup because a
# time-limited run never reaches a cosine tail; EMA is off because it would average over most of
# a short run.
CPU_FEWSHOT_SETTINGS = [
    "arch.hidden_size=64",
    "arch.num_heads=4",
    "arch.expansion=2",
    "arch.L_layers=2",
    "arch.H_cycles=2",
    "arch.L_cycles=1",
    "arch.halt_max_steps=2",
    "arch.halt_exploration_prob=0.1",
    "arch.encoder_num_layers=2",
    "arch.encoder_reencode=false",
    "arch.context_len=16",
    "data.max_demos=5",
    "train.global_batch_size=32",
    "train.optimizer=adamw",
    "train.lr=1e-3",
    "train.lr_min_ratio=1.0",
    "train.lr_warmup_steps=20",
    "train.weight_decay=0.01",
    "train.ema=false",
    "train.epochs=100000",
    "train.eval_interval=0",
    "train.checkpoint_interval=0",
    "logging.wandb=disabled",
    "logging.log_interval=10",
]
# What demo encoders get on top (the puzzle-embedding baseline has no demos to read): each query
# cell reads the demo cells paired with its colour (CellLookup); without it no encoder learned
# colour remapping (benchmarks/RESULTS.md).
DEMO_ENCODER_SETTINGS = ["arch.cell_lookup=true"]


def prepare_synthetic(
    out: Path,
    *,
    families=FEWSHOT_FAMILIES,
    train_per_family: int = 200,
    test_per_family: int = 8,
    grid_size: tuple[int, int] = FEWSHOT_GRID_SIZE,
    seed: int = 0,
    holdout: str = "instances",
    test_families=None,
    num_aug: int = 64,
) -> Path:
    """Write `out/synth` (ARC task files) and build it into `out/data` through `etrm data build`'s code."""
    from etrm.data.build import BuildOptions, build_dataset
    from etrm.data.synth import write_synthetic

    synth = out / "synth"
    write_synthetic(
        synth,
        families=list(families),
        train_per_family=train_per_family,
        test_per_family=test_per_family,
        grid_size=grid_size,
        seed=seed,
        holdout=holdout,
        test_families=test_families,
    )
    data = out / "data"
    build_dataset(
        BuildOptions([str(synth / "train")], [str(synth / "test")], data, num_aug=num_aug, seed=seed)
    )
    return data


def fewshot_config(
    data: Path,
    encoder: str,
    minutes: float,
    seed: int = 0,
    grid_size: tuple[int, int] = FEWSHOT_GRID_SIZE,
    extra: list[str] = (),
    steps: int = 0,
):
    """The CPU recipe for one encoder type on a built synthetic dataset, stopping after `steps`
    optimizer steps when given (the same run on any machine), else after `minutes` of wall time.

    The decoder sees only the canvas corner the grids can reach (side = largest grid + 1 for the
    EOS row and column): 81 tokens instead of 900 for 3..8 grids, most of a step's cost saved.
    """
    from etrm.config import ENCODER_TYPES, RunConfig, apply_overrides

    if encoder not in ENCODER_TYPES:
        raise EtrmError(f"--encoder {encoder!r}: choose one of {', '.join(ENCODER_TYPES)}")
    if steps < 0:
        raise EtrmError(f"--steps {steps}: must be positive (or 0 to train for --minutes)")
    if not steps and not minutes > 0:
        raise EtrmError(f"--minutes {minutes}: must be positive")
    budget = (
        [f"train.max_steps={steps}", "train.max_minutes=0"] if steps else [f"train.max_minutes={minutes}"]
    )
    return apply_overrides(
        RunConfig(),
        [
            *CPU_FEWSHOT_SETTINGS,
            *(DEMO_ENCODER_SETTINGS if encoder != "puzzle_embedding" else []),
            f"arch.encoder_type={encoder}",
            f"arch.seq_len={(grid_size[1] + 1) ** 2}",
            f"data.path={data}",
            *budget,
            f"train.seed={seed}",
            f"logging.run_name={encoder}",
            *extra,
        ],
    )


def train_and_evaluate(
    cfg, run_dir: Path, eval_num_aug: int = EVAL_NUM_AUG, progress: bool = True
) -> tuple[dict, float]:
    """Train `cfg` into `run_dir`, then vote over `eval_num_aug` augmentations of every unseen test
    query with the final weights; the evaluation is written and logged as the training loop's own
    evaluations are, so `etrm report` reads the run like any other. Returns (results.json's content,
    training wall seconds)."""
    from etrm.eval import evaluate
    from etrm.runs.checkpoint import load_for_inference, load_trainer_state, resolve_checkpoint
    from etrm.train.evaluation import write_evaluation
    from etrm.train.loop import train
    from etrm.train.metrics import MetricsLogger

    start = time.perf_counter()
    train(cfg, run_dir, progress=progress)
    train_seconds = time.perf_counter() - start
    model, _, step = load_for_inference(run_dir, use_ema=cfg.train.ema)
    result = evaluate(
        model,
        cfg.data.path,
        "test",
        num_aug=eval_num_aug,
        batch_size=64,
        max_demos=cfg.data.max_demos,
        progress=progress,
        step=step,
    )
    epoch = float(load_trainer_state(resolve_checkpoint(run_dir))["epoch"])
    logger = MetricsLogger(run_dir, cfg)
    logger.log({"step": step, "epoch": epoch, **write_evaluation(result, run_dir, step)})
    logger.close()
    return result.results_json(), train_seconds


def machine_load() -> dict[str, Any]:
    """The 1-minute load average against the core count: above it, more threads wanted to run than
    there were cores, so a time budget bought fewer steps than on an idle machine."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    return {"load_average": round(load, 2), "cores": cores, "loaded": load > cores}


def family_scores(results: dict, k: int = 1) -> dict[str, tuple[int, float]]:
    """{family: (puzzles, mean pass@k)} from results.json; families read from synthetic task ids."""
    from etrm.data.synth import family_of

    per_family: dict[str, list[float]] = defaultdict(list)
    for task_id, puzzle in results["puzzles"].items():
        per_family[family_of(task_id)].append(puzzle["pass@k"][str(k)])
    return {name: (len(v), sum(v) / len(v)) for name, v in per_family.items()}


def run_quickstart(
    out: Path, minutes: float, encoder: str, seed: int, progress: bool = True, steps: int = 0
) -> dict:
    """Synthesise → build → train for `steps` (or `minutes`) → evaluate → report; returns what the command prints."""
    from etrm.console import err_console
    from etrm.report.build import REPORT_FILE, build_report

    if out.exists() and any(out.iterdir()):
        raise EtrmError(f"--out {out}: already holds files; choose a new folder")
    cfg = fewshot_config(
        out / "data", encoder, minutes, seed, steps=steps
    )  # bad options fail before any work
    err_console.print(f"[1/4] synthesising {', '.join(FEWSHOT_FAMILIES)} puzzles and building {out / 'data'}")
    data = prepare_synthetic(out, seed=seed)
    budget = f"{steps} steps" if steps else f"{minutes:g} min"
    err_console.print(f"[2/4] training a {encoder} ETRM on the CPU for {budget}")
    run_dir = out / "runs" / encoder
    # Voting costs inference time: a run of a few seconds gets one augmentation, 8 minutes or more
    # (or a step count) get 8.
    eval_num_aug = EVAL_NUM_AUG if steps else max(1, min(EVAL_NUM_AUG, math.floor(minutes)))
    results, train_seconds = train_and_evaluate(cfg, run_dir, eval_num_aug=eval_num_aug, progress=progress)
    err_console.print(
        f"[3/4] evaluated {len(results['puzzles'])} unseen test puzzles, {eval_num_aug} augmentation(s) voted"
    )
    report_dir = out / "report"
    build_report([run_dir], report_dir, title="etrm quickstart")
    err_console.print(f"[4/4] report written to {report_dir / REPORT_FILE}")
    rows = [
        {"family": name, "puzzles": n, "pass@1": score, "pass@2": family_scores(results, 2)[name][1]}
        for name, (n, score) in sorted(family_scores(results, 1).items())
    ]
    metrics = results["metrics"]
    rows.append(
        {
            "family": "all",
            "puzzles": metrics["num_puzzles"],
            "pass@1": metrics["pass@1"],
            "pass@2": metrics["pass@2"],
        }
    )
    return {
        "rows": rows,
        "run": str(run_dir),
        "report": str(report_dir / REPORT_FILE),
        "data": str(data),
        "step": results["step"],
        "steps_per_s": results["step"] / train_seconds,
        **machine_load(),
    }


def quickstart_command(
    minutes: float = typer.Option(10.0, "--minutes", help="CPU training time (wall clock)."),
    steps: int = typer.Option(
        0,
        "--steps",
        help="Train this many optimizer steps instead of --minutes: the same run on any machine.",
    ),
    encoder: str = typer.Option(
        "standard",
        "--encoder",
        help="standard, hybrid_standard, hybrid_variational, lpn_var or puzzle_embedding.",
    ),
    out: Path = typer.Option(
        Path("quickstart"), "--out", help="Folder for the data, the run and the report."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the puzzles, augmentations and training."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Synthesise few-shot puzzles, train a small ETRM on the CPU, score it on unseen puzzles."""
    from etrm.console import console, emit, err_console, print_json

    summary = run_quickstart(out, minutes, encoder, seed, progress=not as_json, steps=steps)
    if as_json:
        print_json(summary)
        return
    title = f"pass@k on unseen test puzzles after {summary['step']} steps ({encoder} encoder)"
    emit(summary["rows"], ["family", "puzzles", "pass@1", "pass@2"], as_json=False, title=title)
    console.print(f"trained at {summary['steps_per_s']:.2f} steps/s", markup=False)
    if summary["loaded"]:
        err_console.print(
            f"warning: the machine was loaded (load average {summary['load_average']} on "
            f"{summary['cores']} cores), so a time budget trains fewer steps than on an idle machine; "
            "use --steps N for a reproducible run",
            markup=False,
        )
    console.print(f"run folder: {summary['run']}\nreport: {summary['report']}", markup=False)
