"""One line per run: the numbers the semi-final selection is made from."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from etrm.diagnose.act import ActStats, act_stats, step_range_text
from etrm.diagnose.grad_health import GradHealth, grad_health
from etrm.diagnose.runs import Run, finite_or_none, least_squares_slope

SLOPE_EVALS = 3  # "still improving" looks at the test EM of the last this-many evaluations


@dataclass
class RunSummary:
    name: str
    path: str
    evaluations: int
    epoch: float  # of the last evaluation
    test_em: float  # pass@1 of the last evaluation (NaN when never evaluated)
    test_pass2: float
    train_em: float
    gap: float  # train EM - test EM, in fractions (0.15 = 15 points)
    slope: float  # test EM change per 1000 epochs over the last evaluations
    grad_ratio: float  # last window's encoder/total gradient-norm ratio
    grad_health: str
    grad_trend: str
    num_params: int | None
    exploration: float | None  # arch.halt_exploration_prob
    encoder_type: str | None
    act_range: str
    act_stuck_at: int | None
    decoder: str  # decoder_provenance: etrm:<run>, foreign or none ("unknown" for older runs)
    fewshot: bool | None  # False when a dataset trained on or a foreign decoder saw test puzzles
    protocol: str = ""  # how the last test EM was made (vote@N, identity) and from which file
    train_protocol: str = ""
    source: str = ""
    slope_protocols: tuple[str, ...] = ()  # of the evaluations the slope is fitted to (one, unless mixed)

    @property
    def evaluated(self) -> bool:
        return math.isfinite(self.test_em)

    @property
    def improving(self) -> bool:
        """Positive test-EM slope over the last evaluations (unknown with fewer than two: not improving)."""
        return math.isfinite(self.slope) and self.slope > 0

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        return {k: finite_or_none(v) if isinstance(v, float) else v for k, v in out.items()}


def _last(rows: list[dict[str, Any]], key: str) -> float:
    value = rows[-1].get(key) if rows else None
    return float(value) if isinstance(value, (int, float)) else math.nan


def summarize(run: Run, health: GradHealth | None = None, act: ActStats | None = None) -> RunSummary:
    """The run's numbers; pass `health` / `act` when already computed."""
    evals = sorted(run.eval_rows, key=lambda r: r["step"])
    recent = [r for r in evals[-SLOPE_EVALS:] if isinstance(r.get("eval/pass@1"), (int, float))]
    slope = least_squares_slope(
        [float(r["epoch"]) for r in recent], [float(r["eval/pass@1"]) for r in recent]
    )
    health = health or grad_health(run)
    act = act or act_stats(run)
    test_em, train_em = _last(evals, "eval/pass@1"), _last(evals, "eval/train_em")
    params = run.info.get("num_params")
    exploration = run.config_value("arch", "halt_exploration_prob")
    return RunSummary(
        name=run.name,
        path=str(run.path),
        evaluations=len(evals),
        epoch=_last(evals, "epoch"),
        test_em=test_em,
        test_pass2=_last(evals, "eval/pass@2"),
        train_em=train_em,
        gap=train_em - test_em,
        slope=slope * 1000,
        grad_ratio=health.ratio,
        grad_health=health.health,
        grad_trend=health.trend,
        num_params=int(params) if isinstance(params, (int, float)) else None,
        exploration=float(exploration) if isinstance(exploration, (int, float)) else None,
        encoder_type=run.config_value("arch", "encoder_type"),
        act_range=step_range_text(act.histogram),
        act_stuck_at=act.stuck_at,
        decoder=str(run.info.get("decoder_provenance", "unknown")),
        fewshot=run.info.get("fewshot"),
        protocol=str(evals[-1].get("eval/protocol", "")) if evals else "",
        train_protocol=str(evals[-1].get("eval/train_protocol", "")) if evals else "",
        source=str(evals[-1].get("eval/source", "")) if evals else "",
        slope_protocols=tuple(sorted({str(r.get("eval/protocol", "")) for r in recent})),
    )
