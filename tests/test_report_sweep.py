"""`etrm sweep`: the semi-final and overfit matrices as torchrun commands."""

import shlex
import subprocess
import sys

import pytest

from etrm.config import get_preset
from etrm.errors import EtrmError
from etrm.report import sweep
from etrm.report.sweep import sweep_jobs

SF_NAMES = [
    "SF1_hybrid_std_explore0.5",
    "SF2_hybrid_std_explore0.7",
    "SF3_hybrid_var_explore0.5",
    "SF4_hybrid_var_explore0.7",
    "SF5_standard_explore0.5",
    "SF6_standard_explore0.7",
]


def etrm(*args):
    return subprocess.run([sys.executable, "-m", "etrm", *args], capture_output=True, text=True, timeout=120)


def test_semi_final_jobs_have_the_designs_names_their_own_rendezvous_and_the_decoder(tmp_path):
    decoder = tmp_path / "runs" / "trm decoder"
    decoder.mkdir(parents=True)
    jobs = sweep_jobs("semi-final", nproc=4, decoder=str(decoder))
    assert [j.preset for j in jobs] == ["SF1", "SF2", "SF3", "SF4", "SF5", "SF6"]
    assert [j.run_name for j in jobs] == SF_NAMES
    for job in jobs:
        cfg = get_preset(job.preset)
        assert (job.run_name, job.project) == (cfg.logging.run_name, "etrm-semi-final")
        argv = shlex.split(job.command)
        # --standalone: each torchrun picks a free local port, so the six can run side by side.
        assert argv[:7] == ["torchrun", "--standalone", "--nproc-per-node", "4", "-m", "etrm", "train"]
        assert argv[argv.index("--preset") + 1] == job.preset
        assert argv[argv.index("--out") + 1] == f"runs/{job.run_name}"
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        assert sets == [
            "logging.project=etrm-semi-final",
            f"logging.run_name={job.run_name}",
            f"train.init_from={decoder}",
        ]
        assert job.env == {}


def test_gpu_blocks_follow_the_parallel_slots():
    jobs = sweep_jobs("semi-final", nproc=2, decoder="none", gpus_per_job=2, parallel=2)
    assert [(j.slot, j.env["CUDA_VISIBLE_DEVICES"]) for j in jobs] == [
        (0, "0,1"),
        (1, "2,3"),
        (0, "0,1"),
        (1, "2,3"),
        (0, "0,1"),
        (1, "2,3"),
    ]
    assert jobs[1].command.startswith("CUDA_VISIBLE_DEVICES=2,3 torchrun --standalone --nproc-per-node 2 ")


def test_overfit_jobs_with_extra_overrides():
    jobs = sweep_jobs("overfit", nproc=1, runs_dir="out/", overrides=["train.init_from=trm ckpt.pt"])
    assert [j.preset for j in jobs] == ["E1a", "E1b", "E1d", "E2a", "E2b", "E2c"]
    assert jobs[0].run_name == "E1a_standard_explore0.5" and jobs[0].project == "etrm-overfit"
    argv = shlex.split(jobs[0].command)
    assert argv[3] == "1" and argv[argv.index("--out") + 1] == "out/E1a_standard_explore0.5"
    assert argv[-2:] == ["--set", "train.init_from=trm ckpt.pt"]  # quoted, survives the shell


def test_bad_sweep_arguments(tmp_path):
    with pytest.raises(EtrmError, match="--nproc must be at least 1"):
        sweep_jobs("semi-final", nproc=0, decoder="none")
    with pytest.raises(EtrmError, match="--parallel must be at least 1"):
        sweep_jobs("semi-final", nproc=1, decoder="none", parallel=0)
    with pytest.raises(EtrmError, match="unknown sweep 'final'"):
        sweep_jobs("final", nproc=1, decoder="none")
    with pytest.raises(EtrmError, match="give --decoder RUN .* or --decoder none"):
        sweep_jobs("semi-final", nproc=1)
    with pytest.raises(EtrmError, match="--decoder .*nowhere: no such run folder"):
        sweep_jobs("semi-final", nproc=1, decoder=str(tmp_path / "nowhere"))
    with pytest.raises(EtrmError, match="--gpus-per-job 2 with --nproc 4"):
        sweep_jobs("semi-final", nproc=4, decoder="none", gpus_per_job=2)


class FakeProcess:
    """Finishes on its second poll with the exit status its job is given."""

    def __init__(self, argv, env, log, statuses):
        self.preset = argv[argv.index("--preset") + 1]
        self.env, self.polls, self.statuses = env, 0, statuses
        log.append(("start", self.preset, env.get("CUDA_VISIBLE_DEVICES")))
        self.log = log

    def poll(self):
        self.polls += 1
        if self.polls < 2:
            return None
        self.log.append(("end", self.preset))
        return self.statuses.get(self.preset, 0)


def fake_popen(monkeypatch, statuses):
    log = []
    monkeypatch.setattr(sweep.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(sweep.time, "sleep", lambda s: None)
    monkeypatch.setattr(sweep.subprocess, "Popen", lambda argv, env: FakeProcess(argv, env, log, statuses))
    return log


def test_parallel_run_keeps_k_jobs_going_on_their_own_gpus(monkeypatch):
    log = fake_popen(monkeypatch, {})
    jobs = sweep_jobs("semi-final", nproc=1, decoder="none", gpus_per_job=1, parallel=3)
    outcome = sweep.run_jobs(jobs, parallel=3)
    assert [(j.preset, code) for j, code in outcome] == [(f"SF{i}", 0) for i in range(1, 7)]
    starts = [entry for entry in log if entry[0] == "start"]
    assert starts[:3] == [("start", "SF1", "0"), ("start", "SF2", "1"), ("start", "SF3", "2")]
    assert log.index(("start", "SF4", "0")) > log.index(("end", "SF1"))  # its slot's job finished first
    running, most = 0, 0
    for entry in log:
        running += 1 if entry[0] == "start" else -1
        most = max(most, running)
    assert most == 3


def test_a_failure_starts_no_further_job_and_names_each_exit(monkeypatch):
    log = fake_popen(monkeypatch, {"SF2": 1})
    jobs = sweep_jobs("semi-final", nproc=1, decoder="none", parallel=2)
    with pytest.raises(
        EtrmError, match=r"sweep jobs failed: SF2 \(exit 1\); not started: SF3, SF4, SF5, SF6"
    ):
        sweep.run_jobs(jobs, parallel=2)
    assert [e[1] for e in log if e[0] == "start"] == ["SF1", "SF2"]


def test_sweep_cli_writes_the_jobs_file(tmp_path):
    out = tmp_path / "jobs.txt"
    cli = etrm("sweep", "semi-final", "--decoder", "none", "--nproc", "2", "--out", str(out))
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
    assert all(line.startswith("torchrun --standalone --nproc-per-node 2 -m etrm train") for line in lines)
    assert all(f"--out runs/{name} " in line for line, name in zip(lines, SF_NAMES, strict=True))

    missing = etrm("sweep", "semi-final", "--out", str(tmp_path / "other.txt"))
    assert missing.returncode == 2 and "--decoder" in missing.stderr
    assert not (tmp_path / "other.txt").exists()
