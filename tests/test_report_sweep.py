"""`etrm sweep`: the semi-final and overfit matrices as torchrun commands."""

import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest

from etrm.config import get_preset
from etrm.errors import EtrmError
from etrm.report import sweep
from etrm.report.sweep import sweep_jobs


def etrm(*args):
    return subprocess.run([sys.executable, "-m", "etrm", *args], capture_output=True, text=True, timeout=120)


def test_semi_final_jobs_are_sf1_to_sf6_with_names_and_project():
    jobs = sweep_jobs("semi-final", nproc=4)
    assert [j.preset for j in jobs] == ["SF1", "SF2", "SF3", "SF4", "SF5", "SF6"]
    for job in jobs:
        cfg = get_preset(job.preset)
        assert (job.run_name, job.project) == (cfg.logging.run_name, cfg.logging.project)
        argv = shlex.split(job.command)
        assert argv[:6] == ["torchrun", "--nproc-per-node", "4", "-m", "etrm", "train"]
        assert argv[argv.index("--preset") + 1] == job.preset
        assert argv[argv.index("--out") + 1] == f"runs/{job.run_name}"
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        assert sets == [f"logging.project={job.project}", f"logging.run_name={job.run_name}"]


def test_overfit_jobs_with_extra_overrides():
    jobs = sweep_jobs("overfit", nproc=1, runs_dir="out/", overrides=["train.init_from=trm ckpt.pt"])
    assert [j.preset for j in jobs] == ["E1a", "E1b", "E1d", "E2a", "E2b", "E2c"]
    argv = shlex.split(jobs[0].command)
    assert argv[2] == "1" and argv[argv.index("--out") + 1] == "out/E1a"
    assert argv[-2:] == ["--set", "train.init_from=trm ckpt.pt"]  # quoted, survives the shell


def test_bad_sweep_arguments():
    with pytest.raises(EtrmError, match="--nproc must be at least 1"):
        sweep_jobs("semi-final", nproc=0)
    with pytest.raises(EtrmError, match="unknown sweep 'final'"):
        sweep_jobs("final", nproc=1)


def test_run_stops_at_the_first_failure(monkeypatch):
    jobs = sweep_jobs("semi-final", nproc=1)
    started = []

    def fake_run(argv, check):
        started.append(argv[argv.index("--preset") + 1])
        return SimpleNamespace(returncode=1 if len(started) == 2 else 0)

    monkeypatch.setattr(sweep.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(sweep.subprocess, "run", fake_run)
    with pytest.raises(EtrmError, match="job SF2 failed with exit status 1; not started: SF3, SF4, SF5, SF6"):
        sweep.run_jobs(jobs)
    assert started == ["SF1", "SF2"]


def test_sweep_cli_writes_the_jobs_file(tmp_path):
    out = tmp_path / "jobs.txt"
    cli = etrm("sweep", "semi-final", "--nproc", "2", "--out", str(out))
    assert cli.returncode == 0, cli.stderr
    lines = out.read_text().splitlines()
    assert [line.split("--preset ")[1].split()[0] for line in lines] == [
        "SF1",
        "SF2",
        "SF3",
        "SF4",
        "SF5",
        "SF6",
    ]
    assert all(line.startswith("torchrun --nproc-per-node 2 -m etrm train") for line in lines)
