"""Few-shot proof on a CPU (issue 7): does an encoder infer a rule from the demos of unseen puzzles?

Every encoder type and the TRM puzzle-embedding baseline train for the same time on the same
synthetic split (the recipe of `etrm quickstart`), then vote over augmentations of unseen test
puzzles. pass@1 is reported per family and overall next to two floors: copying the input, and
the baseline (a blank puzzle id: it cannot know an unseen puzzle). A second split holds whole
families out of training; the best encoder of the first part is trained and scored on it.
With `--adapt latent|finetune` every trained model is also scored after test-time adaptation to
each test puzzle's demos (`etrm eval --adapt`): a column "MODEL +MODE" beside the unadapted one,
with the adaptation's seconds per puzzle and the puzzles it solved (+) and lost (−).

    python benchmarks/bench_fewshot.py [--minutes 15 | --steps N] [--encoders standard,...] [--threads N]
        [--parallel K] [--adapt latent]

With `--parallel K`, K trainings run at once, each in its own process with --threads threads (on a
K-core machine: K runs in the wall time of one); the held-out run starts once every demo encoder
of the first part is scored, since it trains the best of them.

Prints a table and appends it to benchmarks/results/bench_fewshot.csv, one row per (part, family,
model) with the command. The time limit is wall-clock; each part also gives the steps trained and
the process's CPU time, since a shared machine gives the runs unequal shares of it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
from results import append_rows, machine, utc_stamp  # benchmarks/results.py

from etrm.config import ENCODER_TYPES
from etrm.console import console, render_table
from etrm.data.dataset import ArcDataset
from etrm.data.synth import family_of, parse_grid_size, resolve_families
from etrm.errors import EtrmError
from etrm.quickstart import (
    EVAL_NUM_AUG,
    FEWSHOT_FAMILIES,
    family_scores,
    fewshot_config,
    prepare_synthetic,
    train_and_evaluate,
)

NAME = "bench_fewshot"  # rows in benchmarks/results/bench_fewshot.csv
BASELINE = "puzzle_embedding"
HELD_OUT_FAMILIES = ("border", "scale")
COST_ROW = "steps / CPU s"  # of training; an adapted column: adaptation s/puzzle, +solved −lost


def copy_floor(data: Path) -> dict[str, float]:
    """pass@1 of answering every test query with its own input, per family and overall (puzzle mean)."""
    split = ArcDataset.open(data).split("test")
    per_puzzle: dict[str, list[float]] = {}
    for g, task_id in enumerate(split.puzzle_ids):
        solved = [x.shape == y.shape and bool((x == y).all()) for x, y in split.queries(g)]
        per_puzzle.setdefault(family_of(task_id), []).append(float(np.mean(solved)))
    floor = {name: float(np.mean(v)) for name, v in per_puzzle.items()}
    floor["all"] = float(np.mean([s for v in per_puzzle.values() for s in v]))
    return floor


def train_one(data: Path, encoder: str, run_dir: Path, args) -> dict[str, dict]:
    """Train and score one encoder: {name: {family: pass@1, "all": pass@1, "note": cost}}, the adapted
    scores under "ENCODER +MODE" too with --adapt."""
    cfg = fewshot_config(
        data,
        encoder,
        args.minutes,
        seed=args.seed,
        grid_size=args.grid_size,
        extra=args.settings,
        steps=args.steps,
    )
    cpu = time.process_time()
    results, _ = train_and_evaluate(cfg, run_dir, eval_num_aug=args.eval_num_aug, progress=args.parallel == 1)
    scores = {name: score for name, (_, score) in family_scores(results).items()}
    scores["all"] = results["metrics"]["pass@1"]
    scores["note"] = f"{results['step']} / {time.process_time() - cpu:.0f}"
    console.print(f"{encoder}: pass@1 {scores['all']:.3f} after {results['step']} steps", markup=False)
    scored = {encoder: scores}
    if args.adapt != "none":
        scored[f"{encoder} +{args.adapt}"] = adapt_one(data, run_dir, args)
    return scored


def _worker_init(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


class Trainings:
    """Runs `train_one` jobs: in this process with --parallel 1, else K worker processes at a time."""

    def __init__(self, args):
        self.args = args
        self.pool = None
        if args.parallel > 1:
            context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked torch threads
            self.pool = ProcessPoolExecutor(
                args.parallel, mp_context=context, initializer=_worker_init, initargs=(args.threads,)
            )

    def submit(self, data: Path, encoder: str, run_dir: Path):
        """A handle whose .result() is train_one's."""
        if self.pool is None:
            return _Done(train_one(data, encoder, run_dir, self.args))
        return self.pool.submit(train_one, data, encoder, run_dir, self.args)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value


