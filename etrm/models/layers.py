"""TRM's building blocks: weight-free post-norm blocks, rotate-half RoPE, SwiGLU, casted linears.

Parameter names match the reference TRM so that its checkpoints load by key.
Every op that has a fused kernel goes through `etrm.kernels`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from etrm import kernels

# std of a standard normal truncated to [-2, 2]; dividing by it makes the truncated std exact (JAX-style).
_TRUNC2_STD = math.sqrt(
    1.0 - 4.0 * math.exp(-2.0) / math.sqrt(2.0 * math.pi) / math.erf(2.0 / math.sqrt(2.0))
)


def trunc_normal_init_(tensor: torch.Tensor, std: float = 1.0) -> torch.Tensor:
    """Normal cut at ±2σ, rescaled so the std of the result is exactly `std` (TRM's init)."""
    with torch.no_grad():
        if std == 0:
            return tensor.zero_()
        nn.init.trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0)
        return tensor.mul_(std / _TRUNC2_STD)


def swiglu_inner_size(hidden_size: int, expansion: float) -> int:
    """round(expansion·hidden·2/3), rounded up to a multiple of 256 (TRM's rule)."""
    inner = round(expansion * hidden_size * 2 / 3)
    return -(-inner // 256) * 256


class CastedLinear(nn.Module):
    """Linear layer kept in float32, cast to the activation dtype on use; truncated-normal 1/sqrt(fan_in)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(
            trunc_normal_init_(torch.empty(out_features, in_features), 1.0 / math.sqrt(in_features))
        )
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class CastedEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int, init_std: float, cast_to: torch.dtype = torch.float32):
        super().__init__()
        self.cast_to = cast_to
        self.embedding_weight = nn.Parameter(trunc_normal_init_(torch.empty(num_embeddings, dim), init_std))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.embedding_weight.to(self.cast_to))


class RotaryEmbedding(nn.Module):
    """cos/sin tables [positions, head_dim], float32, frequencies duplicated over the two halves."""

    def __init__(self, head_dim: int, max_positions: int, base: float):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos_cached, self.sin_cached


class Attention(nn.Module):
    """Non-causal multi-head self-attention, fused qkv projection (all q heads, then k, then v), no biases."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.qkv_proj = CastedLinear(hidden_size, 3 * hidden_size, bias=False)
        self.o_proj = CastedLinear(hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos_sin=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, hidden]; cos_sin: tables for S positions or None (no RoPE); attn_mask: [B,1,1,S] bool."""
        b, s, _ = x.shape
        qkv = self.qkv_proj(x).view(b, s, 3 * self.num_heads, self.head_dim)
        q, k, v = qkv.split(self.num_heads, dim=2)
        if cos_sin is not None:
            cos, sin = cos_sin
            q = kernels.apply_rotary(q, cos, sin)
            k = kernels.apply_rotary(k, cos, sin)
        out = kernels.self_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, expansion: float):
        super().__init__()
        inner = swiglu_inner_size(hidden_size, expansion)
        self.gate_up_proj = CastedLinear(hidden_size, 2 * inner, bias=False)
        self.down_proj = CastedLinear(inner, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(kernels.swiglu(gate, up))


class PostNormBlock(nn.Module):
    """h ← norm(h + attn(h)); h ← norm(h + mlp(h)). RMSNorm has no weight."""

    def __init__(self, hidden_size: int, num_heads: int, expansion: float, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.self_attn = Attention(hidden_size, num_heads)
        self.mlp = SwiGLU(hidden_size, expansion)

    def forward(self, h: torch.Tensor, cos_sin=None, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = kernels.add_rms_norm(self.self_attn(h, cos_sin, attn_mask), h, self.eps)
        return kernels.add_rms_norm(self.mlp(h), h, self.eps)
