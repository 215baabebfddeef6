"""Exponential moving average of the trainable weights (TRM evaluates and saves the EMA model)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """shadow ← rate·shadow + (1 − rate)·param after each optimizer step; buffers follow the live model."""

    def __init__(self, model: nn.Module, rate: float):
        self.rate = rate
        self.shadow = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for name, p in model.named_parameters():
            if name in self.shadow:
                self.shadow[name].mul_(self.rate).add_(p.detach(), alpha=1.0 - self.rate)

    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The live model's state dict with every averaged parameter replaced by its shadow."""
        state = model.state_dict()
        state.update(self.shadow)
        return state

    def averaged_copy(self, model: nn.Module) -> nn.Module:
        """A separate model holding the averaged weights (for evaluation)."""
        averaged = copy.deepcopy(model)
        averaged.load_state_dict(self.model_state_dict(model))
        return averaged

    def load_shadow(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in self.shadow.items():
            value.copy_(state[name])