def adapt_one(data: Path, run_dir: Path, args) -> dict:
    """pass@1 per family after test-time adaptation of the trained model, and what it cost and changed."""
    from etrm.eval import evaluate
    from etrm.eval.adapt import evaluate_adapted
    from etrm.runs.checkpoint import load_for_inference

    model, cfg, step = load_for_inference(run_dir)
    options = adapt_options(args)
    common = dict(num_aug=args.eval_num_aug, max_demos=cfg.data.max_demos, step=step)
    unadapted = evaluate(model, data, "test", **common)
    results = evaluate_adapted(model, data, "test", options, unadapted=unadapted, **common).results_json()
    scores = {name: score for name, (_, score) in family_scores(results).items()}
    scores["all"] = results["metrics"]["pass@1"]
    block = results["adapt"]
    scores["note"] = (
        f"{block['mean_adapt_seconds']:.2f} s/puzzle, +{len(block['unsolved_to_solved'])} "
        f"−{len(block['solved_to_unsolved'])}"
    )
    console.print(
        f"{args.adapt}: pass@1 {block['unadapted_metrics']['pass@1']:.3f} → {scores['all']:.3f}, {scores['note']}",
        markup=False,
    )
    return scores


def adapt_options(args):
    from etrm.eval.adapt import AdaptOptions

    return AdaptOptions(
        args.adapt,
        args.adapt_steps,
        args.adapt_lr,
        args.adapt_batch,
        args.adapt_params,
        args.seed,
        args.adapt_rank,
    ).validate()


def check_options(args, encoders: list[str], families: list[str], held_out: list[str]) -> None:
    """Raise EtrmError naming the first bad option."""
    adapt_options(args)
    unknown = [e for e in encoders if e not in ENCODER_TYPES]
    if not encoders or unknown:
        raise EtrmError(f"--encoders {args.encoders!r}: choose from {', '.join(ENCODER_TYPES)}")
    resolve_families([*families, *held_out], *args.grid_size)
    for option, value, least in (
        ("--parallel", args.parallel, 1),
        ("--train-puzzles", args.train_puzzles, 1),
        ("--test-puzzles", args.test_puzzles, 1),
        ("--num-aug", args.num_aug, 0),
        ("--eval-num-aug", args.eval_num_aug, 1),
        ("--threads", args.threads, 0),
    ):
        if value < least:
            raise EtrmError(f"{option} {value}: must be at least {least}")
    for encoder in encoders:  # the recipe's own checks: --minutes, --steps and every --set
        fewshot_config(
            Path("data"), encoder, args.minutes, args.seed, args.grid_size, args.settings, args.steps
        )


