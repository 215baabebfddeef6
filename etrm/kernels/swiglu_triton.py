"""Fused SwiGLU: y = silu(gate) · up, float32 math, output in gate's dtype.

gate and up are usually the two halves of one projection, so the kernels take row
strides and read them in place; backward recomputes the sigmoid instead of saving it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from etrm.kernels.triton_utils import as_rows, row_tile


@triton.jit
def _swiglu_fwd(
    gate_ptr,
    up_ptr,
    y_ptr,
    n_rows,
    n_cols,
    gate_stride,
    up_stride,
    y_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    gate = tl.load(gate_ptr + rows[:, None] * gate_stride + cols[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    up = tl.load(up_ptr + rows[:, None] * up_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = gate * tl.sigmoid(gate) * up
    tl.store(y_ptr + rows[:, None] * y_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(
    dy_ptr,
    gate_ptr,
    up_ptr,
    dgate_ptr,
    dup_ptr,
    n_rows,
    n_cols,
    dy_stride,
    gate_stride,
    up_stride,
    d_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    dy = tl.load(dy_ptr + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + rows[:, None] * gate_stride + cols[None, :], mask=mask, other=0.0).to(
        tl.float32
    )
    up = tl.load(up_ptr + rows[:, None] * up_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    dgate = dy * up * sig * (1.0 + gate * (1.0 - sig))
    offsets = rows[:, None] * d_stride + cols[None, :]
    tl.store(dgate_ptr + offsets, dgate.to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offsets, (dy * silu).to(dup_ptr.dtype.element_ty), mask=mask)


def _grid_and_tile(n_rows: int, n_cols: int):
    """Column blocks of at most 1,024 that tile the width exactly when they can.

    TRM's widths are multiples of 256: 1,536 → 3 × 512, not 2 × 1,024 with half a block idle.
    """
    power_of_two_factor = n_cols & -n_cols
    block_cols = power_of_two_factor if power_of_two_factor >= 256 else n_cols
    block_m, block_n, num_warps = row_tile(min(block_cols, 1024))
    return (triton.cdiv(n_rows, block_m), triton.cdiv(n_cols, block_n)), block_m, block_n, num_warps


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    gate_rows, up_rows = as_rows(gate), as_rows(up)
    n_rows, n_cols = gate_rows.shape
    y = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    grid, block_m, block_n, num_warps = _grid_and_tile(n_rows, n_cols)
    _swiglu_fwd[grid](
        gate_rows,
        up_rows,
        y,
        n_rows,
        n_cols,
        gate_rows.stride(0),
        up_rows.stride(0),
        y.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y.view(gate.shape)


def swiglu_backward(
    dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    dy_rows, gate_rows, up_rows = as_rows(dy), as_rows(gate), as_rows(up)
    n_rows, n_cols = gate_rows.shape
    dgate = torch.empty((n_rows, n_cols), dtype=gate.dtype, device=gate.device)
    dup = torch.empty((n_rows, n_cols), dtype=up.dtype, device=up.device)
    grid, block_m, block_n, num_warps = _grid_and_tile(n_rows, n_cols)
    _swiglu_bwd[grid](
        dy_rows,
        gate_rows,
        up_rows,
        dgate,
        dup,
        n_rows,
        n_cols,
        dy_rows.stride(0),
        gate_rows.stride(0),
        up_rows.stride(0),
        dgate.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return dgate.view(gate.shape), dup.view(up.shape)
