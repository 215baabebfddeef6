"""Evaluation speed: re-voting 400 puzzles × 1000 augmentations from predictions.npz, and inference throughput.

    python benchmarks/bench_eval.py [--puzzles 400] [--augs 1000] [--skip-inference]

Voting: a synthetic predictions.npz shaped like an ARC-AGI-1 evaluation (a few
queries have two test pairs; each query's augmentations agree on a handful of grids
and scatter over many distinct wrong ones) is loaded, voted, scored and turned into
results.json and submissions — the work of `etrm eval --from-predictions`.
Inference: `evaluate` of a `cpu-smoke` model on a synthetic few-shot dataset,
counted in (query, augmentation) pairs per second.
SF2 row-steps (`--sf2`): one ACT step of one (query, augmentation) row of the SF2 model on
ARC-AGI-1's evaluation puzzles (decoder and re-encoded demos), timed at `--batch` rows
(8 on a CPU, one thread; bf16 and optionally `--compile` on a GPU). Model FLOPs utilisation
divides the FLOPs counted from the architecture by the measured matmul peak (fp32 on a CPU,
bf16 on a GPU); the time of a full ARC-AGI-1 vote per evaluation point (419 queries × 912
augmentations × 16 ACT steps) is projected on 1 and 4 GPUs from a GPU figure.
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


FULL_VOTE = (419, 912, 16)  # ARC-AGI-1 evaluation queries, stored augmentations, ACT steps


def block_flops(block, tokens: np.ndarray, width: int) -> np.ndarray:
    """FLOPs of one post-norm block over sequences of `tokens` tokens: every linear layer's
    multiply-adds per token, plus attention's scores and weighted sum (non-causal, 4·S·width per token)."""
    weights = sum(m.weight.numel() for m in block.modules() if hasattr(m, "weight") and m.weight.ndim == 2)
    tokens = np.asarray(tokens, dtype=np.float64)
    return tokens * (2.0 * weights + 4.0 * tokens * width)


def decoder_flops(model) -> float:
    """FLOPs of one ACT step of one row in the decoder: H_cycles × (L_cycles + 1) passes of the
    L_layers blocks over the prefix and the canvas, then the LM head."""
    arch, decoder = model.arch, model.decoder
    tokens = arch.seq_len + arch.puzzle_emb_len
    passes = arch.H_cycles * (arch.L_cycles + 1)
    per_pass = sum(float(block_flops(b, tokens, arch.hidden_size)) for b in decoder.L_level.layers)
    return passes * per_pass + 2.0 * tokens * arch.hidden_size * arch.vocab_size


def encoder_flops(model, batch) -> np.ndarray:
    """FLOPs per row of encoding its demos (done at every ACT step with arch.encoder_reencode): the
    grid encoder over each present demo's cells plus a summary token, then the hybrid encoders'
    cross-attention pool of context_len queries over all of a row's demo states."""
    from etrm.data.encoding import PAD_TOKEN

    encoder, arch = model.encoder, model.arch
    width = encoder.width
    mask = batch["demo_mask"].numpy().astype(bool)
    cells = (batch["demo_inputs"].numpy() != PAD_TOKEN).sum(-1) + (
        batch["demo_outputs"].numpy() != PAD_TOKEN
    ).sum(-1)
    lengths = np.where(mask, cells + 1, 0)  # [B, D]
    grid = sum(block_flops(layer, lengths, width) for layer in encoder.grid_encoder.layers).sum(axis=1)
    pool = getattr(encoder, "set_pool", None)
    if pool is None:
        return grid
    states = lengths.sum(axis=1).astype(np.float64)
    queries = arch.context_len
    kv = 2.0 * states * pool.kv_proj.weight.numel()
    attention = 4.0 * queries * states * width
    per_query = sum(
        m.weight.numel() for m in (pool.q_proj, pool.o_proj, pool.mlp.gate_up_proj, pool.mlp.down_proj)
    )
    return grid + kv + attention + 2.0 * queries * per_query


def matmul_peak(device, seconds: float = 2.0) -> tuple[float, str]:
    """Measured dense matmul FLOP/s: fp32 on a CPU, bf16 on a GPU (the dtypes inference runs in)."""
    import torch

    dtype, n = (torch.bfloat16, 8192) if device.type == "cuda" else (torch.float32, 1024)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    reps, elapsed = 0, 0.0
    torch.mm(a, b)
    while elapsed < seconds:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed += time.perf_counter() - start
        reps += 5
    return 2.0 * n**3 * reps / elapsed, f"{str(dtype).removeprefix('torch.')} {n}×{n} matmul"


