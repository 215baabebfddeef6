"""What makes a folder a run folder, who may write into it, and reading its metrics file.

`etrm train` claims its `--out` folder before writing anything: an OS file lock (`flock` on
`.etrm-train.lock`) held by rank 0 for the whole run, so a second trainer is refused; the
kernel releases it when the process ends, however it ends. The lock file also marks the folder
as a run's, so that training never writes into a folder holding anything else.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from etrm.errors import EtrmError
from etrm.io import try_lock

LOCK_FILE = ".etrm-train.lock"
METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "run_info.json"
# What a run stopped before its first checkpoint leaves besides config.json and run_info.json
# (which a fresh start rewrites): a fresh start into its folder removes them.
_LEFTOVERS = (METRICS_FILE, "eval", "wandb", "wandb_id.txt")


def is_run_folder(path: Path) -> bool:
    """A folder `etrm train` wrote (its lock file or run_info.json), with or without checkpoints."""
    return (path / LOCK_FILE).is_file() or (path / RUN_INFO_FILE).is_file()


class RunLock:
    """An exclusive, non-blocking flock on the run folder's lock file, holding the owner's pid.

    When the lock made the folder (`created`) and nothing else was written into it, releasing
    removes the folder again: a run refused at start leaves nothing behind.
    """

    def __init__(self, run_dir: Path, created: bool = False):
        self.run_dir, self.created = run_dir, created
        fd = try_lock(run_dir / LOCK_FILE)
        if fd is None:
            owner = (run_dir / LOCK_FILE).read_text(errors="replace").strip() or "unknown"
            raise EtrmError(
                f"{run_dir} is in use by another `etrm train` (pid {owner}); "
                f"wait for it to finish or choose another --out"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is None:
            return
        os.close(self._fd)  # closing the descriptor drops the lock
        self._fd = None
        if self.created and [p.name for p in self.run_dir.iterdir()] == [LOCK_FILE]:
            shutil.rmtree(self.run_dir)


def claim_run_folder(run_dir: Path, *, resume: bool) -> RunLock:
    """Lock `run_dir` for one trainer, refusing a folder this run may not write.

    A resume needs a complete checkpoint there. A fresh start needs a new or empty folder, or
    a run folder without a complete checkpoint (a run stopped before its first one), whose
    leftovers are removed and said so.
    """
    from etrm.console import err_console
    from etrm.runs.checkpoint import complete_checkpoints, remove_partial_checkpoints, resolve_checkpoint

    if resume:
        resolve_checkpoint(run_dir)  # refuses a folder with nothing to resume
        return RunLock(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise EtrmError(f"--out {run_dir} is a file, not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not is_run_folder(run_dir):
        raise EtrmError(
            f"--out {run_dir} holds other files and is not a run folder (no {RUN_INFO_FILE}); "
            f"choose a new or empty folder"
        )
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir, created)
    if complete_checkpoints(run_dir):
        lock.release()
        raise EtrmError(
            f"{run_dir} already holds a run; continue it with --resume {run_dir} or choose another --out"
        )
    leftovers = [run_dir / name for name in _LEFTOVERS if (run_dir / name).exists()]
    if leftovers:
        for path in leftovers:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        err_console.print(
            f"{run_dir}: starting afresh in it (the run there stopped before its first checkpoint)",
            soft_wrap=True,
        )
    remove_partial_checkpoints(run_dir)
    return lock


def read_metrics_file(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a metrics.jsonl, and warnings.

    A run killed while writing can only cut its last line short (rows are appended one at a
    time): that line is dropped with a warning. A bad line anywhere else means the file is
    corrupt and is an error naming the line.
    """
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError as e:
        raise EtrmError(f"{path}: cannot read ({e})") from e
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip()]
    rows: list[dict[str, Any]] = []
    warnings: list[str] = []
    for position, (line_no, line) in enumerate(numbered):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if position == len(numbered) - 1:
                warnings.append(
                    f"{path}: last line {line_no} is truncated (run killed mid-write?); ignored it"
                )
                break
            raise EtrmError(f"{path}: line {line_no} is not valid JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise EtrmError(f"{path}: line {line_no} is not a metrics row (an object with an integer 'step')")
        rows.append(row)
    return rows, warnings