def table_rows(part: str, families: list[str], floor: dict, runs: dict[str, dict]) -> list[dict]:
    rows = []
    for family in [*families, "all"]:
        row = {"part": part, "family": family, "copy input": f"{floor[family]:.3f}"}
        row.update({name: f"{scores.get(family, 0.0):.3f}" for name, scores in runs.items()})
        rows.append(row)
    rows.append(
        {"part": part, "family": COST_ROW, "copy input": "-"} | {name: s["note"] for name, s in runs.items()}
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=15.0, help="training time per encoder (wall clock)")
    parser.add_argument(
        "--encoders", default=",".join(ENCODER_TYPES), help="encoder types, baseline included"
    )
    parser.add_argument("--families", default=",".join(FEWSHOT_FAMILIES), help="in-distribution families")
    parser.add_argument(
        "--held-out", default=",".join(HELD_OUT_FAMILIES), help="families of the held-out run ('' = skip)"
    )
    parser.add_argument("--train-puzzles", type=int, default=500, help="training puzzles per family")
    parser.add_argument("--test-puzzles", type=int, default=10, help="test puzzles per family")
    parser.add_argument("--grid-size", type=parse_grid_size, default=(3, 8), help="MIN..MAX grid side")
    parser.add_argument("--num-aug", type=int, default=64, help="augmentations stored per puzzle")
    parser.add_argument("--eval-num-aug", type=int, default=EVAL_NUM_AUG, help="augmentations voted at test")
    parser.add_argument(
        "--steps", type=int, default=0, help="train this many optimizer steps instead of --minutes"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = torch's default)")
    parser.add_argument("--parallel", type=int, default=1, help="trainings run at once, one process each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--out", type=Path, default=None, help="keep data and runs here (default: a temp folder)"
    )
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every run on top of the quickstart recipe (repeatable)",
    )
    parser.add_argument(
        "--adapt", default="none", help="also score after test-time adaptation: none | latent | finetune"
    )
    parser.add_argument("--adapt-steps", type=int, default=20, help="adaptation steps per puzzle")
    parser.add_argument("--adapt-lr", type=float, default=None, help="adaptation lr (default: the mode's)")
    parser.add_argument("--adapt-batch", type=int, default=8, help="leave-one-out episodes per step")
    parser.add_argument("--adapt-params", default=None, help="finetune: encoder | decoder | all | lora")
    parser.add_argument("--adapt-rank", type=int, default=None, help="lora: the deltas' rank (default 4)")
    parser.add_argument("--no-record", action="store_true", help="do not append to benchmarks/results/")
    args = parser.parse_args()
    encoders = [e for e in args.encoders.split(",") if e]
    families = [f for f in args.families.split(",") if f]
    held_out = [f for f in args.held_out.split(",") if f]
    try:  # every bad option fails now, in one line, not after the synthesis or a training
        check_options(args, encoders, families, held_out)
    except EtrmError as e:
        parser.exit(2, f"error: {e}\n")
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        common = dict(
            train_per_family=args.train_puzzles,
            test_per_family=args.test_puzzles,
            grid_size=args.grid_size,
            seed=args.seed,
            num_aug=args.num_aug,
        )
        data = prepare_synthetic(root / "instances", families=families, **common)
        held_data = None
        if held_out:
            held_data = prepare_synthetic(
                root / "families",
                families=[*families, *held_out],
                holdout="families",
                test_families=held_out,
                **common,
            )
        trainings = Trainings(args)
        try:
            demo_encoders = [e for e in encoders if e != BASELINE] or encoders
            # Demo encoders first: the held-out run waits for them, not for the baseline.
            order = [*demo_encoders, *(e for e in encoders if e not in demo_encoders)]
            pending = {e: trainings.submit(data, e, root / "instances" / "runs" / e) for e in order}
            runs = {}
            for e in demo_encoders:
                runs.update(pending[e].result())
            held_pending = None
            if held_data is not None:
                best = max(demo_encoders, key=lambda e: runs[e]["all"])
                held_pending = trainings.submit(held_data, best, root / "families" / "runs" / best)
            for e in order[len(demo_encoders) :]:
                runs.update(pending[e].result())
            runs = {name: runs[name] for e in encoders for name in runs if name.split(" +")[0] == e}
            rows = table_rows("unseen instances", families, copy_floor(data), runs)
            if held_pending is not None:
                held_runs = held_pending.result()
                rows += table_rows(f"held-out families ({best})", held_out, copy_floor(held_data), held_runs)
        finally:
            trainings.close()

    models = list(dict.fromkeys(name for row in rows for name in row if name not in ("part", "family")))
    columns = ["part", "family", *models]
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min"
    title = f"pass@1 on unseen test puzzles, {budget} of training per encoder"
    console.print(render_table(rows, columns, title=title))
    if args.no_record:
        return
    command = (
        f"python benchmarks/bench_fewshot.py {f'--steps {args.steps}' if args.steps else f'--minutes {args.minutes:g}'} "
        f"--encoders {','.join(encoders)} "
        f"--families {','.join(families)} --held-out {','.join(held_out)} --train-puzzles {args.train_puzzles} "
        f"--test-puzzles {args.test_puzzles} --grid-size {args.grid_size[0]}..{args.grid_size[1]} "
        f"--num-aug {args.num_aug} --eval-num-aug {args.eval_num_aug} --threads {torch.get_num_threads()} "
        f"--parallel {args.parallel} "
        f"--seed {args.seed}{''.join(f' --set {kv}' for kv in args.settings)}"
    )
    if args.adapt != "none":
        command += (
            f" --adapt {args.adapt} --adapt-steps {args.adapt_steps} --adapt-batch {args.adapt_batch}"
            f"{f' --adapt-lr {args.adapt_lr:g}' if args.adapt_lr else ''}"
            f"{f' --adapt-params {args.adapt_params}' if args.adapt_params else ''}"
            f"{f' --adapt-rank {args.adapt_rank}' if args.adapt_rank else ''}"
        )
    # One row per (part, family, model): pass@1 voted over eval_num_aug augmentations, or for the
    # family COST_ROW the optimizer steps trained / process CPU seconds of training + evaluation, or for
    # an adapted model the adaptation seconds per puzzle and the puzzles it solved and lost.
    common = {"date": utc_stamp(), "machine": machine(), "command": command}
    records = [
        {**common, "part": row["part"], "family": row["family"], "model": model, "value": row[model]}
        for row in rows
        for model in models
        if row.get(model, "-") != "-"
    ]
    path = append_rows(NAME, ["date", "machine", "command", "part", "family", "model", "value"], records)
    console.print(f"appended to {path}")


if __name__ == "__main__":
    main()