def bench_sf2_row_steps(batch_size: int, compile: bool) -> list[dict]:
    """Row-steps/s of the SF2 model (untrained) on ARC-AGI-1's evaluation puzzles, its MFU, and the
    projected time of a full vote per evaluation point."""
    import torch

    from etrm.config import get_preset
    from etrm.data.build import BuildOptions, build_dataset
    from etrm.data.dataset import ArcDataset
    from etrm.data.episodes import EpisodeSampler, to_device
    from etrm.models import build_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = get_preset("SF2")
    torch.manual_seed(0)
    model = build_model(cfg.arch).to(device).eval()
    step = torch.compile(model) if compile else model
    with tempfile.TemporaryDirectory() as tmp:
        options = BuildOptions(["arc-agi-1-train"], ["arc-agi-1-eval"], Path(tmp) / "ds", num_aug=8)
        build_dataset(options)
        split = ArcDataset.open(options.out).split("test")
    kwargs = dict(mode="eval", max_demos=cfg.data.max_demos, compact=True)
    # Mean FLOPs per row-step over every evaluation query (augmentations do not change a demo's cells).
    every_query = [b for b in EpisodeSampler(split, 256, num_aug=1, **kwargs)]
    valid = np.concatenate([b["valid"].numpy() for b in every_query])
    split_encoder = np.concatenate([encoder_flops(model, b) for b in every_query])[valid]
    decoder = decoder_flops(model)
    mean_row_step = decoder + float(split_encoder.mean())

    batch = next(iter(EpisodeSampler(split, batch_size, **kwargs)))  # the first query's augmentations
    row_flops = decoder + float(encoder_flops(model, batch).mean())
    on_device = to_device(batch, device)

    def one_act_step(b):
        with torch.inference_mode():
            carry = model.initial_carry(b)
            step(carry, b)
        if device.type == "cuda":
            torch.cuda.synchronize()

    one_act_step({k: v[:1] for k, v in on_device.items()} if device.type == "cpu" else on_device)  # warm-up
    steps = 1 if device.type == "cpu" else 10
    start = time.perf_counter()
    for _ in range(steps):
        one_act_step(on_device)
    seconds = time.perf_counter() - start
    row_steps_per_s = steps * batch_size / seconds
    peak, peak_label = matmul_peak(device)
    mfu = row_steps_per_s * row_flops / peak
    name = "GPU" if device.type == "cuda" else "CPU"
    label = (
        f"SF2 (hybrid_standard, hidden {cfg.arch.hidden_size}, H{cfg.arch.H_cycles}×L{cfg.arch.L_cycles}, "
        f"encoder re-encoded), batch {batch_size}, {'compiled, ' if compile else ''}{torch.get_num_threads()} "
        f"thread(s)"
    )
    rows = [
        {
            "benchmark": f"inference: SF2 row-steps/s ({name})",
            "size": label,
            "value": f"{row_steps_per_s:.3g}/s",
        },
        {
            "benchmark": "inference: FLOPs per row-step (architecture)",
            "size": "this batch: decoder + encoder; ARC-AGI-1 eval mean",
            "value": f"{decoder / 1e9:.0f} + {(row_flops - decoder) / 1e9:.0f} GFLOP; "
            f"mean {mean_row_step / 1e9:.0f} GFLOP",
        },
        {
            "benchmark": f"inference: MFU ({name})",
            "size": f"peak {peak / 1e12:.3g} TFLOP/s measured ({peak_label})",
            "value": f"{mfu:.1%}",
        },
    ]
    queries, augs, act_steps = FULL_VOTE
    total = queries * augs * act_steps * mean_row_step
    inputs = (
        f"{queries} queries × {augs} augs × {act_steps} ACT steps = {queries * augs * act_steps:,} row-steps × "
        f"{mean_row_step / 1e9:.0f} GFLOP = {total / 1e18:.2f} EFLOP per evaluation point"
    )
    if device.type == "cuda":
        hours = [total / (gpus * mfu * peak) / 3600 for gpus in (1, 4)]
        value = f"{hours[0]:.2f} h on 1 GPU, {hours[1]:.2f} h on 4"
    else:
        value = "needs a GPU figure: hours = EFLOP / (GPUs × MFU × bf16 peak) / 3600"
    rows.append({"benchmark": "projected full ARC-AGI-1 vote", "size": inputs, "value": value})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--puzzles", type=int, default=400)
    parser.add_argument("--augs", type=int, default=1000)
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument(
        "--sf2", action="store_true", help="Time SF2 row-steps alone (MFU, full-vote projection)."
    )
    parser.add_argument(
        "--batch", type=int, default=0, help="SF2 rows per step (default 8 on a CPU, 256 on a GPU)."
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the SF2 ACT step (GPU).")
    parser.add_argument("--no-save", action="store_true", help="Do not append to RESULTS.md.")
    args = parser.parse_args()
    if args.sf2:
        import torch

        rows = bench_sf2_row_steps(args.batch or (256 if torch.cuda.is_available() else 8), args.compile)
    else:
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
    if not args.no_save:
        append_rows(NAME, ["date", "machine", "benchmark", "size", "value"], rows)


if __name__ == "__main__":
    main()
