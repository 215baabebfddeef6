"""Metric logging: `metrics.jsonl` in the run folder is the source of truth; W&B mirrors it.
Per-step statistics travel by name (`sum_over_ranks`), never by position; `TrainMetrics` sums them
over a window of steps and writes the window's averages as one row, and events as they happen.

W&B is imported only when enabled and writes its files into the run folder (`RUN/wandb/`),
offline by default so no account is needed; `online` is refused up front without an API key.
"""

from __future__ import annotations

import json
import math
import netrc
import numbers
import os
import uuid
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from etrm.config import RunConfig, config_to_dict
from etrm.distributed import DistContext, all_reduce_sum_
from etrm.errors import EtrmError
from etrm.io import atomic_write_bytes
from etrm.runs.folder import METRICS_FILE, read_metrics_file


def _json_value(v: Any) -> Any:
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact readable
    return v


class MetricsLogger:
    """Append one JSON object per row; on a resume, rows after the checkpoint's step are dropped first."""

    def __init__(self, run_dir: Path, cfg: RunConfig, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            self._truncate_after(resume_step)
        self._file = self.path.open("a")
        self._wandb_run = None
        if cfg.logging.wandb != "disabled":
            self._wandb_run = _start_wandb(Path(run_dir), cfg)

    def _truncate_after(self, step: int) -> None:
        """Keep the rows up to the resumed checkpoint; a corrupt line is an error, a torn last one a warning."""
        from etrm.console import err_console

        rows, warnings = read_metrics_file(self.path)
        for warning in warnings:
            err_console.print(f"warning: {warning}", soft_wrap=True)
        kept = [row for row in rows if row["step"] <= step]
        atomic_write_bytes(self.path, "".join(json.dumps(row) + "\n" for row in kept).encode())

    def log(self, row: dict[str, Any]) -> None:
        row = {k: _json_value(v) for k, v in row.items()}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb_run is not None:
            scalars = {k: v for k, v in row.items() if isinstance(v, numbers.Number)}
            self._wandb_run.log(scalars)

    def close(self) -> None:
        self._file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None


def check_wandb_login(cfg: RunConfig) -> None:
    """`logging.wandb=online` needs an API key (WANDB_API_KEY or `wandb login`'s netrc entry): refuse
    before the run folder is made, not after, when `wandb.init` would fail."""
    if cfg.logging.wandb != "online" or os.environ.get("WANDB_API_KEY"):
        return
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    try:
        found = netrc.netrc(os.environ.get("NETRC")).authenticators(host)
    except (OSError, netrc.NetrcParseError):
        found = None
    if not found:
        raise EtrmError(
            "logging.wandb=online (--wandb online) needs a W&B API key: run `wandb login` or set "
            "WANDB_API_KEY, or use --wandb offline"
        )


def sum_over_ranks(values: dict[str, torch.Tensor], ctx: DistContext) -> dict[str, float | list[float]]:
    """Named per-step values (scalars or vectors) summed over ranks in one message and read back in one
    transfer: a scalar comes back as a float, a vector as a list, each under its own name."""
    # Copies: the reduction writes its sums back into what it is given, never into the caller's tensors.
    flat = {
        name: v.detach().to(ctx.device, torch.float64, copy=True).reshape(-1) for name, v in values.items()
    }
    all_reduce_sum_(list(flat.values()), ctx)
    summed = torch.cat(list(flat.values())).tolist()
    out: dict[str, float | list[float]] = {}
    offset = 0
    for name, v in values.items():
        chunk = summed[offset : offset + v.numel()]
        out[name] = chunk[0] if v.dim() == 0 else chunk
        offset += v.numel()
    return out


# The step statistics summed over a window: ACTLossHead's metric sums, each under its own name.
SUM_KEYS = (
    "count",
    "accuracy",
    "exact_accuracy",
    "q_halt_accuracy",
    "steps",
    "lm_loss",
    "q_halt_loss",
    "q_continue_loss",
    "kl_loss",
)


@dataclass
class Window:
    """Sums over the steps since the last metrics row (identical on every rank: they are all-reduced)."""

    steps: int = 0
    sums: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in SUM_KEYS})
    steps_hist: list[int] = field(default_factory=list)
    norms: dict[str, float] = field(default_factory=lambda: {"encoder": 0.0, "inner": 0.0, "total": 0.0})
    context_rms: float = 0.0

    def add(self, stats: dict[str, Any], norms: dict[str, float]) -> None:
        """One step's statistics summed over ranks (`sum_over_ranks`) and its gradient norms."""
        for k in SUM_KEYS:
            self.sums[k] += stats[k]
        self.context_rms += math.sqrt(stats["context_square_sum"] / max(stats["context_size"], 1.0))
        self.steps_hist = [a + int(b) for a, b in zip(self.steps_hist, stats["halted_after"], strict=True)]
        for k in self.norms:
            self.norms[k] += norms[k]
        self.steps += 1

    def as_state(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class TrainMetrics:
    """The training run's rows of metrics.jsonl: every `logging.log_interval` steps the window's averages,
    and events as they happen. Every rank keeps the window; only rank 0 is given a `logger` and writes."""

    def __init__(self, cfg: RunConfig, steps_per_epoch: int, device: torch.device):
        self.cfg, self.steps_per_epoch, self.device = cfg, steps_per_epoch, device
        self.logger: MetricsLogger | None = None
        self.window = self.empty_window()
        self.lr: float | None = None  # the learning rate of the last step

    def empty_window(self) -> Window:
        return Window(steps_hist=[0] * self.cfg.arch.halt_max_steps)

    def add_step(self, stats: dict[str, Any], norms: dict[str, float], lr: float) -> None:
        self.window.add(stats, norms)
        self.lr = lr

    def log(self, step: int, values: dict[str, Any]) -> dict[str, Any]:
        """Write `values` as the row of optimizer step `step` (rank 0); returns the row."""
        row = {"step": step, "epoch": step / self.steps_per_epoch, **values}
        if self.logger is not None:
            self.logger.log(row)
        return row

    def log_event(self, step: int, event: str, **values: Any) -> None:
        self.log(step, {"event": event, **values})

    def log_window(self, step: int, seconds: float, prefix_rms: float) -> dict[str, Any]:
        """The averages over the window that ends at `step` (which took `seconds`), then a new window."""
        w = self.window
        count = max(w.sums["count"], 1.0)
        per_sample = self.cfg.train.global_batch_size * w.steps
        values: dict[str, Any] = {}
        for k in ("lm_loss", "q_halt_loss", "q_continue_loss", "kl_loss"):
            values[f"train/{k}"] = w.sums[k] / per_sample
        for k in ("accuracy", "exact_accuracy", "q_halt_accuracy", "steps"):
            values[f"train/{k}"] = w.sums[k] / count
        values["train/steps_hist"] = list(w.steps_hist)
        values["train/lr"] = self.lr
        for k, v in w.norms.items():
            values[f"grad/{k}_norm"] = v / w.steps
        values["encoder/context_rms"] = w.context_rms / w.steps
        values["encoder/prefix_rms"] = prefix_rms
        values["perf/samples_per_s"] = per_sample / max(seconds, 1e-9)
        values["perf/peak_mem_mb"] = _peak_memory_mb(self.device)
        self.window = self.empty_window()
        return self.log(step, values)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _start_wandb(run_dir: Path, cfg: RunConfig):
    import wandb

    id_file = run_dir / "wandb_id.txt"
    run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    run = wandb.init(
        project=cfg.logging.project,
        name=cfg.logging.run_name or run_dir.name,
        id=run_id,
        resume="allow",
        dir=str(run_dir),
        mode=cfg.logging.wandb,
        config=config_to_dict(cfg),
    )
    run.define_metric("*", step_metric="step")
    return run


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
