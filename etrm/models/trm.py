"""TRM's recursive decoder (the reference's "inner" model), computing the reference's function exactly.

One shared stack of post-norm blocks updates two latents over the prefix + grid
sequence: z_L ("z", the reasoning state) and z_H ("y", the answer state). The
prefix holds `puzzle_emb_len` slots filled by a context (TRM's puzzle embedding,
or an ETRM encoder's output) and zero-padded; positions are known through RoPE only.
Attribute names follow the reference so that its checkpoints load by key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from etrm.config import ArchConfig
from etrm.models.grid_coords import GridCoordinateEmbedding, grid_coordinates
from etrm.models.layers import (
    CastedEmbedding,
    CastedLinear,
    PostNormBlock,
    RotaryEmbedding,
    trunc_normal_init_,
)


class ReasoningNet(nn.Module):
    """The shared network: add the injection to the state, then run the blocks."""

    def __init__(self, arch: ArchConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            PostNormBlock(arch.hidden_size, arch.num_heads, arch.expansion, arch.rms_norm_eps)
            for _ in range(arch.L_layers)
        )

    def forward(self, state: torch.Tensor, injection: torch.Tensor, cos_sin) -> torch.Tensor:
        state = state + injection
        for layer in self.layers:
            state = layer(state, cos_sin)
        return state


class TRMDecoder(nn.Module):
    """One ACT step of TRM: H_cycles × (L_cycles z_L updates, one z_H update), then the LM and Q heads."""

    def __init__(self, arch: ArchConfig):
        super().__init__()
        self.arch = arch
        hidden = arch.hidden_size
        self.prefix_len = arch.puzzle_emb_len
        self.embed_scale = math.sqrt(hidden)
        self.embed_tokens = CastedEmbedding(arch.vocab_size, hidden, init_std=1.0 / self.embed_scale)
        self.canvas_side = math.isqrt(arch.seq_len)
        self.grid_coords = (
            GridCoordinateEmbedding(hidden, init_std=1.0 / self.embed_scale) if arch.grid_coords else None
        )
        self.lm_head = CastedLinear(hidden, arch.vocab_size, bias=False)
        self.q_head = CastedLinear(hidden, 2, bias=True)
        self.rotary_emb = RotaryEmbedding(
            hidden // arch.num_heads, arch.seq_len + self.prefix_len, arch.rope_theta
        )
        self.L_level = ReasoningNet(arch)
        # Fixed random initial latents, broadcast over every position when a sample (re)starts.
        self.register_buffer("H_init", trunc_normal_init_(torch.empty(hidden), std=1.0))
        self.register_buffer("L_init", trunc_normal_init_(torch.empty(hidden), std=1.0))
        # Q head starts at "never halt" (sigmoid(-5) ≈ 0.007), as in the reference.
        with torch.no_grad():
            self.q_head.weight.zero_()
            self.q_head.bias.fill_(-5.0)

    def latent_shape(self, batch_size: int) -> tuple[int, int, int]:
        return (batch_size, self.prefix_len + self.arch.seq_len, self.arch.hidden_size)

    def reset_latents(
        self, reset: torch.Tensor, z_H: torch.Tensor, z_L: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows flagged in `reset` restart from H_init / L_init; the others keep their latents."""
        flag = reset.view(-1, 1, 1)
        return (
            torch.where(flag, self.H_init.to(z_H.dtype), z_H),
            torch.where(flag, self.L_init.to(z_L.dtype), z_L),
        )

    def input_embeddings(
        self,
        inputs: torch.Tensor,
        context: torch.Tensor,
        dtype: torch.dtype,
        cells: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """sqrt(hidden) · [context zero-padded to the prefix length ; token embeddings (+ per-cell vectors
        `cells` [B, seq_len, hidden] when given) (+ grid coordinates)]."""
        tokens = self.embed_tokens(inputs)
        if cells is not None:
            tokens = tokens + cells.to(tokens.dtype)
        if self.grid_coords is not None:
            tokens = tokens + self.grid_coords(grid_coordinates(inputs, self.canvas_side))
        tokens = tokens.to(dtype)
        prefix = F.pad(context.to(dtype), (0, 0, 0, self.prefix_len - context.shape[1]))
        return self.embed_scale * torch.cat((prefix, tokens), dim=1)

    def forward(
        self,
        z_H: torch.Tensor,
        z_L: torch.Tensor,
        inputs: torch.Tensor,
        context: torch.Tensor,
        cells: torch.Tensor | None = None,
    ):
        """Returns (z_H, z_L) detached for the carry, logits [B, seq, vocab], q_halt [B], q_continue [B]."""
        x = self.input_embeddings(inputs, context, z_H.dtype, cells)
        cos_sin = self.rotary_emb()
        # Deep supervision: only the last H cycle is back-propagated through.
        with torch.no_grad():
            for _ in range(self.arch.H_cycles - 1):
                z_H, z_L = self._h_cycle(z_H, z_L, x, cos_sin)
        z_H, z_L = self._h_cycle(z_H, z_L, x, cos_sin)
        logits = self.lm_head(z_H)[:, self.prefix_len :]
        q = self.q_head(z_H[:, 0]).to(torch.float32)
        return z_H.detach(), z_L.detach(), logits, q[..., 0], q[..., 1]

    def _h_cycle(self, z_H, z_L, x, cos_sin):
        for _ in range(self.arch.L_cycles):
            z_L = self.L_level(z_L, z_H + x, cos_sin)
        z_H = self.L_level(z_H, z_L, cos_sin)
        return z_H, z_L
