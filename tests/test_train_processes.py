"""Training across processes: torchrun on gloo matches one process; a run killed mid-checkpoint resumes."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from train_helpers import build_tiny_dataset, tiny_config

from etrm.cli import main
from etrm.config import config_to_dict
from etrm.eval.predictions import Predictions
from etrm.runs.checkpoint import load_weights
from etrm.train.loop import train
from etrm.train.metrics import read_metrics


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("train-proc-data"))


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "ETRM_KERNELS": "torch", "WANDB_MODE": "disabled"}


def test_torchrun_two_ranks_match_one_process(data, tmp_path):
    # Deterministic encoder and no exploration: the only difference left is where rows are summed.
    # One epoch is 4 steps: the evaluation at step 4 is shared out over the two processes.
    cfg = tiny_config(
        "SF1",
        data,
        "arch.halt_exploration_prob=0",
        "train.max_steps=4",
        "train.eval_interval=1",
        "train.eval_num_aug=2",
    )
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(config_to_dict(cfg)))
    cmd = [
        sys.executable,
        "-m",
        "etrm",
        "train",
        "--config",
        str(config_file),
        "--out",
        str(tmp_path / "two"),
    ]
    proc = subprocess.run([*cmd, "--nproc", "2"], capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = train(cfg, tmp_path / "one", progress=False)

    assert json.loads((tmp_path / "two" / "run_info.json").read_text())["world_size"] == 2
    a, b = (
        load_weights(one / "step-4" / "model.safetensors"),
        load_weights(tmp_path / "two" / "step-4" / "model.safetensors"),
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)
    moved = sum((a[k] - load_weights(one / "step-4" / "ema.safetensors")[k]).abs().sum() for k in a)
    assert moved > 0  # the weights did train (EMA lags behind them)
    rows_one, rows_two = read_metrics(one), read_metrics(tmp_path / "two")
    # rank 0 alone writes: the evaluations before training (step 0) and at the end, the training rows between
    assert [r["step"] for r in rows_two] == [0, 1, 2, 3, 4, 4]
    train_one, train_two = ([r for r in rows if "train/lm_loss" in r] for rows in (rows_one, rows_two))
    for r1, r2 in zip(train_one, train_two, strict=True):
        for k in ("train/lm_loss", "train/q_halt_loss", "grad/total_norm", "grad/encoder_norm"):
            assert r2[k] == pytest.approx(r1[k], rel=1e-4), k
    evals_one, evals_two = ([r for r in rows if "eval/protocol" in r] for rows in (rows_one, rows_two))
    assert [r["step"] for r in evals_two] == [0, 4]
    for eval_one, eval_two in zip(evals_one, evals_two, strict=True):
        assert eval_two["eval/protocol"] == eval_two["eval/train_protocol"] == "vote@2"
        assert eval_two.keys() == eval_one.keys()
        for k, v in eval_one.items():
            assert eval_two[k] == (pytest.approx(v, rel=1e-4) if isinstance(v, float) else v), k
    # The same votes: the predictions of the two runs' (near-equal) weights agree grid for grid.
    p1, p2 = (
        Predictions.load(run / "eval" / "step-4" / "predictions.npz") for run in (one, tmp_path / "two")
    )
    np.testing.assert_array_equal(p1.grid_ids, p2.grid_ids)
    assert p1.grid_ids.shape == (2, 2)
    # Resuming a 2-process run in one process is refused with the count to use.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "etrm",
            "train",
            "--resume",
            str(tmp_path / "two"),
            "--set",
            "train.max_steps=5",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert proc.returncode == 2 and "trained by 2 processes" in proc.stderr and "--nproc 2" in proc.stderr


KILL_AT_SECOND_CHECKPOINT = """
import os, signal, sys
import safetensors.torch
import torch
from etrm.config import load_config
from etrm.train.loop import train

real_save = safetensors.torch.save_file
calls = []

def save_then_die(tensors, filename, *args, **kwargs):
    real_save(tensors, filename, *args, **kwargs)
    calls.append(filename)
    if len(calls) == 3:  # the second checkpoint's first file is on disk; the folder is not complete
        os.kill(os.getpid(), signal.SIGKILL)

