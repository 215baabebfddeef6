"""Optimizers: AdamATan2 as TRM trains with it, AdamW, and parameter groups with an encoder LR scale.

AdamATan2 follows the reference TRM's fused CUDA kernel (the `adam-atan2` package), per element:

    p ← p·(1 − lr·wd)
    m ← lerp(m, g, 1 − β1);  v ← lerp(v, g², 1 − β2)
    p ← p − lr / (1 − β1ᵗ) · atan2(m, √v / √(1 − β2ᵗ))

`adam-atan2-pytorch` on PyPI is a different rule (a = 1.27 in front and the first-moment bias
correction inside the atan2), so it would not reproduce TRM's training; hence this plain-PyTorch one.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from etrm.config import TrainConfig


class AdamATan2(torch.optim.Optimizer):
    """Adam without epsilon: the step is bounded by atan2 and invariant to the gradient's scale."""

    def __init__(
        self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 1e-2
    ):
        if lr < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamATan2 settings lr={lr} betas={betas} weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"]
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                p.mul_(1.0 - lr * wd)
                exp_avg.lerp_(p.grad, 1.0 - beta1)
                exp_avg_sq.lerp_(p.grad * p.grad, 1.0 - beta2)
                denom = exp_avg_sq.sqrt() / math.sqrt(1.0 - beta2**t)
                p.sub_(torch.atan2(exp_avg, denom), alpha=lr / (1.0 - beta1**t))
        return loss


def parameter_groups(model: nn.Module, train: TrainConfig) -> list[dict]:
    """Encoder and decoder parameters as two groups, each with its base learning rate (encoder LR scaled)."""
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    encoder = [p for p in model.parameters() if p.requires_grad and id(p) in encoder_ids]
    decoder = [p for p in model.parameters() if p.requires_grad and id(p) not in encoder_ids]
    groups = [{"name": "decoder", "params": decoder, "base_lr": train.lr}]
    if encoder:
        groups.append({"name": "encoder", "params": encoder, "base_lr": train.lr * train.encoder_lr_scale})
    return groups


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamATan2 or AdamW over every trainable parameter (the puzzle-id table is a buffer, not among them)."""
    groups = parameter_groups(model, train)
    for g in groups:
        g["lr"] = g["base_lr"]
    betas = (train.beta1, train.beta2)
    if train.optimizer == "adam_atan2":
        return AdamATan2(groups, lr=train.lr, betas=betas, weight_decay=train.weight_decay)
    return torch.optim.AdamW(groups, lr=train.lr, betas=betas, weight_decay=train.weight_decay, eps=1e-8)
