"""Gradient health: is the encoder still learning, or starved by the decoder?

The health ratio is grad/encoder_norm ÷ grad/total_norm, both measured before
clipping. The experiment design reads it in three classes, with exact boundaries:

- healthy:   ratio > 0.2
- warning:   0.1 ≤ ratio ≤ 0.2
- unhealthy: ratio < 0.1 (gradient starvation: the decoder learns, the encoder barely)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from etrm.diagnose.runs import Run, finite_values, least_squares_slope, mean

HEALTHY_ABOVE = 0.2
UNHEALTHY_BELOW = 0.1
FLAT_TREND = 0.02  # a fitted change of the ratio over the run smaller than this is "steady"

HEALTH_RANK = {"healthy": 2, "warning": 1, "unhealthy": 0, "unknown": -1}


def health_class(ratio: float) -> str:
    if not math.isfinite(ratio):
        return "unknown"
    if ratio > HEALTHY_ABOVE:
        return "healthy"
    if ratio < UNHEALTHY_BELOW:
        return "unhealthy"
    return "warning"


def row_ratio(row: dict[str, Any]) -> float:
    """Encoder share of one logged step's gradient norm (total from grad/total_norm, else both parts)."""
    encoder, inner, total = (
        row.get("grad/encoder_norm"),
        row.get("grad/inner_norm"),
        row.get("grad/total_norm"),
    )
    if not isinstance(encoder, (int, float)):
        return math.nan
    if not isinstance(total, (int, float)):
        total = math.hypot(encoder, inner) if isinstance(inner, (int, float)) else math.nan
    if not (math.isfinite(encoder) and math.isfinite(total)) or total <= 0:
        return math.nan
    return encoder / total


@dataclass
class GradWindow:
    label: str
    end_step: int
    end_epoch: float
    rows: int
    encoder_norm: float
    inner_norm: float
    ratio: float  # mean of the window's per-step ratios
    health: str


@dataclass
class GradHealth:
    windows: list[GradWindow]
    ratio: float  # the last window's: the state the run is in now
    health: str
    trend: str  # rising | falling | steady | unknown
    change: float  # ratio change over the run, from a straight-line fit across windows

    @property
    def ratios(self) -> list[float]:
        return [w.ratio for w in self.windows]


def grad_health(run: Run) -> GradHealth:
    windows = []
    for w in run.windows():
        ratios = [r for r in map(row_ratio, w.rows) if math.isfinite(r)]
        if not ratios:
            continue
        ratio = mean(ratios)
        windows.append(
            GradWindow(
                label=w.label,
                end_step=w.end_step,
                end_epoch=w.end_epoch,
                rows=len(ratios),
                encoder_norm=mean(finite_values(w.rows, "grad/encoder_norm")),
                inner_norm=mean(finite_values(w.rows, "grad/inner_norm")),
                ratio=ratio,
                health=health_class(ratio),
            )
        )
    if not windows:
        return GradHealth([], math.nan, "unknown", "unknown", math.nan)
    change = least_squares_slope(list(range(len(windows))), [w.ratio for w in windows]) * (len(windows) - 1)
    if not math.isfinite(change):
        trend = "unknown"
    elif change > FLAT_TREND:
        trend = "rising"
    elif change < -FLAT_TREND:
        trend = "falling"
    else:
        trend = "steady"
    return GradHealth(windows, windows[-1].ratio, windows[-1].health, trend, change)
