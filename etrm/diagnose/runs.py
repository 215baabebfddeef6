"""Reading run folders written by `etrm train`: the one place that knows their layout.

`diagnose` and `report` only look at what training left on disk (docs/interfaces.md,
"Run folder"), so a run can be judged while it is still going, after it was killed,
or on another machine.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etrm.errors import EtrmError
from etrm.runs.folder import METRICS_FILE, RUN_INFO_FILE, read_metrics_file

CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"


@dataclass
class Window:
    """The training rows logged up to one evaluation (or after the last one)."""

    end_step: int
    end_epoch: float
    evaluated: bool  # False for the rows after the last evaluation
    rows: list[dict[str, Any]]

    @property
    def label(self) -> str:
        where = f"step {self.end_step} (epoch {self.end_epoch:g})"
        return f"to eval at {where}" if self.evaluated else f"to {where}, not evaluated"


@dataclass
class Run:
    path: Path
    name: str
    config: dict[str, Any]
    info: dict[str, Any]
    train_rows: list[dict[str, Any]]
    eval_rows: list[dict[str, Any]]
    events: list[dict[str, Any]]
    warnings: list[str] = field(default_factory=list)

    def config_value(self, section: str, key: str) -> Any:
        return self.config.get(section, {}).get(key)

    def windows(self) -> list[Window]:
        """Training rows grouped by the evaluation that closes them; empty groups dropped."""
        windows = []
        remaining = sorted(self.train_rows, key=lambda r: r["step"])
        for ev in sorted(self.eval_rows, key=lambda r: r["step"]):
            inside = [r for r in remaining if r["step"] <= ev["step"]]
            remaining = remaining[len(inside) :]
            if inside:
                windows.append(Window(ev["step"], float(ev.get("epoch", math.nan)), True, inside))
        if remaining:
            last = remaining[-1]
            windows.append(Window(last["step"], float(last.get("epoch", math.nan)), False, remaining))
        return windows

    def results_path(self, eval_row: dict[str, Any]) -> Path:
        """Where the results.json of one evaluation row lives (its `eval/results`, else eval/step-N/)."""
        relative = eval_row.get("eval/results")
        if relative:
            return self.path / relative
        return self.path / "eval" / f"step-{eval_row['step']}" / RESULTS_FILE

    def latest_results(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest evaluation whose results.json is on disk, for per-puzzle analysis."""
        candidates = [self.results_path(r) for r in sorted(self.eval_rows, key=lambda r: -r["step"])]
        on_disk = sorted(
            (p for p in (self.path / "eval").glob(f"step-*/{RESULTS_FILE}") if _step_of(p.parent.name) >= 0),
            key=lambda p: _step_of(p.parent.name),
            reverse=True,
        )
        for path in [*candidates, *on_disk]:
            if path.is_file():
                return path, _read_json(path)
        return None


def _step_of(folder_name: str) -> int:
    suffix = folder_name.removeprefix("step-")
    return int(suffix) if suffix.isdigit() else -1


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EtrmError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(obj, dict):
        raise EtrmError(f"{path}: expected a JSON object, found {type(obj).__name__}")
    return obj


def best_evidence(path: Path, row: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """An evaluation row with the figures of a full `etrm eval` of its checkpoint in place of the
    training's where one was written (eval/step-N/, eval/step-N-train/), and with the protocol
    (`vote@N`, `identity`) and source file of the test and train figures."""
    from etrm.eval.results import BY_EVAL_COMMAND, protocol_name

    row = dict(row)
    if "eval/protocol" not in row:  # logged before rows named it: the run's configured vote
        num_aug = config.get("train", {}).get("eval_num_aug")
        row["eval/protocol"] = protocol_name(num_aug) if num_aug else "vote@all"
        if num_aug is None:
            row["eval/protocol"] = "unknown"
    row["eval/source"] = METRICS_FILE
    if "eval/train_em" in row:
        row.setdefault("eval/train_protocol", "identity")  # training's train EM was unvoted then
        row["eval/train_source"] = METRICS_FILE
    for side, suffix in (("", ""), ("train_", "-train")):
        relative = f"eval/step-{row['step']}{suffix}/{RESULTS_FILE}"
        if not (path / relative).is_file():
            continue
        results = _read_json(path / relative)
        metrics = results.get("metrics")
        if results.get("evaluated_by") != BY_EVAL_COMMAND or not isinstance(metrics, dict):
            continue
        protocol = results.get("protocol") or protocol_name(int(results.get("num_aug") or 1))
        if side:
            if "train_em" in metrics:
                row["eval/train_em"] = metrics["train_em"]
                row["eval/train_protocol"], row["eval/train_source"] = protocol, relative
        else:
            row.update({f"eval/{k}": v for k, v in metrics.items() if k != "num_queries"})
            row["eval/protocol"], row["eval/source"], row["eval/results"] = protocol, relative, relative
    return row


def _is_eval_row(row: dict[str, Any]) -> bool:
    return any(key.startswith("eval/") for key in row)


def load_run(path: str | os.PathLike) -> Run:
    """A run folder's metrics, config and run info; EtrmError if `path` is not a run folder."""
    path = Path(path)
    if not path.exists():
        raise EtrmError(f"run folder {path} does not exist")
    if not path.is_dir():
        raise EtrmError(f"{path} is not a run folder (a file, not a folder written by `etrm train --out`)")
    metrics_path = path / METRICS_FILE
    if not metrics_path.is_file():
        nested = sorted(p.parent.name for p in path.glob(f"*/{METRICS_FILE}"))
        if nested:
            shown = ", ".join(nested[:5]) + (", …" if len(nested) > 5 else "")
            raise EtrmError(
                f"{path} is not a run folder but holds runs ({shown}); pass them one by one, e.g. {path}/*"
            )
        raise EtrmError(
            f"{path} is not a run folder: it has no {METRICS_FILE} (written by `etrm train --out`)"
        )
    rows, warnings = read_metrics_file(metrics_path)
    if not rows:
        raise EtrmError(f"{metrics_path} has no metrics rows yet")

    loaded: dict[str, dict[str, Any]] = {}
    for file_name in (CONFIG_FILE, RUN_INFO_FILE):
        if (path / file_name).is_file():
            loaded[file_name] = _read_json(path / file_name)
        else:
            loaded[file_name] = {}
            warnings.append(f"{path}: no {file_name}; the values it holds are shown as unknown")
    info = loaded[RUN_INFO_FILE]
    return Run(
        path=path,
        name=str(info.get("name") or path.resolve().name),
        config=loaded[CONFIG_FILE],
        info=info,
        train_rows=[r for r in rows if "event" not in r and not _is_eval_row(r)],
        eval_rows=[
            best_evidence(path, r, loaded[CONFIG_FILE]) for r in rows if "event" not in r and _is_eval_row(r)
        ],
        events=[r for r in rows if "event" in r],
        warnings=warnings,
    )


def finite_values(rows: list[dict[str, Any]], key: str) -> list[float]:
    """The finite numbers logged under `key` (rows without it, NaN and inf are skipped)."""
    values = []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            values.append(float(value))
    return values


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def least_squares_slope(xs: list[float], ys: list[float]) -> float:
    """Slope of the best straight line through the points (NaN with fewer than two distinct xs)."""
    if len(xs) < 2:
        return math.nan
    mx, my = mean(xs), mean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return math.nan
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx


def finite_or_none(value: float | None) -> float | None:
    """NaN and inf as JSON null (json.dumps would write bare NaN, which is not JSON)."""
    return value if value is not None and math.isfinite(value) else None
