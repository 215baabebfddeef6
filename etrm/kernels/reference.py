"""Plain PyTorch definitions of every fused op: the function the Triton kernels must compute.

These run on CPU, in tests and whenever `ETRM_KERNELS=torch`; they are also the
references the kernel tests compare against (in float64).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without weight of x + residual, in float32 math, returned in x's dtype (TRM's post-norm)."""
    h = x.float() + residual.float() if x.dtype != torch.float64 else x + residual
    h = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    return h.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE. x: [B, S, H, D]; cos, sin: [S, D] (float32 tables); math in the tables' dtype."""
    dtype = x.dtype
    x = x.to(cos.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos.unsqueeze(-2) + rotated * sin.unsqueeze(-2)).to(dtype)


def cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) v over unmasked keys. q: [B,H,Lq,D]; k, v: [B,H,Lk,D]; key_mask: [B,Lk], True = attend.

    A query row whose keys are all masked returns zeros (and zero gradients), never NaN.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max)).detach()
    p = torch.exp(scores - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    p = p / torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.matmul(p, v.to(acc)).to(q.dtype)


def self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None):
    """Non-causal attention over [B,H,S,D]; attn_mask (bool, True = attend) must leave every row a key."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=False)
