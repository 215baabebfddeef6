"""Picking the semi-final winner by the experiment design's rules, in their order.

1. eligible: evaluated, and grad ratio (encoder/total, pre-clip, last window) > 0.15;
2. highest test EM (pass@1); every run within 3 points of it stays;
3. among those, prefer runs still improving (positive test-EM slope over the last
   evaluations) with a train/test gap under 15 points: the runs meeting the most of
   these two stay. Test EM stays the primary criterion: a preference never lifts a
   run over one more than 3 points better;
4. then fewer parameters, then lower exploration (arch.halt_exploration_prob),
   then better gradient health (higher ratio), then name order.

Each rule keeps the best runs and sets the others aside; the rule that decided is
the last one that set a run aside.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from etrm.report.summary import RunSummary

MIN_GRAD_RATIO = 0.15
MAX_GAP = 0.15
TIE_MARGIN = 0.03
_TOLERANCE = 1e-9  # EM differences of exactly 3 points count as within 3 points despite float rounding

RULES = {
    "eligibility": f"eligible only with grad ratio > {MIN_GRAD_RATIO} (encoder/total, pre-clip) after an evaluation",
    "preference": f"prefer still improving (positive test-EM slope) with train/test gap < {MAX_GAP:.0%}",
    "test_em": f"highest test EM (pass@1); runs within {TIE_MARGIN * 100:g} points go to the tie-breaks",
    "params": f"within {TIE_MARGIN * 100:g} points of test EM: fewer parameters",
    "exploration": "then lower exploration (arch.halt_exploration_prob)",
    "grad_health": "then better gradient health (higher encoder/total ratio)",
    "name": "all else equal: the first by name",
    "only_run": "the only run",
    "none_eligible": "no run is eligible",
}


@dataclass
class Selection:
    winner: str | None
    rule: str  # key of RULES: the rule that decided
    reasoning: list[str]  # one line per rule applied, in order
    ranking: list[str]  # winner first, then by how far each run got through the rules
    set_aside: dict[str, str] = field(default_factory=dict)  # run → the rule and the reason
    notes: list[str] = field(default_factory=list)  # what the reader must know, e.g. mixed protocols

    @property
    def rule_text(self) -> str:
        return RULES[self.rule]

    def to_json(self) -> dict:
        return {
            "winner": self.winner,
            "rule": self.rule,
            "rule_text": self.rule_text,
            "reasoning": self.reasoning,
            "ranking": self.ranking,
            "set_aside": self.set_aside,
            "notes": self.notes,
        }


def _pct(x: float) -> str:
    return f"{x * 100:.1f}%" if math.isfinite(x) else "—"


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def _eligible(s: RunSummary) -> bool:
    return s.evaluated and math.isfinite(s.grad_ratio) and s.grad_ratio > MIN_GRAD_RATIO


def _show_eligibility(s: RunSummary) -> str:
    if not s.evaluated:
        return "never evaluated"
    if not math.isfinite(s.grad_ratio):
        return "no gradient norms logged"
    return f"grad ratio {s.grad_ratio:.3f}"


def _preference_score(s: RunSummary) -> int:
    return int(s.improving) + int(math.isfinite(s.gap) and s.gap < MAX_GAP)


def _show_preference(s: RunSummary) -> str:
    if s.improving:
        trend = "improving"
    else:
        trend = "not improving" if math.isfinite(s.slope) else "too few evaluations for a slope"
    return f"{trend}, gap {_pct(s.gap)}"


def _tie_breaks() -> list[tuple[str, Callable[[RunSummary], Any], Callable[[RunSummary], str]]]:
    """(rule, key where lower is better, how to show the value); unknown values lose."""
    return [
        (
            "params",
            lambda s: s.num_params if s.num_params is not None else math.inf,
            lambda s: f"{s.num_params:,} params" if s.num_params is not None else "params unknown",
        ),
        (
            "exploration",
            lambda s: s.exploration if s.exploration is not None else math.inf,
            lambda s: f"exploration {s.exploration if s.exploration is not None else 'unknown'}",
        ),
        (
            "grad_health",
            lambda s: -s.grad_ratio,  # eligible runs all have a finite ratio
            lambda s: f"ratio {s.grad_ratio:.3f}",
        ),
        ("name", lambda s: s.name, lambda s: s.name),
    ]


class _Rules:
    """Applies the rules one after another, remembering who was set aside, when and why."""

    def __init__(self, summaries: list[RunSummary]) -> None:
        self.pool = list(summaries)
        self.reasoning: list[str] = []
        self.set_aside: dict[str, str] = {}
        self.round_set_aside: dict[str, int] = {}
        self.rounds = 0
        self.decided_by = "only_run"

    def keep(self, rule: str, kept: list[RunSummary], show: Callable[[RunSummary], str]) -> None:
        self.rounds += 1
        dropped = [s for s in self.pool if s not in kept]
        for s in dropped:
            self.set_aside[s.name] = f"{RULES[rule]}: {show(s)}"
            self.round_set_aside[s.name] = self.rounds
        if dropped:
            self.decided_by = rule
        line = f"{RULES[rule]} — kept " + (", ".join(f"{s.name} ({show(s)})" for s in kept) or "none")
        if dropped:
            line += "; set aside " + ", ".join(f"{s.name} ({show(s)})" for s in dropped)
        self.reasoning.append(line)
        self.pool = kept


def select_winner(summaries: list[RunSummary]) -> Selection:
    rules = _Rules(summaries)
    rules.keep("eligibility", [s for s in rules.pool if _eligible(s)], _show_eligibility)
    if not rules.pool:
        ranking = sorted(summaries, key=lambda s: (-_finite(s.test_em), s.name))
        return Selection(None, "none_eligible", rules.reasoning, [s.name for s in ranking], rules.set_aside)

    notes = []
    if len({s.protocol for s in rules.pool}) > 1:
        notes.append(
            "test EM compared across evaluation protocols: "
            + ", ".join(f"{s.name} {s.protocol or 'unknown'}" for s in rules.pool)
            + "; evaluate the runs alike (`etrm eval RUN/step-N`) for a fair comparison"
        )
    top = max(s.test_em for s in rules.pool)
    rules.keep(
        "test_em",
        [s for s in rules.pool if top - s.test_em <= TIE_MARGIN + _TOLERANCE],
        lambda s: f"test EM {_pct(s.test_em)}" + (f" ({s.protocol})" if s.protocol else ""),
    )

    best_score = max(map(_preference_score, rules.pool))
    rules.keep("preference", [s for s in rules.pool if _preference_score(s) == best_score], _show_preference)
    for rule, key, show in _tie_breaks():
        if len(rules.pool) == 1:
            break
        best = min(map(key, rules.pool))
        rules.keep(rule, [s for s in rules.pool if key(s) == best], show)

    winner = rules.pool[0]
    others = sorted(
        (s for s in summaries if s is not winner),
        key=lambda s: (-rules.round_set_aside[s.name], -_finite(s.test_em), s.name),
    )
    return Selection(
        winner.name,
        rules.decided_by,
        rules.reasoning,
        [winner.name, *(s.name for s in others)],
        rules.set_aside,
        notes,
    )
