"""Fused residual add + RMSNorm without weight (TRM's post-norm): y = h / rms(h), h = x + residual.

Forward keeps each row in registers and saves only 1/rms per row; backward works from
the saved output y (the next layer's input, so kept alive anyway):
dh = rstd · (dy − y · mean(dy · y)), which is the gradient of both x and residual.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from etrm.kernels.triton_utils import as_rows, row_tile


@triton.jit
def _add_rms_norm_fwd(
    x_ptr,
    res_ptr,
    y_ptr,
    rstd_ptr,
    n_rows,
    n_cols,
    x_stride,
    res_stride,
    y_stride,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    x = tl.load(x_ptr + rows[:, None] * x_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    res = tl.load(res_ptr + rows[:, None] * res_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    h = x + res
    rstd = tl.math.rsqrt(tl.sum(h * h, axis=1) / n_cols + eps)
    y = h * rstd[:, None]
    tl.store(y_ptr + rows[:, None] * y_stride + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _add_rms_norm_bwd(
    dy_ptr,
    y_ptr,
    rstd_ptr,
    dh_ptr,
    n_rows,
    n_cols,
    dy_stride,
    y_stride,
    dh_stride,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    mask = row_ok[:, None] & (cols[None, :] < n_cols)
    dy = tl.load(dy_ptr + rows[:, None] * dy_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + rows[:, None] * y_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
    dot_mean = tl.sum(dy * y, axis=1) / n_cols
    dh = rstd[:, None] * (dy - y * dot_mean[:, None])
    tl.store(dh_ptr + rows[:, None] * dh_stride + cols[None, :], dh.to(dh_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_forward(
    x: torch.Tensor, residual: torch.Tensor, eps: float, tile: tuple[int, int] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (y in x's dtype and shape, rstd float32 per row). `tile`: see `row_tile`."""
    if x.shape != residual.shape:
        raise ValueError(
            f"add_rms_norm: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ in shape"
        )
    x_rows, res_rows = as_rows(x), as_rows(residual)
    n_rows, n_cols = x_rows.shape
    y = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_m, block_n, num_warps = row_tile(n_cols, tile)
    _add_rms_norm_fwd[(triton.cdiv(n_rows, block_m),)](
        x_rows,
        res_rows,
        y,
        rstd,
        n_rows,
        n_cols,
        x_rows.stride(0),
        res_rows.stride(0),
        y.stride(0),
        eps,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return y.view(x.shape), rstd


def add_rms_norm_backward(
    dy: torch.Tensor, y: torch.Tensor, rstd: torch.Tensor, tile: tuple[int, int] | None = None
) -> torch.Tensor:
    dy_rows, y_rows = as_rows(dy), as_rows(y)
    n_rows, n_cols = y_rows.shape
    dh = torch.empty((n_rows, n_cols), dtype=y.dtype, device=y.device)
    block_m, block_n, num_warps = row_tile(n_cols, tile)
    _add_rms_norm_bwd[(triton.cdiv(n_rows, block_m),)](
        dy_rows,
        y_rows,
        rstd,
        dh,
        n_rows,
        n_cols,
        dy_rows.stride(0),
        y_rows.stride(0),
        dh.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    return dh.view(y.shape)
