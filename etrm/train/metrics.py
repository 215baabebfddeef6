"""Metric logging: `metrics.jsonl` in the run folder is the source of truth; W&B mirrors it.
Per-step statistics travel by name (`sum_over_ranks`), never by position.

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
