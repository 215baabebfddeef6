"""Run folders under attack: concurrent trainers, foreign folders, corrupt files, divergence, Ctrl-C.

Each test stages what an adversarial pass did to `etrm train`, `eval` and `diagnose` (issue 15):
nothing may be lost, nothing may load silently wrong, and every user error is one line.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from train_helpers import build_tiny_dataset, tiny_config, write_tasks

from etrm.cli import main
from etrm.config import apply_overrides, config_to_dict
from etrm.errors import EtrmError
from etrm.models.losses import ACTLossHead
from etrm.runs.checkpoint import load_weights, save_checkpoint
from etrm.runs.folder import LOCK_FILE, RunLock
from etrm.train.loop import train
from etrm.train.metrics import read_metrics
from etrm.train.optim import AdamATan2
from etrm.train.schedule import lr_factor

PACKAGE = Path(__file__).resolve().parents[1] / "etrm"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_tiny_dataset(tmp_path_factory.mktemp("adversarial-runs-data"))


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """A 2-step run with EMA and a checkpoint of each step; tests that damage it work on a copy."""
    cfg = tiny_config(
        "SF5",
        data,
        "train.max_steps=2",
        "train.epochs=8",
        "train.global_batch_size=16",  # one step per epoch
        "train.checkpoint_interval=1",
        "logging.log_interval=1",
    )
    return cfg, train(cfg, tmp_path_factory.mktemp("finished") / "run", progress=False)


def copy_run(finished, tmp_path) -> Path:
    return Path(shutil.copytree(finished[1], tmp_path / "run"))


def cli(capsys, *args) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `etrm ARGS`."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err: str) -> str:
    """The message of a user error: exactly one line, no traceback."""
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


def config_file(cfg, tmp_path) -> str:
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(config_to_dict(cfg)))
    return str(path)


def patch_loss(monkeypatch, at_call: dict[int, float | type]):
    """At chosen (1-based) calls of the loss head, scale the loss by a number or raise an exception."""
    original = ACTLossHead.forward
    calls = {"n": 0}

    def forward(self, carry, batch):
        calls["n"] += 1
        action = at_call.get(calls["n"], 1.0)
        if isinstance(action, type):
            raise action()
        carry, loss, metrics, outputs, halted = original(self, carry, batch)
        return carry, loss * action, metrics, outputs, halted

    monkeypatch.setattr(ACTLossHead, "forward", forward)


# ---------------------------------------------------------------- the runs/ module


def test_eval_diagnose_and_report_read_runs_through_etrm_runs_never_the_trainer():
    for package in ("eval", "diagnose", "report"):
        for source in (PACKAGE / package).glob("*.py"):
            assert "etrm.train" not in source.read_text(), f"{source} imports the trainer's package"
    assert not (PACKAGE / "train" / "checkpoint.py").exists()


# ---------------------------------------------------------------- locking and folder ownership

HOLD_LOCK = """
import sys, time
from pathlib import Path
from etrm.runs.folder import RunLock
RunLock(Path(sys.argv[1]))
print("locked", flush=True)
time.sleep(120)
"""


def test_a_locked_run_folder_refuses_a_second_trainer_until_the_holder_dies(finished, data, tmp_path):
    cfg, _ = finished
    run = copy_run(finished, tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(HOLD_LOCK), str(run)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        more = apply_overrides(cfg, ["train.max_steps=3"])
        with pytest.raises(EtrmError, match=rf"{re.escape(str(run))} is in use by another `etrm train` "):
            train(more, run, resume=True, progress=False)
        with pytest.raises(EtrmError, match=rf"pid {holder.pid}\)"):
            train(cfg, run, progress=False)
        assert [r["step"] for r in read_metrics(run)] == [1, 2]  # nothing written by the refused runs
    finally:
        holder.kill()
        holder.wait()
    # The kernel dropped the lock with the process: the run continues.
    train(more, run, resume=True, progress=False)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


def test_the_lock_is_held_for_the_whole_training(data, tmp_path, monkeypatch):
    """While a step runs, the folder's lock is taken (checked from inside the training step)."""
    run = tmp_path / "run"
    seen = []
    original = AdamATan2.step

    def step(self, closure=None):
        with pytest.raises(EtrmError, match="is in use by another `etrm train`"):
            RunLock(run)
        seen.append(True)
        return original(self, closure)

    monkeypatch.setattr(AdamATan2, "step", step)
    train(tiny_config("SF5", data, "train.max_steps=2"), run, progress=False)
    assert seen == [True, True]
    RunLock(run).release()  # free again once training returned


