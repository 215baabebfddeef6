"""ACT behaviour in training: how many recursion steps samples take before halting.

A working Q-head spreads halting over the dynamic range (2..halt_max_steps); steps
stuck at one value (always the maximum, or always the exploration minimum) mean
the halting signal carries no information.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from etrm.diagnose.runs import Run, finite_values, mean

STUCK_SHARE = 0.95  # one step count taking this share of halted rows (or more) is "stuck"


@dataclass
class ActWindow:
    label: str
    end_step: int
    mean_steps: float
    q_halt_accuracy: float
    histogram: list[int]  # halted rows that stopped after 1..N steps


@dataclass
class ActStats:
    windows: list[ActWindow]
    histogram: list[int]  # over the whole run
    min_steps: int | None  # smallest / largest step count any halted row used
    max_steps: int | None
    mean_steps: float
    q_halt_accuracy: float  # last window's
    stuck_at: int | None  # the step count the last window is stuck at, if any

    @property
    def warning(self) -> str | None:
        if self.stuck_at is None:
            return None
        return (
            f"ACT steps are stuck at {self.stuck_at}: the Q-head's halting decision is constant "
            f"(≥{STUCK_SHARE:.0%} of halted rows in the last window)"
        )


def _sum_histograms(histograms: list[list[int]]) -> list[int]:
    total = [0] * max((len(h) for h in histograms), default=0)
    for h in histograms:
        for i, count in enumerate(h):
            total[i] += count
    return total


def _histograms(rows: list[dict]) -> list[list[int]]:
    return [list(r["train/steps_hist"]) for r in rows if isinstance(r.get("train/steps_hist"), list)]


def mean_steps(histogram: list[int], rows: list[dict]) -> float:
    """Mean steps of the halted rows (from the histogram; the logged means also count windows where none halted)."""
    halted = sum(histogram)
    if halted:
        return sum((i + 1) * count for i, count in enumerate(histogram)) / halted
    return mean(finite_values(rows, "train/steps"))


def step_range(histogram: list[int]) -> tuple[int, int] | None:
    """Fewest and most steps any halted row took."""
    used = [i + 1 for i, count in enumerate(histogram) if count]
    return (min(used), max(used)) if used else None


def step_range_text(histogram: list[int]) -> str:
    used = step_range(histogram)
    return f"{used[0]}–{used[1]}" if used else "—"


def _stuck_at(histogram: list[int], logged_means: list[float]) -> int | None:
    """The constant step count, from the histogram when logged, else from identical mean steps."""
    halted = sum(histogram)
    if halted:
        mode = max(range(len(histogram)), key=histogram.__getitem__)
        return mode + 1 if histogram[mode] >= STUCK_SHARE * halted else None
    if len(logged_means) >= 2 and max(logged_means) - min(logged_means) < 1e-6:
        return round(logged_means[0])
    return None


def act_stats(run: Run) -> ActStats:
    run_windows = run.windows()
    windows = []
    for w in run_windows:
        window_histogram = _sum_histograms(_histograms(w.rows))
        windows.append(
            ActWindow(
                label=w.label,
                end_step=w.end_step,
                mean_steps=mean_steps(window_histogram, w.rows),
                q_halt_accuracy=mean(finite_values(w.rows, "train/q_halt_accuracy")),
                histogram=window_histogram,
            )
        )
    histogram = _sum_histograms(_histograms(run.train_rows))
    used = step_range(histogram)
    last_rows = run_windows[-1].rows if run_windows else []
    return ActStats(
        windows=windows,
        histogram=histogram,
        min_steps=used[0] if used else None,
        max_steps=used[1] if used else None,
        mean_steps=mean_steps(histogram, run.train_rows),
        q_halt_accuracy=windows[-1].q_halt_accuracy if windows else math.nan,
        stuck_at=_stuck_at(windows[-1].histogram, finite_values(last_rows, "train/steps"))
        if windows
        else None,
    )
