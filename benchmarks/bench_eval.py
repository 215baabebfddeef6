"""Evaluation speed: re-voting 400 puzzles × 1000 augmentations from predictions.npz, and inference throughput.

    python benchmarks/bench_eval.py [--puzzles 400] [--augs 1000] [--skip-inference]

Voting: a synthetic predictions.npz shaped like an ARC-AGI-1 evaluation (a few
queries have two test pairs; each query's augmentations agree on a handful of grids
and scatter over many distinct wrong ones) is loaded, voted, scored and turned into
results.json and submissions — the work of `etrm eval --from-predictions`.
Inference: `evaluate` of a `cpu-smoke` model on a synthetic few-shot dataset,
counted in (query, augmentation) pairs per second.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from results import append_rows, machine, utc_stamp  # benchmarks/results.py
from rich.console import Console
from rich.table import Table

NAME = "bench_eval"  # rows in benchmarks/results/bench_eval.csv


def synthetic_predictions(num_puzzles: int, num_augs: int, seed: int = 0):
    """ARC-like predictions: 4% of puzzles have two queries; 60% of votes fall on 8 grids, the rest scatter."""
    from etrm.eval.predictions import PredictionsBuilder

    rng = np.random.default_rng(seed)

    def random_grid():
        h, w = rng.integers(3, 31, size=2)
        return rng.integers(0, 10, size=(h, w), dtype=np.uint8)

    queries = [[random_grid() for _ in range(2 if rng.random() < 0.04 else 1)] for _ in range(num_puzzles)]
    builder = PredictionsBuilder(
        [f"{i:08x}" for i in range(num_puzzles)], queries, [num_augs] * num_puzzles, meta={"split": "test"}
    )
    for task, targets in enumerate(queries):
        for query, target in enumerate(targets):
            popular = [target if rng.random() < 0.3 else random_grid() for _ in range(8)]
            q = rng.normal(size=num_augs)
            for aug in range(num_augs):
                if rng.random() < 0.6:
                    grid = popular[rng.integers(len(popular))]
                else:
                    grid = popular[0].copy()
                    grid.flat[rng.integers(grid.size, size=3)] = rng.integers(10, size=3)
                builder.add(task, query, aug, grid, float(q[aug]))
    return builder.build()


def bench_voting(num_puzzles: int, num_augs: int) -> list[dict]:
    from etrm.eval.results import EvalResult
    from etrm.eval.submission import arc_prize_submission, kaggle_csv

    predictions = synthetic_predictions(num_puzzles, num_augs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "predictions.npz"
        predictions.save(path)
        size_mb = path.stat().st_size / 2**20
        start = time.perf_counter()
        result = EvalResult.from_predictions_file(path)
        voted = time.perf_counter()
        result.results_json()
        attempts = result.attempts()
        arc_prize_submission(attempts)
        kaggle_csv(attempts)
        done = time.perf_counter()
    label = f"{num_puzzles} puzzles × {num_augs} augs ({len(predictions.query_task)} queries, {size_mb:.1f} MB npz)"
    return [
        {"benchmark": "re-vote: load + vote + score", "size": label, "value": f"{voted - start:.2f} s"},
        {
            "benchmark": "re-vote: total incl. results.json + submissions",
            "size": label,
            "value": f"{done - start:.2f} s",
        },
    ]


def bench_inference(num_puzzles: int = 4, num_augs: int = 8, batch_size: int = 16) -> list[dict]:
    """(query, augmentation) pairs per second of `evaluate` with the cpu-smoke preset's model, untrained."""
    import torch

    from etrm.config import get_preset
    from etrm.data.build import BuildOptions, build_dataset
    from etrm.data.dataset import ArcDataset
    from etrm.eval import evaluate
    from etrm.models import build_model

    cfg = get_preset("cpu-smoke")
    torch.manual_seed(0)
    model = build_model(cfg.arch)
    with tempfile.TemporaryDirectory() as tmp:
        options = BuildOptions(
            ["arc-agi-1-train"],
            ["arc-agi-1-eval"],
            Path(tmp) / "ds",
            num_aug=num_augs,
            max_puzzles=num_puzzles,
        )
        build_dataset(options)
        dataset = ArcDataset.open(options.out)
        kwargs = dict(batch_size=batch_size, max_demos=cfg.data.max_demos, progress=False)
        evaluate(model, dataset, num_aug=1, **kwargs)  # warm-up
        start = time.perf_counter()
        result = evaluate(model, dataset, **kwargs)
        seconds = time.perf_counter() - start
    pairs = int((result.predictions.grid_ids != -2).sum())
    arch = cfg.arch
    label = (
        f"cpu-smoke ({arch.encoder_type}, hidden {arch.hidden_size}, {arch.halt_max_steps} ACT steps, "
        f"H{arch.H_cycles}×L{arch.L_cycles}), {pairs} pairs, batch {batch_size}"
    )
    return [
        {"benchmark": "inference: (query, aug) pairs/s", "size": label, "value": f"{pairs / seconds:.1f}/s"}
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--puzzles", type=int, default=400)
    parser.add_argument("--augs", type=int, default=1000)
    parser.add_argument("--skip-inference", action="store_true")
    args = parser.parse_args()
    rows = bench_voting(args.puzzles, args.augs)
    if not args.skip_inference:
        rows += bench_inference()
    table = Table(title="bench_eval")
    for column in ("benchmark", "size", "value"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["benchmark"], row["size"], row["value"])
    Console().print(table)
    stamp, description = utc_stamp(), machine()
    for row in rows:
        row.update(date=stamp, machine=description)
    append_rows(NAME, ["date", "machine", "benchmark", "size", "value"], rows)


if __name__ == "__main__":
    main()
