"""TRM's per-puzzle embedding table as a context provider: the baseline ETRM's encoders replace.

A row of `puzzle_emb_ndim` values per puzzle identifier (id 0 = blank), zero at
init, zero-padded to whole hidden-sized slots: the context has
ceil(puzzle_emb_ndim / hidden) slots (the decoder pads it to the prefix length).

The table is a buffer, not a parameter, so the dense optimizer never sees it.
TRM trains it with sparse sign-SGD instead; the trainer does that with
`take_sparse_grads()` after backward (all-gather ids and grads across ranks when
distributed) and `sign_sgd_step(ids, grads, lr, weight_decay)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from etrm.config import ArchConfig
from etrm.errors import EtrmError
from etrm.models.encoders import EncoderOutput


class PuzzleEmbeddingContext(nn.Module):
    def __init__(self, arch: ArchConfig):
        super().__init__()
        if arch.num_puzzle_identifiers <= 0:
            raise EtrmError(
                "arch.num_puzzle_identifiers must be > 0 for encoder_type='puzzle_embedding' "
                "(it comes from the dataset manifest's num_puzzle_identifiers)"
            )
        self.hidden_size = arch.hidden_size
        self.embedding_dim = arch.puzzle_emb_ndim or arch.hidden_size
        self.num_slots = -(-self.embedding_dim // self.hidden_size)
        self.register_buffer("weights", torch.zeros(arch.num_puzzle_identifiers, self.embedding_dim))
        # (ids, gathered rows) of each training forward since the last take_sparse_grads().
        self._gathered: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, batch: dict[str, torch.Tensor]) -> EncoderOutput:
        ids = batch["puzzle_identifiers"]
        rows = self.weights[ids]
        if self.training and torch.is_grad_enabled():
            # A leaf copy of the rows: backward fills its .grad, which sign-SGD then scatters by id.
            rows = rows.detach().requires_grad_(True)
            self._gathered.append((ids, rows))
        padded = F.pad(rows, (0, self.num_slots * self.hidden_size - self.embedding_dim))
        return EncoderOutput(padded.view(ids.shape[0], self.num_slots, self.hidden_size))

    def take_sparse_grads(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(ids [N], grads [N, ndim]) of the rows used since the last call, or None; clears the record."""
        gathered, self._gathered = self._gathered, []
        used = [(ids, rows.grad) for ids, rows in gathered if rows.grad is not None]
        if not used:
            return None
        return torch.cat([ids for ids, _ in used]), torch.cat([grad for _, grad in used])

    @torch.no_grad()
    def sign_sgd_step(self, ids: torch.Tensor, grads: torch.Tensor, lr: float, weight_decay: float) -> None:
        """TRM's update of the touched rows: grads summed per id, w ← w·(1 − lr·wd) − lr·sign(grad)."""
        unique_ids, inverse = ids.unique(return_inverse=True)
        summed = torch.zeros(unique_ids.shape[0], grads.shape[1], dtype=grads.dtype, device=grads.device)
        summed.index_add_(0, inverse, grads)
        rows = self.weights[unique_ids]
        rows.mul_(1.0 - lr * weight_decay).add_(torch.sign(summed), alpha=-lr)
        self.weights[unique_ids] = rows
