"""Evaluation: augmented inference, de-augmentation, voting, pass@k and ARC submissions.

`evaluate` is imported on first use so that `etrm --help` does not load numpy.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EvalResult", "evaluate"]


def __getattr__(name: str) -> Any:
    if name == "evaluate":
        from etrm.eval.inference import evaluate

        return evaluate
    if name == "EvalResult":
        from etrm.eval.results import EvalResult

        return EvalResult
    raise AttributeError(f"module 'etrm.eval' has no attribute {name!r}")