def test_fresh_start_refuses_a_folder_that_is_not_a_run(data, tmp_path, capsys):
    cfg = tiny_config("SF5", data, "train.max_steps=1")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": "settings"}')
    (mine / "notes.txt").write_text("keep me")
    code, _, err = cli(capsys, "train", "--config", config_file(cfg, tmp_path), "--out", str(mine))
    assert code == 2
    assert one_line_error(err) == (
        f"error: --out {mine} holds other files and is not a run folder (no run_info.json); "
        f"choose a new or empty folder"
    )
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "notes.txt"]
    assert (mine / "config.json").read_text() == '{"my": "settings"}'

    with pytest.raises(EtrmError, match=r"--out .*notes.txt is a file, not a folder"):
        train(cfg, mine / "notes.txt", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    train(cfg, empty, progress=False)  # an empty folder is fine
    assert (empty / "step-1" / "model.safetensors").is_file()


def test_a_run_stopped_before_its_first_checkpoint_starts_afresh_in_its_folder(
    data, tmp_path, monkeypatch, capsys
):
    cfg = tiny_config("SF5", data, "train.max_steps=2", "logging.log_interval=1")
    run = tmp_path / "run"
    patch_loss(monkeypatch, {2: float("nan")})
    with pytest.raises(EtrmError) as stop:
        train(cfg, run, progress=False)
    assert str(stop.value).endswith(
        f"stopped without saving; no good checkpoint; start afresh in --out {run} (it holds no checkpoint) "
        f"with a lower learning rate, e.g. --set train.lr={cfg.train.lr / 10:g}. Check the data too."
    )
    assert [r.get("event") for r in read_metrics(run)] == [None, "nonfinite_loss"]
    with pytest.raises(EtrmError, match="holds no complete checkpoint"):
        train(cfg, run, resume=True, progress=False)

    monkeypatch.undo()
    capsys.readouterr()
    train(
        apply_overrides(cfg, [f"train.lr={cfg.train.lr / 10:g}"]), run, progress=False
    )  # the advice, followed
    assert f"{run}: starting afresh in it (the run there stopped before its first checkpoint)" in (
        capsys.readouterr().err
    )
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2] and not any("event" in r for r in rows)
    assert rows[0]["train/lr"] == pytest.approx(cfg.train.lr / 10 / cfg.train.lr_warmup_steps)
    with pytest.raises(EtrmError, match="already holds a run; continue it with --resume"):
        train(cfg, run, progress=False)  # with a checkpoint, a fresh start is refused as before


# ---------------------------------------------------------------- metrics.jsonl on resume


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "line 2 is not valid JSON (Expecting property name enclosed in double quotes)"),
        ("[1, 2]", "line 2 is not a metrics row (an object with an integer 'step')"),
        ('"step"', "line 2 is not a metrics row (an object with an integer 'step')"),
    ],
)
def test_resume_refuses_a_corrupt_metrics_line(finished, tmp_path, capsys, bad_line, message):
    run = copy_run(finished, tmp_path)
    metrics = run / "metrics.jsonl"
    first, second = metrics.read_text().splitlines()
    metrics.write_text(f"{first}\n{bad_line}\n{second}\n")
    code, _, err = cli(capsys, "train", "--resume", str(run), "--set", "train.max_steps=3")
    assert code == 2
    assert one_line_error(err) == f"error: {metrics}: {message}"
    assert metrics.read_text() == f"{first}\n{bad_line}\n{second}\n"  # left as it was, for the user to mend


