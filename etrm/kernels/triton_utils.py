"""Launcher helpers shared by the Triton ops: row views, tile sizes, interpreter detection."""

from __future__ import annotations

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1 at import).

    The interpreter's cost is per program, so launchers then pick one large pinned tile.
    """
    return bool(triton.knobs.runtime.interpret)


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., N] as a 2-D [rows, N] view with unit column stride (a copy only when no such view exists)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def row_tile(n_cols: int, tile: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N columns, num_warps) for a kernel that keeps whole rows in registers.

    `tile` = (elements per tile, num_warps) overrides the default (benchmarks/sweep_tiles.py).
    """
    block_n = triton.next_power_of_2(n_cols)
    budget, max_rows = (16384, 1024) if interpreting() else (4096, 64)
    if tile:
        budget, max_rows = tile[0], 1024
    block_m = max(1, min(max_rows, budget // block_n))
    num_warps = tile[1] if tile else 4 if block_m * block_n <= 4096 else 8
    return block_m, block_n, num_warps
