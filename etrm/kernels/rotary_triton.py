"""Fused rotate-half rotary position encoding for x [B, S, H, D] with cos/sin tables [S, D].

out = x·cos + rotate_half(x)·sin, rotate_half(x) = (−x₂, x₁). Its adjoint swaps the
roles of the two sine halves and their signs, so one kernel serves forward and backward.
x may be a strided view (q or k split out of a fused qkv projection); the result is contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from etrm.kernels.triton_utils import row_tile


@triton.jit
def _rotary(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    n_rows,
    seq_len,
    n_heads,
    half,
    stride_b,
    stride_s,
    stride_h,
    table_stride,
    BACKWARD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_HALF)
    head = rows % n_heads
    pos = (rows // n_heads) % seq_len
    batch = rows // (n_heads * seq_len)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < half)
    x_lo_ptrs = x_ptr + (batch * stride_b + pos * stride_s + head * stride_h)[:, None] + cols[None, :]
    x_lo = tl.load(x_lo_ptrs, mask=mask, other=0.0).to(tl.float32)
    x_hi = tl.load(x_lo_ptrs + half, mask=mask, other=0.0).to(tl.float32)
    table_lo = pos[:, None] * table_stride + cols[None, :]
    cos_lo = tl.load(cos_ptr + table_lo, mask=mask, other=0.0)
    cos_hi = tl.load(cos_ptr + table_lo + half, mask=mask, other=0.0)
    sin_lo = tl.load(sin_ptr + table_lo, mask=mask, other=0.0)
    sin_hi = tl.load(sin_ptr + table_lo + half, mask=mask, other=0.0)
    if BACKWARD:
        sin_lo, sin_hi = -sin_hi, -sin_lo
    out_lo = x_lo * cos_lo - x_hi * sin_lo
    out_hi = x_hi * cos_hi + x_lo * sin_hi
    out_lo_ptrs = out_ptr + rows[:, None] * (2 * half) + cols[None, :]
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


def rotary_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Rotates x (or, with backward=True, applies the transpose of the rotation to a gradient)."""
    check_shapes(x, cos, sin)
    batch, seq_len, n_heads, head_dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    n_rows = batch * seq_len * n_heads
    block_m, block_half, num_warps = row_tile(head_dim // 2)
    _rotary[(triton.cdiv(n_rows, block_m),)](
        x,
        cos,
        sin,
        out,
        n_rows,
        seq_len,
        n_heads,
        head_dim // 2,
        x.stride(0),
        x.stride(1),
        x.stride(2),
        cos.stride(0),
        BACKWARD=backward,
        BLOCK_M=block_m,
        BLOCK_HALF=block_half,
        num_warps=num_warps,
    )
    return out
