"""The experiment matrices as torchrun command lines: one training job per preset of a phase.

Each job has its own rendezvous (`torchrun --standalone`: a free local port), so jobs can run side
by side on one node; with `gpus_per_job` job i sees its own block of GPUs (CUDA_VISIBLE_DEVICES),
block i mod `parallel`, and `run_jobs(jobs, parallel)` runs the jobs of each block one after another.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from etrm.errors import EtrmError

PHASES = ("overfit", "semi-final")
POLL_SECONDS = 0.5


@dataclass
class Job:
    preset: str
    run_name: str
    project: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)  # set for this job only (its GPU block)
    slot: int = 0  # jobs of one slot run one after another; slots run side by side

    @property
    def command(self) -> str:
        prefix = "".join(f"{k}={shlex.quote(v)} " for k, v in self.env.items())
        return prefix + shlex.join(self.argv)


def sweep_jobs(
    phase: str,
    nproc: int,
    runs_dir: str = "runs",
    overrides: list[str] | None = None,
    *,
    decoder: str | None = None,
    gpus_per_job: int = 0,
    parallel: int = 1,
) -> list[Job]:
    """One job per preset of `phase`, in preset order, each writing to runs_dir/<run name>.

    `decoder` is every job's train.init_from (an etrm run, a TRM checkpoint, or "none"); the phases
    start from a pretrained decoder, so it (or a train.init_from override) is required.
    """
    from etrm.config import PRESETS, apply_overrides, get_preset

    if phase not in PHASES:
        raise EtrmError(f"unknown sweep {phase!r} (sweeps: {', '.join(PHASES)})")
    for option, value in (("--nproc", nproc), ("--parallel", parallel)):
        if value < 1:
            raise EtrmError(f"{option} must be at least 1, got {value}")
    if gpus_per_job < 0 or (gpus_per_job and nproc != gpus_per_job):
        raise EtrmError(
            f"--gpus-per-job {gpus_per_job} with --nproc {nproc}: torchrun runs one process per GPU, "
            f"give the same number (or leave --nproc out)"
        )
    overrides = list(overrides or [])
    if decoder is not None:
        if decoder != "none" and not Path(decoder).exists():
            raise EtrmError(f"--decoder {decoder}: no such run folder or checkpoint")
        overrides.append(f"train.init_from={decoder}")
    elif not any(o.split("=", 1)[0].strip() == "train.init_from" for o in overrides):
        raise EtrmError(
            f"the {phase} presets start from a pretrained decoder: give --decoder RUN (an etrm run, e.g. "
            f"from `etrm train --preset trm`, or a TRM checkpoint), or --decoder none to train from scratch"
        )
    jobs = []
    for name, info in PRESETS.items():
        if info.phase != phase:
            continue
        preset = get_preset(name)
        apply_overrides(preset, overrides)  # a bad --set stops the sweep before any job runs
        logging = preset.logging
        slot = len(jobs) % parallel
        argv = ["torchrun", "--standalone", "--nproc-per-node", str(nproc), "-m", "etrm", "train"]
        argv += ["--preset", name, "--out", f"{runs_dir.rstrip('/')}/{logging.run_name}"]
        for override in [
            f"logging.project={logging.project}",
            f"logging.run_name={logging.run_name}",
            *overrides,
        ]:
            argv += ["--set", override]
        env = {}
        if gpus_per_job:
            block = range(slot * gpus_per_job, (slot + 1) * gpus_per_job)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, block))
        jobs.append(Job(name, logging.run_name, logging.project, argv, env, slot))
    return jobs


def run_jobs(jobs: list[Job], parallel: int = 1) -> list[tuple[Job, int | None]]:
    """Run the jobs, `parallel` slots side by side; returns each job's exit status (None: not started).

    A failure starts no further job (those running finish) and is an error naming every failed
    job and every job not started.
    """
    from etrm.console import err_console

    if jobs and shutil.which(jobs[0].argv[0]) is None:
        raise EtrmError(f"{jobs[0].argv[0]} is not on PATH (it comes with PyTorch); cannot --run the sweep")
    queues = {slot: [j for j in jobs if j.slot % parallel == slot] for slot in range(parallel)}
    running: dict[int, tuple[Job, subprocess.Popen]] = {}
    status: dict[str, int] = {}
    failed = False
    while running or (not failed and any(queues.values())):
        for slot, queue in queues.items():
            if slot not in running and queue and not failed:
                job = queue.pop(0)
                err_console.print(f"[{job.preset}] {job.command}", markup=False, highlight=False)
                running[slot] = (job, subprocess.Popen(job.argv, env={**os.environ, **job.env}))
        for slot, (job, process) in list(running.items()):
            code = process.poll()
            if code is not None:
                del running[slot]
                status[job.preset] = code
                failed = failed or code != 0
                err_console.print(
                    f"[{job.preset}] {job.run_name}: exit {code}", markup=False, highlight=False
                )
        if running:
            time.sleep(POLL_SECONDS)
    outcome = [(job, status.get(job.preset)) for job in jobs]
    if failed:
        bad = ", ".join(f"{j.preset} (exit {code})" for j, code in outcome if code)
        rest = ", ".join(j.preset for j, code in outcome if code is None) or "none"
        raise EtrmError(f"sweep jobs failed: {bad}; not started: {rest}")
    return outcome