def test_resume_drops_a_torn_last_metrics_line_with_a_warning(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    metrics = run / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"step": 3, "train/lm_lo')  # a kill in the middle of a write
    code, _, err = cli(capsys, "train", "--resume", str(run), "--set", "train.max_steps=3")
    assert code == 0, err
    assert f"warning: {metrics}: last line 3 is truncated (run killed mid-write?); ignored it" in err
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


# ---------------------------------------------------------------- the dataset a run trained on


def rebuild(original: Path, out: Path, seed: int = 0, test_source: Path | None = None) -> Path:
    """A dataset from the sources `original` was built from (its test source swapped when given)."""
    from etrm.data.build import BuildOptions, build_dataset

    sources = original.parent
    test_source = test_source or sources / "src_test"
    build_dataset(
        BuildOptions([str(sources / "src_train")], [str(test_source)], out=out, num_aug=3, seed=seed)
    )
    return out


def test_resume_refuses_another_dataset_naming_what_changed(finished, tmp_path):
    cfg, _ = finished
    run = copy_run(finished, tmp_path)
    moved = shutil.copytree(cfg.data.path, tmp_path / "moved")  # the same dataset elsewhere is fine
    original = Path(cfg.data.path)
    other_seed = rebuild(original, tmp_path / "seed", seed=7)
    write_tasks(tmp_path / "other_tests", "b", 2, seed=5)
    other_tests = rebuild(original, tmp_path / "tests", test_source=tmp_path / "other_tests")

    def resume(data_path):
        train(
            apply_overrides(cfg, [f"data.path={data_path}", "train.max_steps=3"]),
            run,
            resume=True,
            progress=False,
        )

    with pytest.raises(EtrmError) as refusal:
        resume(other_seed)
    changed = "test/aug_colors.npy, test/aug_dihedral.npy, train/aug_colors.npy, train/aug_dihedral.npy"
    assert str(refusal.value) == (
        f"cannot resume {run / 'step-2'}: data.path holds another dataset than the one it trained on: "
        f"seed (0 → 7); files ({changed}) differ (point data.path at the original dataset)"
    )
    with pytest.raises(EtrmError) as refusal:
        resume(other_tests)
    assert str(refusal.value).endswith(
        f"it trained on: sources.test ({original.parent / 'src_test'} → {tmp_path / 'other_tests'}); "
        f"files (test/puzzles.json, test/shapes.npy, test/tokens.npy) "
        f"differ (point data.path at the original dataset)"
    )
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    resume(moved)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]


# ---------------------------------------------------------------- checksums and which weights


def flip_byte(path: Path, from_end: int = 20) -> None:
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0x40
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damaged", ["model.safetensors", "ema.safetensors", "trainer_state.pt", "config.json"]
)
def test_flipped_bytes_are_refused_by_resume_eval_and_diagnose(finished, tmp_path, capsys, damaged):
    run = copy_run(finished, tmp_path)
    path = run / "step-2" / damaged
    flip_byte(path, from_end=4 if damaged == "config.json" else 20)
    expected = f"{path}: corrupt (its sha256 differs from the one checkpoint.json recorded when it was saved)"
    code, _, err = cli(capsys, "train", "--resume", str(run), "--set", "train.max_steps=3")
    assert (code, one_line_error(err)) == (2, f"error: {expected}")
    if damaged != "trainer_state.pt":  # evaluation reads the config and one of the weights files
        use_ema = damaged != "model.safetensors"
        code, _, err = cli(capsys, "eval", str(run), "--num-aug", "1", *([] if use_ema else ["--no-ema"]))
        assert (code, one_line_error(err)) == (2, f"error: {expected}")
        if damaged != "model.safetensors":  # diagnose reads the EMA weights
            code, _, err = cli(capsys, "diagnose", "encoder", str(run), "--puzzles", "2", "--augs", "2")
            assert (code, one_line_error(err)) == (2, f"error: {expected}")
    assert not (run / "step-3").exists()


def test_eval_says_which_weights_it_used(finished, tmp_path, capsys):
    run = copy_run(finished, tmp_path)
    code, _, err = cli(capsys, "eval", str(run), "--num-aug", "1", "--out", str(tmp_path / "e1"))
    assert code == 0, err
    assert f"evaluating the EMA weights of {run / 'step-2'} (step 2)" in err
    code, _, err = cli(capsys, "eval", str(run), "--num-aug", "1", "--no-ema", "--out", str(tmp_path / "e2"))
    assert code == 0 and f"evaluating the raw (not EMA) weights of {run / 'step-2'} (step 2)" in err
    # A run that kept EMA but lost the file is incomplete: no silent fall back to the raw weights.
    (run / "step-2" / "ema.safetensors").unlink()
    code, _, err = cli(capsys, "eval", str(run), "--num-aug", "1", "--out", str(tmp_path / "e3"))
    assert (code, one_line_error(err)) == (
        2,
        f"error: {run / 'step-2'} lacks ema.safetensors although its checkpoint.json records it "
        f"(use --no-ema for the raw weights)",
    )
    # A checkpoint saved without EMA (train.ema=false) is evaluated with its raw weights, and says so.
    raw_cfg = apply_overrides(finished[0], ["train.ema=false"])
    weights = load_weights(run / "step-2" / "model.safetensors")
    no_ema = tmp_path / "raw"
    save_checkpoint(no_ema, 7, weights, None, raw_cfg, {"step": 7}, keep=1)
    code, _, err = cli(capsys, "eval", str(no_ema), "--num-aug", "1", "--out", str(tmp_path / "e4"))
    assert code == 0 and f"evaluating the raw (not EMA) weights of {no_ema / 'step-7'} (step 7)" in err


