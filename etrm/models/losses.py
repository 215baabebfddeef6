"""TRM's ACT loss: stablemax cross-entropy on the grid, BCE for the Q head, plus the encoder's KL.

Loss terms are per-sample and summed over the batch (as the reference):
lm (mean over each sample's labelled cells) + 0.5·(q_halt + q_continue) + kl_weight·kl.
Metrics are sums: accuracy-style metrics over the rows that halted at this call
and have a label; the loss metrics over the whole batch, as the loss itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from etrm.data.encoding import IGNORE_LABEL_ID


def log_stablemax(logits: torch.Tensor) -> torch.Tensor:
    """log of s(x)/Σs(x) over the last dim, s(x) = 1/(1−x) for x < 0 and x + 1 otherwise (no exp to overflow)."""
    # The 1/(1−x) branch sees only x ≤ 0: evaluated at x = 1 (common in bfloat16) it would be inf,
    # and where() would send 0·inf = NaN back through the branch it did not pick.
    s = torch.where(logits < 0, 1.0 / (1.0 - logits.clamp(max=0.0)), logits + 1.0)
    return torch.log(s / s.sum(dim=-1, keepdim=True))


def stablemax_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-cell loss [B, S] in float64; 0 where the label is IGNORE_LABEL_ID."""
    valid = labels != IGNORE_LABEL_ID
    logprobs = log_stablemax(logits.to(torch.float64))
    picked = logprobs.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    return -torch.where(valid, picked, 0.0)


class ACTLossHead(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def initial_carry(self, batch: dict[str, torch.Tensor]):
        return self.model.initial_carry(batch)

    def forward(self, carry, batch: dict[str, torch.Tensor]):
        """Returns (carry, loss, metrics, detached outputs incl. preds, all rows halted)."""
        carry, outputs = self.model(carry, batch)
        labels = carry.current_data["labels"]
        logits, q_halt = outputs["logits"], outputs["q_halt_logits"]

        with torch.no_grad():
            preds = logits.argmax(dim=-1)
            labelled = labels != IGNORE_LABEL_ID
            label_counts = labelled.sum(-1)
            divisor = label_counts.clamp_min(1)
            cell_correct = labelled & (preds == labels)
            seq_correct = cell_correct.sum(-1) == label_counts
            counted = carry.halted & (label_counts > 0)
            metrics = {
                "count": counted.sum(),
                "accuracy": torch.where(counted, cell_correct.sum(-1) / divisor, 0.0).sum(),
                "exact_accuracy": (counted & seq_correct).sum(),
                "q_halt_accuracy": (counted & ((q_halt >= 0) == seq_correct)).sum(),
                "steps": torch.where(counted, carry.steps, 0).sum(),
            }

        lm_loss = (stablemax_cross_entropy(logits, labels).sum(-1) / divisor).sum()
        q_halt_loss = F.binary_cross_entropy_with_logits(
            q_halt, seq_correct.to(q_halt.dtype), reduction="sum"
        )
        zero = torch.zeros((), device=q_halt.device)
        q_continue_loss = zero
        if "target_q_continue" in outputs:
            q_continue_loss = F.binary_cross_entropy_with_logits(
                outputs["q_continue_logits"], outputs["target_q_continue"], reduction="sum"
            )
        kl_loss = outputs["kl"].sum() if "kl" in outputs else zero
        loss = lm_loss + 0.5 * (q_halt_loss + q_continue_loss) + self.model.arch.kl_weight * kl_loss

        metrics.update(
            lm_loss=lm_loss.detach(),
            q_halt_loss=q_halt_loss.detach(),
            q_continue_loss=q_continue_loss.detach(),
            kl_loss=kl_loss.detach(),
        )
        detached = {k: v.detach() for k, v in outputs.items()}
        detached["preds"] = preds
        return carry, loss, metrics, detached, carry.halted.all()
