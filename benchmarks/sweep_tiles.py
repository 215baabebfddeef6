"""Tile sweep for the row kernels: GPU time of each launch alone (no autograd, no Python op layer).

    python benchmarks/sweep_tiles.py [--batch 128] [--no-record]

For rotary (q sliced out of a fused qkv tensor, as the model calls it; 8 and 24 heads of 64) and
add_rms_norm forward and backward (hidden 512 and 1,536), times the kernel at tiles of 1K–16K
elements per tile and 4 or 8 warps, with rows = batch × 916 in bf16. Each row gives the bytes the
launch must move over its median time, as a fraction of the measured copy bandwidth; the
default tile (the one the model uses) is marked. Needs a CUDA GPU; rows go to
benchmarks/results/sweep_tiles.csv.
"""

from __future__ import annotations

import argparse

import torch
from results import append_rows, machine, utc_stamp  # benchmarks/results.py
from rich.console import Console
from rich.table import Table

NAME = "sweep_tiles"  # rows in benchmarks/results/sweep_tiles.csv
TOKENS = 916
TILES = [(elements, warps) for elements in (1024, 2048, 4096, 8192, 16384) for warps in (4, 8)]


def copy_bandwidth() -> float:
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / do_bench(lambda: dst.copy_(src), quantiles=[0.5]) / 1e6


def launches(batch: int, device: str = "cuda") -> list[tuple[str, str, int, object]]:
    """(kernel, size, bytes moved, fn(tile)) for every launch swept."""
    from etrm.kernels import rms_norm_triton, rotary_triton
    from etrm.models.layers import RotaryEmbedding

    out = []
    for hidden in (512, 1536):
        heads = hidden // 64
        qkv = torch.randn(batch, TOKENS, 3 * heads, 64, device=device, dtype=torch.bfloat16)
        q = qkv[:, :, :heads]
        cos, sin = (t.to(device) for t in RotaryEmbedding(64, TOKENS, 10000.0)())
        n_bytes = 2 * q.numel() * q.element_size()
        for backward in (False, True):
            out.append(
                (
                    f"rotary {'bwd' if backward else 'fwd'}",
                    f"{batch}×{TOKENS}×{heads}×64 (q of qkv)",
                    n_bytes,
                    lambda tile, q=q, cos=cos, sin=sin, b=backward: rotary_triton.rotary_launch(
                        q, cos, sin, b, tile
                    ),
                )
            )
        x = torch.randn(batch * TOKENS, hidden, device=device, dtype=torch.bfloat16)
        r = torch.randn_like(x)
        y, rstd = rms_norm_triton.add_rms_norm_forward(x, r, 1e-5)
        n_bytes = 3 * x.numel() * x.element_size()
        size = f"{batch}×{TOKENS}×{hidden}"
        out.append(
            (
                "add_rms_norm fwd",
                size,
                n_bytes,
                lambda tile, x=x, r=r: rms_norm_triton.add_rms_norm_forward(x, r, 1e-5, tile),
            )
        )
        out.append(
            (
                "add_rms_norm bwd",
                size,
                n_bytes,
                lambda tile, x=x, y=y, rstd=rstd: rms_norm_triton.add_rms_norm_backward(x, y, rstd, tile),
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("sweep_tiles needs a CUDA GPU: tile timings mean nothing in Triton's interpreter")
    from triton.testing import do_bench

    copy = copy_bandwidth()
    print(f"copy bandwidth {copy:.0f} GB/s", flush=True)
    rows = []
    for kernel, size, n_bytes, fn in launches(args.batch):
        results = []
        for tile in [None, *TILES]:
            try:
                ms = do_bench(lambda fn=fn, tile=tile: fn(tile), quantiles=[0.5])
            except Exception as exc:  # a tile that does not compile (registers, shared memory)
                print(f"{kernel} {size} {tile}: failed {type(exc).__name__}", flush=True)
                continue
            results.append((ms, tile))
        best_ms = min(ms for ms, _ in results)
        for ms, tile in results:
            gbps = n_bytes / ms / 1e6
            row = {
                "kernel": kernel,
                "size": size,
                "tile": "default" if tile is None else f"{tile[0]} el, {tile[1]} warps",
                "ms": f"{ms:.4f}",
                "value": f"{gbps:.0f} GB/s ({gbps / copy:.0%} of copy)" + (" best" if ms == best_ms else ""),
            }
            print(" | ".join(row.values()), flush=True)
            rows.append(row)
    table = Table(title=f"sweep_tiles on {machine()}")
    for column in ("kernel", "size", "tile", "ms", "value"):
        table.add_column(column)
    for row in rows:
        table.add_row(*row.values())
    Console(width=200).print(table)
    if not args.no_record:
        stamp, description = utc_stamp(), machine()
        for row in rows:
            row.update(date=stamp, machine=description)
        append_rows(NAME, ["date", "machine", "kernel", "size", "tile", "ms", "value"], rows)


if __name__ == "__main__":
    main()
