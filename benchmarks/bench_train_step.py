"""Training-step speed: seconds per optimizer step (forward, loss, backward, optimizer) and samples/s.

    python benchmarks/bench_train_step.py [--parts trm,encoders,smoke,full] [--steps 2] [--device cpu]

- trm: the ARC-size TRM (puzzle-id context, hidden 512, 8 heads, 2 layers) in float32, at the
  two settings the reference TRM code was timed at on this kind of machine with 2 threads:
  batch 1 with H_cycles 3 / L_cycles 6 (about 4.1 s per step) and batch 8 with H3 / L4, the ARC
  recipe (about 25 s per step).
- encoders: each encoder type at its semi-final size, reduced batch: the encoder's share of a step
  (its forward + backward timed alone, over the whole step).
- smoke / full: samples/s of each semi-final preset at `cpu-smoke` size (its batch of 4) and at
  full size with batch 8. Presets that differ only in exploration cost the same per step.

A step is one ACT step for every row (TRM's training step) on synthetic episodes with ARC-like
grids (3–30 cells a side, 3 demos). On CPU each row also gives CPU time ÷ threads, which estimates
the wall time of an idle machine when the machine is shared. Rows are appended to
benchmarks/results/bench_train_step.csv.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from results import append_rows, machine, utc_stamp  # benchmarks/results.py
from rich.console import Console
from rich.table import Table

from etrm.config import RunConfig, apply_overrides, get_preset
from etrm.data.encoding import IGNORE_LABEL_ID, encode_grid

NAME = "bench_train_step"  # rows in benchmarks/results/bench_train_step.csv
ARC_TRM = ["data.max_demos=10", "arch.num_puzzle_identifiers=1000"]


def synthetic_batch(cfg: RunConfig, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Episodes with random ARC-sized grids: 3 demos present (ARC's average) of max_demos slots."""
    rng = np.random.default_rng(seed)
    slots = cfg.data.max_demos
    num_demos = min(3, slots)

    def grid():
        h, w = rng.integers(3, 31, size=2)
        return encode_grid(rng.integers(0, 10, size=(h, w)))

    demo_inputs = np.zeros((batch_size, slots, 900), np.int64)
    demo_outputs = np.zeros((batch_size, slots, 900), np.int64)
    for b in range(batch_size):
        for d in range(num_demos):
            demo_inputs[b, d], demo_outputs[b, d] = grid(), grid()
    labels = np.stack([grid() for _ in range(batch_size)]).astype(np.int64)
    labels[labels == 0] = IGNORE_LABEL_ID
    mask = np.zeros((batch_size, slots), bool)
    mask[:, :num_demos] = True
    n = max(cfg.arch.num_puzzle_identifiers, 1)
    return {
        "inputs": torch.from_numpy(np.stack([grid() for _ in range(batch_size)]).astype(np.int64)),
        "labels": torch.from_numpy(labels),
        "demo_inputs": torch.from_numpy(demo_inputs),
        "demo_outputs": torch.from_numpy(demo_outputs),
        "demo_mask": torch.from_numpy(mask),
        "puzzle_identifiers": torch.from_numpy(
            rng.integers(1, n, size=batch_size) if n > 1 else np.zeros(batch_size, int)
        ),
        "group_ids": torch.zeros(batch_size, dtype=torch.long),
        "aug_ids": torch.zeros(batch_size, dtype=torch.long),
        "query_ids": torch.zeros(batch_size, dtype=torch.long),
        "valid": torch.ones(batch_size, dtype=torch.bool),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(
    cfg: RunConfig, batch_size: int, steps: int, device: torch.device, warmup: int
) -> dict[str, float]:
    """Mean seconds per training step (after `warmup` steps), and the encoder's forward+backward alone."""
    from etrm.models import build_model
    from etrm.models.losses import ACTLossHead
    from etrm.train.optim import build_optimizer

    torch.manual_seed(0)
    model = build_model(cfg.arch).to(device).train()
    head = ACTLossHead(model)
    optimizer = build_optimizer(model, cfg.train)
    batch = {k: v.to(device) for k, v in synthetic_batch(cfg, batch_size).items()}
    carry = head.initial_carry(batch)
    sparse = model.encoder if hasattr(model.encoder, "take_sparse_grads") else None

    def step():
        nonlocal carry
        carry, loss, _, _, _ = head(carry, batch)
        (loss / batch_size).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if sparse is not None:
            taken = sparse.take_sparse_grads()
            if taken is not None:
                sparse.sign_sgd_step(
                    *taken, lr=cfg.train.puzzle_emb_lr, weight_decay=cfg.train.puzzle_emb_weight_decay
                )

    for _ in range(warmup):
        step()
    sync(device)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    sync(device)
    result = {
        "step_s": (time.perf_counter() - start) / steps,
        # CPU seconds over the threads in use: the wall time an idle machine would show (shared machines).
        "step_cpu_s": (time.process_time() - cpu_start) / steps / torch.get_num_threads(),
    }

    if list(model.encoder.parameters()):
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device.type == "cuda"
            else torch.autocast("cpu", enabled=False)
        )

        def encode():
            with autocast:
                encoded = model.encoder(batch)
            loss = encoded.slots.float().square().sum() + (encoded.kl.sum() if encoded.kl is not None else 0)
            if encoded.cells is not None:
                loss = loss + encoded.cells.float().square().sum()
            loss.backward()
            model.zero_grad(set_to_none=True)

        for _ in range(warmup):
            encode()
        sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            encode()
        sync(device)
        result["encoder_s"] = (time.perf_counter() - start) / steps
        result["encoder_cpu_s"] = (time.process_time() - cpu_start) / steps / torch.get_num_threads()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="trm,encoders,smoke,full")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them (0 is fine on CPU)")
    parser.add_argument(
        "--encoder-batch", type=int, default=2, help="the reduced batch of the encoder-share rows"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--no-record", action="store_true", help="print only; do not append to benchmarks/results/"
    )
    args = parser.parse_args()
    os.environ.setdefault("ETRM_KERNELS", "auto")
    device = torch.device(args.device)
    parts = set(args.parts.split(","))
    rows: list[dict] = []

    def add(benchmark: str, size: str, value: str, reference: str = "") -> None:
        rows.append({"benchmark": benchmark, "size": size, "value": value, "reference": reference})
        console.print(f"{benchmark} | {size} | {value} {reference}")

    console = Console()
    if "trm" in parts:
        for batch, h, l_cycles, ref in [(1, 3, 6, 4.1), (8, 3, 4, 25.0)]:
            cfg = apply_overrides(
                get_preset("trm"), [*ARC_TRM, f"arch.H_cycles={h}", f"arch.L_cycles={l_cycles}"]
            )
            cfg.arch.forward_dtype = "float32"
            t = time_steps(cfg, batch, args.steps, device, args.warmup)
            add(
                "TRM step (fwd+loss+bwd+AdamATan2), float32",
                f"ARC size, batch {batch}, H{h}×L{l_cycles}",
                f"{t['step_s']:.2f} s/step wall, {t['step_cpu_s']:.2f} s/step CPU-time/threads",
                f"reference TRM code: {ref} s/step (2 threads)",
            )
    if "encoders" in parts:
        for preset in ("SF5", "SF1", "SF3", "E2b"):
            cfg = get_preset(preset)
            t = time_steps(cfg, args.encoder_batch, args.steps, device, args.warmup)
            a = cfg.arch
            # On a CPU the share is taken from CPU time, which other processes on the machine disturb less.
            enc, full = (
                (t["encoder_s"], t["step_s"])
                if device.type == "cuda"
                else (t["encoder_cpu_s"], t["step_cpu_s"])
            )
            add(
                "encoder share of a step (encoder fwd+bwd / step)",
                f"{a.encoder_type} ({a.encoder_num_layers} layers, {preset} size), batch {args.encoder_batch}",
                f"{100 * enc / full:.0f}% ({enc:.2f} of {full:.2f} s)",
            )
    for size, batch_override, part in [("cpu-smoke", None, "smoke"), ("full", 8, "full")]:
        if part not in parts:
            continue
        for presets in (("SF1", "SF2"), ("SF3", "SF4"), ("SF5", "SF6")):
            cfg = get_preset(presets[0], size=size)
            batch = batch_override or cfg.train.global_batch_size
            t = time_steps(cfg, batch, args.steps, device, args.warmup)
            add(
                "samples/s (ACT steps of one row per second)",
                f"{' = '.join(presets)} ({cfg.arch.encoder_type}) at {size} size, batch {batch}",
                f"{batch / t['step_s']:.2f} samples/s wall ({t['step_s']:.2f} s/step); "
                f"{batch / t['step_cpu_s']:.2f} by CPU-time/threads",
            )

    table = Table(title=f"bench_train_step on {machine(device)}")
    for column in ("benchmark", "size", "value", "reference"):
        table.add_column(column, overflow="fold")
    for r in rows:
        table.add_row(r["benchmark"], r["size"], r["value"], r["reference"])
    console.print(table)
    if not args.no_record and rows:
        stamp, description = utc_stamp(), machine(device)
        for row in rows:
            row.update(date=stamp, machine=description)
        append_rows(NAME, ["date", "machine", "benchmark", "size", "value", "reference"], rows)


if __name__ == "__main__":
    main()