# ---------------------------------------------------------------- divergence


def checkpoint_every_step(data, *extra):
    """Four steps of one epoch each (a batch of 16 holds the whole tiny set), a checkpoint after every one."""
    return tiny_config(
        "SF5",
        data,
        "train.global_batch_size=16",
        "train.checkpoint_interval=1",
        "train.epochs=4",
        "train.max_steps=4",
        *extra,
    )


def test_a_checkpoint_whose_next_step_diverges_is_never_called_good(data, tmp_path, monkeypatch):
    """Step 1's weights are saved; step 2, computed from them, is NaN: step-1 is not a good checkpoint."""
    cfg = checkpoint_every_step(data)
    patch_loss(monkeypatch, {2: float("nan")})
    run = tmp_path / "run"
    with pytest.raises(EtrmError) as stop:
        train(cfg, run, progress=False)
    assert str(stop.value) == (
        f"non-finite loss (nan) or gradient norm (nan) at step 2 (epoch 2.00) in {run}; stopped without saving; "
        f"no good checkpoint ({run / 'step-1'} holds the weights that gave this); start afresh in a new --out "
        f"with a lower learning rate, e.g. --set train.lr={cfg.train.lr / 10:g}. Check the data too."
    )
    assert "last good" not in str(stop.value)


def test_keeping_one_checkpoint_still_keeps_the_last_good_one(data, tmp_path, monkeypatch):
    """keep_checkpoints=1, a checkpoint every step, step 3 diverges: step-2 gave the NaN, and step-1 (whose
    next step was finite) is still there to resume from; a run that ends keeps just the newest one."""
    cfg = checkpoint_every_step(data, "train.keep_checkpoints=1")
    patch_loss(monkeypatch, {3: float("nan")})
    run = tmp_path / "run"
    with pytest.raises(EtrmError) as stop:
        train(cfg, run, progress=False)
    assert f"the last good checkpoint is {run / 'step-1'}; delete {run / 'step-2'}" in str(stop.value)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-1", "step-2"]
    monkeypatch.undo()
    shutil.rmtree(run / "step-2")
    train(cfg, run, resume=True, progress=False)
    assert sorted(p.name for p in run.glob("step-*")) == ["step-4"]


def test_a_non_finite_optimizer_state_is_never_saved(data, tmp_path, monkeypatch):
    """An unclipped gradient of ~1e25 squares to inf in Adam's second moment: weights and loss stay finite."""
    cfg = tiny_config(
        "SF5",
        data,
        "train.grad_clip=0",
        "train.global_batch_size=16",
        "train.checkpoint_interval=1",
        "train.max_steps=2",
        "train.ema=false",
    )
    patch_loss(monkeypatch, {1: 1e25})
    run = tmp_path / "run"
    with pytest.raises(EtrmError) as stop:
        train(cfg, run, progress=False)
    assert re.match(
        r"non-finite values in optimizer exp_avg_sq of [\w.]+(, optimizer exp_avg_sq of [\w.]+)* after step 1",
        str(stop.value),
    )
    assert str(stop.value).endswith(
        f"no good checkpoint; start afresh in --out {run} (it holds no checkpoint) "
        f"with a lower learning rate, e.g. --set train.lr={cfg.train.lr / 10:g}. Check the data too."
    )
    assert not list(run.glob("step-*"))
    event = read_metrics(run)[-1]
    assert event["event"] == "nonfinite_state" and all("exp_avg_sq" in name for name in event["tensors"])


