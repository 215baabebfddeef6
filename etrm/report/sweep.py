"""The experiment matrices as torchrun command lines: one training job per preset of a phase."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass

from etrm.errors import EtrmError

PHASES = ("overfit", "semi-final")


@dataclass
class Job:
    preset: str
    run_name: str
    project: str
    argv: list[str]

    @property
    def command(self) -> str:
        return shlex.join(self.argv)


def sweep_jobs(
    phase: str, nproc: int, runs_dir: str = "runs", overrides: list[str] | None = None
) -> list[Job]:
    """One job per preset of `phase`, in preset order, each writing to runs_dir/<run name>."""
    from etrm.config import PRESETS, apply_overrides, get_preset

    if phase not in PHASES:
        raise EtrmError(f"unknown sweep {phase!r} (sweeps: {', '.join(PHASES)})")
    if nproc < 1:
        raise EtrmError(f"--nproc must be at least 1, got {nproc}")
    jobs = []
    for name, info in PRESETS.items():
        if info.phase != phase:
            continue
        preset = get_preset(name)
        apply_overrides(preset, overrides or [])  # a bad --set stops the sweep before any job runs
        logging = preset.logging
        argv = ["torchrun", "--nproc-per-node", str(nproc), "-m", "etrm", "train", "--preset", name]
        argv += ["--out", f"{runs_dir.rstrip('/')}/{logging.run_name}"]
        for override in [
            f"logging.project={logging.project}",
            f"logging.run_name={logging.run_name}",
            *(overrides or []),
        ]:
            argv += ["--set", override]
        jobs.append(Job(name, logging.run_name, logging.project, argv))
    return jobs


def run_jobs(jobs: list[Job]) -> None:
    """One after another; the first failure stops the sweep and names the jobs not started."""
    from etrm.console import err_console

    if jobs and shutil.which(jobs[0].argv[0]) is None:
        raise EtrmError(f"{jobs[0].argv[0]} is not on PATH (it comes with PyTorch); cannot --run the sweep")
    for i, job in enumerate(jobs):
        err_console.print(f"[{i + 1}/{len(jobs)}] {job.command}", markup=False, highlight=False)
        status = subprocess.run(job.argv, check=False).returncode
        if status != 0:
            rest = ", ".join(j.preset for j in jobs[i + 1 :]) or "none"
            raise EtrmError(f"sweep job {job.preset} failed with exit status {status}; not started: {rest}")
