"""ETRM = context encoder + TRM decoder, driven by TRM's adaptive computation time (ACT) wrapper.

Each call runs one ACT step for every row. The carry persists across calls (and
batches): a row flagged halted by the previous call restarts from H_init/L_init
on the incoming batch row; the other rows keep working on their stored row and
ignore the new one. Training halts a row at `halt_max_steps` or when the Q head
says so (subject to a random exploration minimum); evaluation runs every row for
all `halt_max_steps` steps.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch import nn

from etrm.config import ArchConfig
from etrm.data.encoding import CANVAS, IGNORE_LABEL_ID, PAD_TOKEN, canvas_corner
from etrm.errors import EtrmError
from etrm.models.encoders import EncoderOutput, build_encoder
from etrm.models.trm import TRMDecoder


@dataclass
class Carry:
    z_H: torch.Tensor  # [B, prefix + seq, hidden]
    z_L: torch.Tensor
    steps: torch.Tensor  # [B] int32, ACT steps taken on the current row
    halted: torch.Tensor  # [B] bool, reset and refilled at the next call
    current_data: dict[str, torch.Tensor]  # the batch rows each sample is working on
    # The cached encoder output (encoder_reencode False), else None: its slots and per-cell vectors
    # (plain tensors, so that a checkpoint stores the carry as it does the rest).
    context: torch.Tensor | None
    context_cells: torch.Tensor | None = None


class ETRM(nn.Module):
    def __init__(self, arch: ArchConfig):
        super().__init__()
        # arch.seq_len < 900 runs the decoder on the top-left side×side corner of the 30×30 canvas:
        # puzzles whose grids all fit (e.g. synthetic 3-12 grids, side 13) cost a fraction as much.
        self.canvas_side = math.isqrt(arch.seq_len)
        self.arch = arch
        self.encoder = build_encoder(arch)
        self.decoder = TRMDecoder(arch)

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """forward_dtype 'auto': bfloat16 on CUDA, float32 elsewhere."""
        if self.arch.forward_dtype == "bfloat16" or (
            self.arch.forward_dtype == "auto" and device.type == "cuda"
        ):
            return torch.bfloat16
        return torch.float32

    def initial_carry(self, batch: dict[str, torch.Tensor]) -> Carry:
        """A carry with every row halted, so that the next call loads the whole batch."""
        inputs = batch["inputs"]
        batch_size, device = inputs.shape[0], inputs.device
        latents = torch.zeros(
            self.decoder.latent_shape(batch_size), dtype=self.compute_dtype(device), device=device
        )
        return Carry(
            z_H=latents,
            z_L=latents.clone(),
            steps=torch.zeros(batch_size, dtype=torch.int32, device=device),
            halted=torch.ones(batch_size, dtype=torch.bool, device=device),
            current_data={k: torch.zeros_like(v) for k, v in batch.items()},
            context=None,
        )

    def forward(self, carry: Carry, batch: dict[str, torch.Tensor]) -> tuple[Carry, dict[str, torch.Tensor]]:
        device = batch["inputs"].device
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if device.type == "cuda" and self.compute_dtype(device) == torch.bfloat16
            else contextlib.nullcontext()
        )
        with autocast:
            return self._step(carry, batch)

    def _step(self, carry: Carry, batch: dict[str, torch.Tensor]) -> tuple[Carry, dict[str, torch.Tensor]]:
        reset = carry.halted
        current = {
            k: torch.where(reset.view(-1, *([1] * (old.ndim - 1))), batch[k], old)
            for k, old in carry.current_data.items()
        }
        z_H, z_L = self.decoder.reset_latents(reset, carry.z_H, carry.z_L)
        steps = torch.where(reset, 0, carry.steps)
        encoded = self._encode(reset, current, carry)

        inputs = self._decoder_canvas(current)
        z_H, z_L, logits, q_halt, q_continue = self.decoder(z_H, z_L, inputs, encoded.slots, encoded.cells)
        outputs = {
            "logits": self._full_canvas(logits),
            "q_halt_logits": q_halt,
            "q_continue_logits": q_continue,
            "context": encoded.slots,
        }
        if encoded.kl is not None:
            outputs["kl"] = encoded.kl

        with torch.no_grad():
            steps = steps + 1
            is_last_step = steps >= self.arch.halt_max_steps
            halted = is_last_step
            if self.training and self.arch.halt_max_steps > 1:
                if self.arch.no_ACT_continue:
                    halted = halted | (q_halt > 0)
                else:
                    halted = halted | (q_halt > q_continue)
                explore = torch.rand_like(q_halt) < self.arch.halt_exploration_prob
                min_steps = explore * torch.randint_like(steps, low=2, high=self.arch.halt_max_steps + 1)
                halted = halted & (steps >= min_steps)
                if not self.arch.no_ACT_continue:
                    # Bootstrapped Q-learning target: the Q values one step further on.
                    _, _, _, next_halt, next_continue = self.decoder(
                        z_H, z_L, inputs, encoded.slots, encoded.cells
                    )
                    outputs["target_q_continue"] = torch.sigmoid(
                        torch.where(is_last_step, next_halt, torch.maximum(next_halt, next_continue))
                    )
        keep = not self.arch.encoder_reencode  # the encoding is cached for the rows' next steps
        context = encoded.slots.detach() if keep else None
        context_cells = encoded.cells.detach() if keep and encoded.cells is not None else None
        return Carry(z_H, z_L, steps, halted, current, context, context_cells), outputs

    def _decoder_canvas(self, current: dict[str, torch.Tensor]) -> torch.Tensor:
        """The query's [B, 900] tokens cut to the seq_len corner the decoder sees.

        A grid or a label reaching past the corner is an error: it could be neither read nor predicted.
        """
        tokens, side = current["inputs"], self.canvas_side
        if side == CANVAS:
            return tokens
        outside = torch.ones(CANVAS, CANVAS, dtype=torch.bool, device=tokens.device)
        outside[:side, :side] = False
        outside = outside.view(-1)
        labels = current.get("labels")
        if (tokens[:, outside] != PAD_TOKEN).any() or (
            labels is not None and (labels[:, outside] != IGNORE_LABEL_ID).any()
        ):
            raise EtrmError(
                f"arch.seq_len={self.arch.seq_len} ({side}×{side} canvas) is too small for a grid in this batch"
            )
        return canvas_corner(tokens, side)

    def _full_canvas(self, logits: torch.Tensor) -> torch.Tensor:
        """[B, seq_len, V] → [B, 900, V]; cells outside the decoder's corner predict PAD (no gradient)."""
        side = self.canvas_side
        if side == CANVAS:
            return logits
        outside = torch.full((self.arch.vocab_size,), -1e4, dtype=logits.dtype, device=logits.device)
        outside[PAD_TOKEN] = 0.0
        full = outside.expand(logits.shape[0], CANVAS, CANVAS, -1).clone()
        full[:, :side, :side] = logits.view(logits.shape[0], side, side, -1)
        return full.view(logits.shape[0], CANVAS * CANVAS, -1)

    def _encode(self, reset: torch.Tensor, current: dict[str, torch.Tensor], carry: Carry) -> EncoderOutput:
        """Re-encode every row, or (encoder_reencode False) only the rows being reset, the others cached."""
        if self.arch.encoder_reencode or carry.context is None:
            return self.encoder(current)
        cached = EncoderOutput(carry.context, carry.context_cells)
        rows = reset.nonzero().squeeze(1)
        if not rows.numel():
            return cached
        return cached.with_rows(rows, self.encoder({k: v[rows] for k, v in current.items()}))


def build_model(arch: ArchConfig) -> ETRM:
    return ETRM(arch)