def test_resume_accepts_optimisation_changes_and_logs_them(finished, tmp_path, capsys, monkeypatch):
    """The stop message's advice works: resume the last good checkpoint with a lower lr (and clip, schedule)."""
    cfg, _ = finished
    run = copy_run(finished, tmp_path)
    patch_loss(monkeypatch, {2: float("nan")})  # step 4, computed from step 3's weights
    with pytest.raises(EtrmError) as stop:
        train(
            apply_overrides(cfg, ["train.max_steps=5", "train.checkpoint_interval=1"]),
            run,
            resume=True,
            progress=False,
        )
    text = str(stop.value)
    assert (
        f"the last good checkpoint is {run / 'step-2'}; delete {run / 'step-3'} (its weights gave this), then resume"
        in text
    )
    suggested = re.search(r"--set (train\.lr=\S+)", text).group(1)
    assert suggested == f"train.lr={cfg.train.lr / 10:g}"
    new_lr = cfg.train.lr / 10
    monkeypatch.undo()
    shutil.rmtree(run / "step-3")
    changes = [suggested, "train.grad_clip=0.5", "train.lr_warmup_steps=1", "train.lr_min_ratio=0.5"]
    args = ["train", "--resume", str(run), "--set", "train.max_steps=4"]
    for change in changes:
        args += ["--set", change]
    code, _, err = cli(capsys, *args)
    assert code == 0, err
    rows = read_metrics(run)
    events = [(r["step"], r["key"], r["old"], r["new"]) for r in rows if r.get("event") == "resume_change"]
    assert events == [
        (3, "train.lr", cfg.train.lr, pytest.approx(new_lr)),
        (3, "train.lr_min_ratio", cfg.train.lr_min_ratio, 0.5),
        (3, "train.lr_warmup_steps", cfg.train.lr_warmup_steps, 1),
        (3, "train.grad_clip", cfg.train.grad_clip, 0.5),
    ]
    lr = {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}
    total_steps = cfg.train.epochs  # one step per epoch
    assert lr[3] == pytest.approx(new_lr * lr_factor(3, 1, total_steps, 0.5))
    assert lr[4] == pytest.approx(new_lr * lr_factor(4, 1, total_steps, 0.5))
    assert [r["step"] for r in rows if "train/lr" in r] == [1, 2, 3, 4]
    with pytest.raises(
        EtrmError, match=r"arch.hidden_size \(16 → 32\)"
    ):  # the function itself may not change
        train(
            apply_overrides(cfg, ["arch.hidden_size=32", "train.max_steps=5"]),
            run,
            resume=True,
            progress=False,
        )


# ---------------------------------------------------------------- CLI checks before anything runs


def test_cli_refuses_an_uneven_nproc_before_launching(data, tmp_path, capsys):
    cfg = tiny_config("SF5", data, "train.max_steps=1")  # global batch 4
    out = tmp_path / "run"
    code, _, err = cli(
        capsys, "train", "--config", config_file(cfg, tmp_path), "--out", str(out), "--nproc", "3"
    )
    assert (code, one_line_error(err)) == (
        2,
        "error: --nproc 3: train.global_batch_size=4 must split evenly over the processes "
        "(choose a divisor of it, or change the batch)",
    )
    assert not out.exists()


def test_cli_refuses_cuda_without_cuda(finished, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code, _, err = cli(capsys, "eval", str(finished[1]), "--device", "cuda", "--num-aug", "1")
    assert (code, one_line_error(err)) == (
        2,
        "error: --device cuda: this machine has 0 CUDA device(s) visible to torch; use --device cpu or auto",
    )


def test_wandb_online_without_an_api_key_is_refused_before_the_run_folder(
    data, tmp_path, capsys, monkeypatch
):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc with a W&B login
    cfg = tiny_config("SF5", data, "train.max_steps=1")
    out = tmp_path / "run"
    args = ["train", "--config", config_file(cfg, tmp_path), "--out", str(out), "--wandb", "online"]
    code, _, err = cli(capsys, *args)
    assert (code, one_line_error(err)) == (
        2,
        "error: logging.wandb=online (--wandb online) needs a W&B API key: run `wandb login` or set "
        "WANDB_API_KEY, or use --wandb offline",
    )
    assert not out.exists()
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    from etrm.train.metrics import check_wandb_login

    (tmp_path / ".netrc").chmod(0o600)
    check_wandb_login(apply_overrides(cfg, ["logging.wandb=online"]))  # a login is enough


# ---------------------------------------------------------------- Ctrl-C


@pytest.mark.parametrize("interrupt_at, kept", [(6, "step-4"), (2, None)])
def test_ctrl_c_says_which_checkpoint_was_kept(data, tmp_path, capsys, monkeypatch, interrupt_at, kept):
    cfg = tiny_config(
        "SF5", data, "train.max_steps=8", "train.checkpoint_interval=1"
    )  # a checkpoint every 4 steps
    patch_loss(monkeypatch, {interrupt_at: KeyboardInterrupt})
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--config", config_file(cfg, tmp_path), "--out", str(run))
    assert code == 130 and "Traceback" not in err
    done = interrupt_at - 1
    if kept:
        line = f"interrupted at step {done}: kept checkpoint {run / kept} (step 4); continue with etrm train --resume {run}"
    else:
        line = f"interrupted at step {done}: no checkpoint was kept in {run}"
    assert line in err
    assert LOCK_FILE in os.listdir(run)
    RunLock(run).release()  # the interrupted run let go of its folder
