"""Fused rotate-half rotary position encoding for x [B, S, H, D] with cos/sin tables [S, D].

out = x·cos + rotate_half(x)·sin, rotate_half(x) = (−x₂, x₁). Its adjoint swaps the
roles of the two sine halves and their signs, so one kernel serves forward and backward.
x may be a strided view (q or k split out of a fused qkv projection); the result is contiguous.

A program takes a block of positions with all their heads, a [positions, heads, D/2] tile per
half, so each position's cos/sin rows are read once and shared by its heads. (A first version
tiled (position, head) rows and read the tables once per head: four float32 table tiles per
bf16 tile of x, and less of the copy bandwidth; the figures are in benchmarks/RESULTS.md.)
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from etrm.kernels.triton_utils import interpreting


@triton.jit
def _rotary(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    n_positions,
    seq_len,
    n_heads,
    half,
    stride_b,
    stride_s,
    stride_h,
    table_stride,
    BACKWARD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    positions = tl.program_id(0).to(tl.int64) * BLOCK_S + tl.arange(0, BLOCK_S)  # flat b·S + s
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    pos = positions % seq_len
    batch = positions // seq_len
    pos_ok = positions < n_positions
    table_mask = pos_ok[:, None] & (cols[None, :] < half)  # [S, HALF]
    table_lo = pos[:, None] * table_stride + cols[None, :]
    cos_lo = tl.load(cos_ptr + table_lo, mask=table_mask, other=0.0)[:, None, :]
    cos_hi = tl.load(cos_ptr + table_lo + half, mask=table_mask, other=0.0)[:, None, :]
    sin_lo = tl.load(sin_ptr + table_lo, mask=table_mask, other=0.0)[:, None, :]
    sin_hi = tl.load(sin_ptr + table_lo + half, mask=table_mask, other=0.0)[:, None, :]
    if BACKWARD:
        sin_lo, sin_hi = -sin_hi, -sin_lo

    mask = table_mask[:, None, :] & (heads < n_heads)[None, :, None]  # [S, H, HALF]
    x_row = batch * stride_b + pos * stride_s
    x_lo_ptrs = x_ptr + x_row[:, None, None] + (heads * stride_h)[None, :, None] + cols[None, None, :]
    x_lo = tl.load(x_lo_ptrs, mask=mask, other=0.0).to(tl.float32)
    x_hi = tl.load(x_lo_ptrs + half, mask=mask, other=0.0).to(tl.float32)
    out_lo = x_lo * cos_lo - x_hi * sin_lo
    out_hi = x_hi * cos_hi + x_lo * sin_hi
    out_row = positions * (n_heads * 2 * half)
    out_lo_ptrs = out_ptr + out_row[:, None, None] + (heads * (2 * half))[None, :, None] + cols[None, None, :]
    tl.store(out_lo_ptrs, out_lo.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out_lo_ptrs + half, out_hi.to(out_ptr.dtype.element_ty), mask=mask)


def check_shapes(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[-1] % 2:
        raise ValueError(f"apply_rotary: x must be [B, S, H, D] with even D, got {tuple(x.shape)}")
    _, seq_len, _, head_dim = x.shape
    if cos.shape != (seq_len, head_dim) or sin.shape != (seq_len, head_dim):
        raise ValueError(
            f"apply_rotary: cos/sin must be [{seq_len}, {head_dim}], got {tuple(cos.shape)} / {tuple(sin.shape)}"
        )


def rotary_tile(n_heads: int, half: int, tile: tuple[int, int] | None = None) -> tuple[int, int, int, int]:
    """(BLOCK_S positions, BLOCK_H heads, BLOCK_HALF columns, num_warps) for about a tile's elements per half.

    GPU default: 1,024 elements over 8 warps, the tile with the best worst case over head counts in
    benchmarks/sweep_tiles.py (its rows in benchmarks/RESULTS.md). The interpreter, whose cost is
    per program, takes 16,384 over 4. `tile` = (elements, num_warps) overrides both (for the sweep).
    """
    block_h, block_half = triton.next_power_of_2(n_heads), triton.next_power_of_2(half)
    elements, num_warps = tile or ((16384, 4) if interpreting() else (1024, 8))
    return max(1, elements // (block_h * block_half)), block_h, block_half, num_warps


def rotary_launch(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    backward: bool,
    tile: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Rotates x (or, with backward=True, applies the transpose of the rotation to a gradient).

    `tile` = (elements per half-tile, num_warps) overrides the default tile (benchmarks/sweep_tiles.py).
    """
    check_shapes(x, cos, sin)
    batch, seq_len, n_heads, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_positions = batch * seq_len
    block_s, block_h, block_half, num_warps = rotary_tile(n_heads, head_dim // 2, tile)
    _rotary[(triton.cdiv(n_positions, block_s),)](
        x,
        cos,
        sin,
        out,
        n_positions,
        seq_len,
        n_heads,
        head_dim // 2,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        cos.stride(0),
        BACKWARD=backward,
        BLOCK_S=block_s,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        num_warps=num_warps,
    )
    return out