safetensors.torch.save_file = save_then_die
torch.set_num_threads(int(sys.argv[3]))  # as the test process, so the resumed steps compare bit for bit
train(load_config(sys.argv[1]), sys.argv[2], progress=False)
"""


def test_sigkill_mid_checkpoint_resumes_from_the_last_complete_one(data, tmp_path):
    cfg = tiny_config(
        "SF5", data, "train.max_steps=8", "train.checkpoint_interval=1"
    )  # a checkpoint every 4 steps
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(config_to_dict(cfg)))
    run = tmp_path / "run"
    script = textwrap.dedent(KILL_AT_SECOND_CHECKPOINT)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(config_file), str(run), str(torch.get_num_threads())],
        capture_output=True,
        text=True,
        timeout=300,
        env=_env(),
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    assert (run / "step-4").is_dir() and not (run / "step-8").exists()
    assert list(run.glob(".step-8.tmp-*"))  # the half-written checkpoint
    before_kill = {r["step"]: r for r in read_metrics(run)}
    assert sorted(before_kill) == list(range(1, 9))

    train(cfg, run, resume=True, progress=False)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, 9))  # rows past step 4 were replaced, not duplicated
    for r in rows[4:]:
        assert r["train/lm_loss"] == before_kill[r["step"]]["train/lm_loss"]
    assert not list(run.glob(".step-*.tmp-*"))
    assert (run / "step-8" / "trainer_state.pt").is_file()


def test_cli_errors_and_dry_run(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "SF2", "--set", "arch.hiden_size=64"])
    assert exit_info.value.code == 2
    assert "unknown config key 'arch.hiden_size'; did you mean 'arch.hidden_size'?" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(
            [
                "train",
                "--preset",
                "SF2",
                "--set",
                f"data.path={tmp_path / 'none'}",
                "--set",
                "train.init_from=none",
                "--out",
                str(tmp_path / "r"),
            ]
        )
    assert "no dataset there" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["train"])
    assert "give --preset NAME" in capsys.readouterr().err

    main(
        [
            "train",
            "--preset",
            "SF6",
            "--size",
            "cpu-smoke",
            "--set",
            "train.lr=3e-4",
            "--wandb",
            "disabled",
            "--dry-run",
        ]
    )
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["arch"]["encoder_type"] == "standard" and resolved["arch"]["halt_exploration_prob"] == 0.7
    assert resolved["train"]["lr"] == 3e-4 and resolved["logging"]["wandb"] == "disabled"
    assert resolved["arch"]["hidden_size"] == 32


def test_presets_listing(capsys):
    main(["presets", "--json"])
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"E1a", "E1b", "E1d", "E2a", "E2b", "E2c", "SF1", "SF6", "final", "trm", "cpu-smoke"} <= set(rows)
    # The ARC-size TRM has 6,829,058 trainable parameters outside its puzzle-id table.
    assert rows["trm"]["params"] == 6_829_058 and rows["trm"]["encoder_params"] == 0
    assert rows["SF5"]["encoder"] == "standard" and rows["SF5"]["batch"] == 256
    assert rows["SF1"]["params"] == 6_829_058 + rows["SF1"]["encoder_params"]
    assert (rows["SF2"]["project"], rows["SF2"]["run_name"]) == (
        "etrm-semi-final",
        "SF2_hybrid_std_explore0.7",
    )
    assert rows["SF2"]["sources"]["train.lr_min_ratio"] == {"value": 0.1, "source": "our choice"}
    assert "budget" in rows["SF2"]  # null until data/arc-agi-1 is built


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_nodes(*etrm_args):
    """`etrm ARGS` under torchrun as two "machines" of one process each, meeting by c10d rendezvous."""
    endpoint = f"127.0.0.1:{_free_port()}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1"]
    cmd += ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "etrm-test"]
    nodes = [
        subprocess.Popen(
            [*cmd, "-m", "etrm", *etrm_args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]


def test_two_nodes_by_c10d_rendezvous_train_and_evaluate(data, tmp_path):
    cfg = tiny_config("SF1", data, "train.max_steps=4", "train.eval_interval=1", "train.eval_num_aug=2")
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps(config_to_dict(cfg)))
    run = tmp_path / "run"
    outputs = _two_nodes("train", "--config", str(config_file), "--out", str(run))
    assert sum("trained SF1" in out for out in outputs) == 1  # global rank 0 alone reports and writes
    assert json.loads((run / "run_info.json").read_text())["world_size"] == 2
    assert [r["step"] for r in read_metrics(run)] == [0, 1, 2, 3, 4, 4]
    assert read_metrics(run)[-1]["eval/protocol"] == "vote@2"
    # Evaluating the checkpoint over the two nodes writes what one process writes.
    _two_nodes("eval", str(run), "--batch-size", "2", "--out", str(tmp_path / "two"))
    one_process = [
        sys.executable,
        "-m",
        "etrm",
        "eval",
        str(run),
        "--batch-size",
        "2",
        "--out",
        str(tmp_path / "one"),
    ]
    proc = subprocess.run(one_process, capture_output=True, text=True, timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = (tmp_path / name / "predictions.npz" for name in ("one", "two"))
    assert one.read_bytes() == two.read_bytes()
