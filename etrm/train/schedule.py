"""TRM's learning-rate schedule: linear warmup, then cosine from the base LR down to lr_min_ratio × base;
and the spike guard that scales it down when the loss jumps."""

from __future__ import annotations

import collections
import math


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the base LR for optimizer step `step` (1-based: the first step gets 1/warmup)."""
    if step < warmup_steps:
        return step / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_ratio + max(0.0, (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


SPIKE_WINDOW = 50  # steps in the recent-loss average a spike is compared with
SPIKE_MIN_HISTORY = 10  # no spike test before this many steps


class SpikeGuard:
    """A loss over spike_factor × its recent average halves the learning rate from here on (0: off)."""

    def __init__(self, spike_factor: float):
        self.spike_factor = spike_factor
        self.lr_scale = 1.0
        self.recent_losses: collections.deque[float] = collections.deque(maxlen=SPIKE_WINDOW)

    def observe(self, loss: float) -> dict[str, float] | None:
        """Record this step's loss; returns the `lr_halved` event's values when it was a spike."""
        halved = None
        if self.spike_factor and len(self.recent_losses) >= SPIKE_MIN_HISTORY:
            recent = sum(self.recent_losses) / len(self.recent_losses)
            if loss > self.spike_factor * recent:
                self.lr_scale *= 0.5
                halved = {
                    "loss": loss,
                    "recent_mean": recent,
                    "spike_factor": self.spike_factor,
                    "lr_scale": self.lr_scale,
                }
        self.recent_losses.append(loss)
        return halved
