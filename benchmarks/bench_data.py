"""Dataset build and episode sampler speed (issue 2 goals: full ARC-AGI-1 build with 1000
augmentations <= 15 s and <= 50 MB on disk; sampler >= 20,000 episodes/s).

    python benchmarks/bench_data.py [--num-aug 1000] [--batch-size 768] [--batches 20]

Prints a table and appends its rows to benchmarks/results/bench_data.csv. The
machine is shared, so each row also gives the process's CPU time and the load average.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from results import append_rows, machine, utc_stamp  # benchmarks/results.py

from etrm.console import console, render_table
from etrm.data.build import BuildOptions, build_dataset, resolve_sources
from etrm.data.dataset import ArcDataset
from etrm.data.episodes import EpisodeSampler

NAME = "bench_data"  # rows in benchmarks/results/bench_data.csv
COLUMNS = ["date", "machine", "benchmark", "size", "wall", "cpu", "goal"]


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def bench_build(out: Path, num_aug: int) -> list[dict]:
    train, test = resolve_sources("arc-agi-1", [], [])
    options = BuildOptions(train, test, out, num_aug=num_aug)
    manifest, wall, cpu = timed(lambda: build_dataset(options))
    size_mb = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / 1e6
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    counts = manifest["counts"]
    puzzles = counts["train"]["puzzles"] + counts["test"]["puzzles"]
    augs = counts["train"]["augmentations"] + counts["test"]["augmentations"]
    size = f"ARC-AGI-1, {puzzles} puzzles, num_aug {num_aug} ({augs / puzzles:.0f} distinct/puzzle)"
    return [
        {
            "benchmark": "build",
            "size": size,
            "wall": f"{wall:.1f} s",
            "cpu": f"{cpu:.1f} s",
            "goal": "<= 15 s",
        },
        {
            "benchmark": "build: disk / peak memory",
            "size": size,
            "wall": f"{size_mb:.1f} MB on disk",
            "cpu": f"{peak_mb:.0f} MB peak RSS",
            "goal": "<= 50 MB on disk",
        },
    ]


def bench_sampler(
    dataset: ArcDataset, split: str, mode: str, batch_size: int, batches: int, **kwargs
) -> dict:
    sampler = EpisodeSampler(dataset.split(split), batch_size, mode, **kwargs)
    # Steady state: index tables are built and the pool holds reusable buffers before timing starts.
    warm = iter(sampler)
    for _ in range(min(3, len(sampler))):
        next(warm)

    def run():
        produced = 0
        while produced < batches:
            for _ in sampler:
                produced += 1
                if produced == batches:
                    break

    _, wall, cpu = timed(run)
    episodes = batches * batch_size
    extras = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return {
        "benchmark": f"sampler {mode} ({split} split{', ' + extras if extras else ''})",
        "size": f"{batches} batches of {batch_size}, max_demos 10, "
        f"{'uint8' if kwargs.get('compact') else 'int64'} tensors",
        "wall": f"{episodes / wall:,.0f} episodes/s",
        "cpu": f"{episodes / cpu:,.0f} episodes/CPU-s",
        "goal": ">= 20,000 episodes/s",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-aug", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=768)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--no-save", action="store_true", help="Do not append to benchmarks/results/.")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "arc-agi-1"
        rows = bench_build(out, args.num_aug)
        dataset = ArcDataset.open(out)
        rows.append(bench_sampler(dataset, "train", "train", args.batch_size, args.batches))
        rows.append(bench_sampler(dataset, "train", "train", args.batch_size, args.batches, translate=True))
        rows.append(bench_sampler(dataset, "test", "eval", args.batch_size, args.batches))
        # As training and evaluation sample: uint8 tokens, widened on the device.
        for split, mode, extra in (("train", "train", {"translate": True}), ("test", "eval", {})):
            rows.append(
                bench_sampler(dataset, split, mode, args.batch_size, args.batches, compact=True, **extra)
            )
    stamp = utc_stamp()
    description = machine()
    for row in rows:
        row.update(date=stamp, machine=description)
    console.print(render_table(rows, COLUMNS[2:], title=f"bench_data - {description}"))
    if not args.no_save:
        append_rows(NAME, COLUMNS, rows)


if __name__ == "__main__":
    main()
