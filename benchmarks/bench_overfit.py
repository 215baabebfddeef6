"""The experiment design's overfit phase in miniature on a CPU (issue 20): can an encoder fit real ARC?

Each overfit preset (E1a/E1b/E1d: the standard encoder at explorations 0.5/0.3/0.7; E2a hybrid
variational, E2b LPN variational, E2c hybrid standard) keeps its encoder, encoder depth,
exploration and KL weight, and takes the sizes of the `etrm quickstart` recipe, the cell lookup
on, on ARC-AGI-1 puzzles whose grids all fit --max-grid (built with `etrm data build --max-grid`;
at 10: 178 training and 77 evaluation puzzles) with the decoder on that canvas corner. Every run
trains on the first --groups training groups for the same time (and --steps, for runs that must
be reproducible), with one torch thread; --parallel runs that many side by side.

Per run: train EM on the trained groups (pass@1 voted over --eval-num-aug augmentations, the
design's metric), pass@1 on the other training puzzles and on the unseen evaluation puzzles,
the encoder's share of the gradient (`etrm diagnose grad-health`, over the whole run), mean ACT
steps, the variance of the encoder's context across the trained puzzles (the design's
"variance" column: low means the encoder says the same for every puzzle), steps and CPU time.

    python benchmarks/bench_overfit.py [--minutes 15] [--steps N] [--presets E1a,E1d] [--parallel 2]

Prints a table, appends its rows to benchmarks/results/bench_overfit.csv and a section to
benchmarks/RESULTS.md under "## bench_overfit", beside the design's full-size figures.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from results import RESULTS, append_rows, append_to_section, machine, utc_stamp  # benchmarks/results.py

from etrm.console import console, render_table

HEADING = "## bench_overfit"
NAME = "bench_overfit"  # rows in benchmarks/results/bench_overfit.csv
PRESETS = ("E1a", "E1b", "E1d", "E2a", "E2b", "E2c")
# What makes each preset itself; the rest of the quickstart recipe (sizes, optimizer) applies.
PRESET_KEYS = ("arch.encoder_num_layers", "arch.halt_exploration_prob")
# The design's overfit table (full size, pretrained TRM decoder, 4 GPUs): train EM on 32 groups at
# 5,000 steps, variance of the encoder output across puzzles, encoder/total gradient-norm ratio.
DESIGN = {
    "E1a": ("23.8%", "0.13", "0.20"),
    "E1b": ("37.1%", "0.34", "0.41"),
    "E1d": ("48.4%", "0.42", "0.41"),
    "E2a": ("19.5%", "2.45", "0.24"),
    "E2b": ("23.4%", "1.75", "0.07"),
    "E2c": ("29.7%", "1.70", "0.26"),
}
INTRO = [
    "The experiment design's overfit phase (E1a–E2c on 32 puzzle groups, compared by train EM,",
    "encoder variance and gradient health) in miniature on a CPU: each preset's encoder at the",
    "`etrm quickstart` recipe's sizes with the cell lookup, on ARC-AGI-1 puzzles whose grids all fit",
    "10×10 (`etrm data build --max-grid 10`: 178 training, 77 evaluation), the same minutes each.",
    "The design columns are its full-size figures at 5,000 steps (hidden 512, 16 ACT steps,",
    "pretrained TRM decoder, 4 GPUs; the overfit table of its semi-final plan), not the same run.",
    "Goal: the best encoder fits ≥ 50% of the 32 groups in 15 CPU minutes, general mechanisms only.",
    "",
    "| design (full size) | train EM @ 5,000 steps | variance | grad ratio |",
    "|---|---|---|---|",
    *(f"| {name} | {em} | {var} | {ratio} |" for name, (em, var, ratio) in DESIGN.items()),
]
COLUMNS = [
    "preset",
    "encoder",
    "explore",
    "steps",
    "CPU s",
    "train EM",
    "other train",
    "eval",
    "grad ratio",
    "ACT steps",
    "ctx var",
    "design EM@5K",
    "design var",
    "design ratio",
]
CSV_COLUMNS = [
    "date",
    "machine",
    "preset",
    "encoder",
    "explore",
    "minutes",
    "max_steps",
    "groups",
    "max_grid",
    "steps",
    "train_cpu_s",
    "train_wall_s",
    "train_em",
    "other_train_pass1",
    "eval_pass1",
    "grad_ratio",
    "grad_health",
    "act_mean_steps",
    "context_variance",
    "within_across",
]


def overfit_config(preset: str, data: Path, args):
    """The preset's encoder at the quickstart recipe's sizes, cell lookup on, on a side×side canvas."""
    from etrm.config import apply_overrides, get_preset
    from etrm.quickstart import CPU_FEWSHOT_SETTINGS

    recipe = [s for s in CPU_FEWSHOT_SETTINGS if s.split("=", 1)[0] not in PRESET_KEYS]
    return apply_overrides(
        get_preset(preset),
        [
            *recipe,
            "arch.cell_lookup=true",
            f"arch.seq_len={(args.max_grid + 1) ** 2}",
            f"data.path={data}",
            f"data.max_train_groups={args.groups}",
            f"train.max_minutes={args.minutes}",
            f"train.max_steps={args.steps}",
            f"train.seed={args.seed}",
            f"logging.run_name={preset}",
            "train.init_from=none",  # no decoder is pretrained at the recipe's sizes: from scratch (--set to change)
            *args.settings,
        ],
    )


def run_one(preset: str, data: Path, run_dir: Path, args) -> dict:
    """Train one preset, then score it; runs in a worker process of its own (one torch thread)."""
    from etrm.data.dataset import ArcDataset
    from etrm.diagnose.act import act_stats
    from etrm.diagnose.encoder_stats import encoder_stats
    from etrm.diagnose.grad_health import grad_health
    from etrm.diagnose.runs import load_run
    from etrm.eval import evaluate
    from etrm.runs.checkpoint import load_for_inference, load_trainer_state, resolve_checkpoint
    from etrm.train.loop import train
    from etrm.train.metrics import MetricsLogger

    torch.set_num_threads(args.threads)
    cfg = overfit_config(preset, data, args)
    wall, cpu = time.perf_counter(), time.process_time()
    train(cfg, run_dir, preset=preset, progress=False)
    train_cpu, train_wall = time.process_time() - cpu, time.perf_counter() - wall

    model, _, step = load_for_inference(run_dir, use_ema=cfg.train.ema)
    train_ids = ArcDataset.open(data).split("train").puzzle_ids
    common = dict(num_aug=args.eval_num_aug, max_demos=cfg.data.max_demos, progress=False, step=step)
    trained = evaluate(model, data, "train", task_ids=train_ids[: args.groups], **common)
    others = train_ids[args.groups :]
    other = evaluate(model, data, "train", task_ids=others, **common) if others else None
    unseen = evaluate(model, data, "test", **common)
    # Logged as the training loop logs its evaluations, so `etrm report` reads the run like any other.
    eval_dir = unseen.write(run_dir / "eval" / f"step-{step}")
    logger = MetricsLogger(run_dir, cfg)
    epoch = float(load_trainer_state(resolve_checkpoint(run_dir))["epoch"])
    row = {"step": step, "epoch": epoch, "eval/train_em": trained.metrics["train_em"]}
    row.update({f"eval/{k}": v for k, v in unseen.metrics.items() if k != "num_queries"})
    row["eval/results"] = str((eval_dir / "results.json").relative_to(run_dir))
    logger.log(row)
    logger.close()

    run = load_run(run_dir)
    health = grad_health(run)
    spread, _ = encoder_stats(str(run_dir), str(data), "train", puzzles=args.groups, augs=args.eval_num_aug)
    return {
        "preset": preset,
        "encoder": cfg.arch.encoder_type,
        "explore": cfg.arch.halt_exploration_prob,
        "steps": step,
        "train_cpu_s": train_cpu,
        "train_wall_s": train_wall,
        "train_em": trained.metrics["train_em"],
        "other_train_pass1": other.metrics["pass@1"] if other else float("nan"),
        "eval_pass1": unseen.metrics["pass@1"],
        "grad_ratio": health.ratio,
        "grad_health": health.health,
        "act_mean_steps": act_stats(run).mean_steps,
        "context_variance": spread.overall_across**2,
        "within_across": spread.overall_ratio,
    }


def table_row(r: dict) -> dict:
    design = DESIGN.get(r["preset"], ("-", "-", "-"))
    return {
        "preset": r["preset"],
        "encoder": r["encoder"],
        "explore": f"{r['explore']:g}",
        "steps": r["steps"],
        "CPU s": f"{r['train_cpu_s']:.0f}",
        "train EM": f"{r['train_em']:.1%}",
        "other train": f"{r['other_train_pass1']:.1%}",
        "eval": f"{r['eval_pass1']:.1%}",
        "grad ratio": f"{r['grad_ratio']:.2f} ({r['grad_health']})",
        "ACT steps": f"{r['act_mean_steps']:.2f}",
        "ctx var": f"{r['context_variance']:.3g}",
        "design EM@5K": design[0],
        "design var": design[1],
        "design ratio": design[2],
    }


def markdown(rows: list[dict], columns: list[str]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(out)


def command_line(args, presets: list[str]) -> str:
    return (
        f"python benchmarks/bench_overfit.py --minutes {args.minutes:g} --steps {args.steps} "
        f"--presets {','.join(presets)} --parallel {args.parallel} --threads {args.threads} "
        f"--groups {args.groups} --max-grid {args.max_grid} --num-aug {args.num_aug} "
        f"--eval-num-aug {args.eval_num_aug} --seed {args.seed}"
        + "".join(f" --set {kv}" for kv in args.settings)
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--minutes", type=float, default=15.0, help="training time per run (wall clock; 0 = none)"
    )
    parser.add_argument("--steps", type=int, default=0, help="stop each run after N steps too (0 = no limit)")
    parser.add_argument("--presets", default=",".join(PRESETS), help="overfit presets to run")
    parser.add_argument("--parallel", type=int, default=1, help="runs side by side (one process each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument(
        "--groups", type=int, default=32, help="training groups trained on (data.max_train_groups)"
    )
    parser.add_argument("--max-grid", type=int, default=10, help="keep puzzles whose grids all fit N×N")
    parser.add_argument("--num-aug", type=int, default=1000, help="augmentations stored per puzzle")
    parser.add_argument("--eval-num-aug", type=int, default=8, help="augmentations voted at evaluation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="keep data and runs here (default: a temp folder)"
    )
    parser.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
        help="a config override for every run (repeatable)",
    )  # fmt: skip
    parser.add_argument("--no-record", action="store_true", help="do not append to the CSV and RESULTS.md")
    args = parser.parse_args()
    presets = [p for p in args.presets.split(",") if p]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown or not presets:
        parser.error(f"--presets: choose among {', '.join(PRESETS)} (got {', '.join(unknown) or 'none'})")
    if args.minutes <= 0 and args.steps <= 0:
        parser.error("give --minutes or --steps (or both): a run needs a limit")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the workers' torch reads it when it starts
    torch.set_num_threads(args.threads)  # and the machine line says so

    from etrm.data.build import BuildOptions, build_dataset
    from etrm.data.dataset import ArcDataset

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        data = root / "data"
        if not data.exists():
            sources = (["arc-agi-1-train"], ["arc-agi-1-eval"])
            build_dataset(BuildOptions(*sources, data, num_aug=args.num_aug, max_grid=args.max_grid))
        elif ArcDataset.open(data).manifest.get("max_grid") != args.max_grid:
            parser.error(f"{data} was built with another --max-grid; choose a new --out")
        spawn = multiprocessing.get_context("spawn")  # fresh interpreters: no torch threads inherited
        with ProcessPoolExecutor(max_workers=args.parallel, mp_context=spawn) as pool:
            jobs = [pool.submit(run_one, p, data, root / "runs" / p, args) for p in presets]
            results = [job.result() for job in jobs]

    rows = [table_row(r) for r in results]
    title = (
        f"overfit phase in miniature: {args.groups} groups of ARC-AGI-1 ≤{args.max_grid}×{args.max_grid}, "
        f"{args.minutes:g} min{f' / {args.steps} steps' if args.steps else ''} per run"
    )
    console.print(render_table(rows, COLUMNS, title=title))
    if args.no_record:
        return
    stamp, where = utc_stamp(), machine()
    csv_path = append_rows(
        NAME,
        CSV_COLUMNS,
        [
            {"date": stamp, "machine": where, "minutes": args.minutes, "max_steps": args.steps,
             "groups": args.groups, "max_grid": args.max_grid, **r}
            for r in results
        ],
    )  # fmt: skip
    header = (
        f"### {stamp}: {where}\n\n`{command_line(args, presets)}`\n\n"
        f"train EM: pass@1 on the {args.groups} trained groups' held-out pairs, voted over "
        f"{args.eval_num_aug} augmentations; other train / eval: pass@1 the same way on the other "
        f"training puzzles and on the unseen evaluation puzzles; CPU s: training only.\n"
    )
    append_to_section(
        HEADING, ["", *header.splitlines(), "", *markdown(rows, COLUMNS).splitlines()], intro=INTRO
    )
    console.print(f"appended to {csv_path} and {RESULTS}")


if __name__ == "__main__":
    main()
