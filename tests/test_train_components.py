"""Optimizer, schedule, EMA, checkpoint files and the metrics log, each against an independent reference."""

import json
import math

import numpy as np
import pytest
import torch

from etrm.config import get_preset
from etrm.errors import EtrmError
from etrm.runs.checkpoint import (
    complete_checkpoints,
    load_trainer_state,
    load_weights,
    remove_partial_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from etrm.train.ema import EMA
from etrm.train.metrics import MetricsLogger, read_metrics, sum_over_ranks
from etrm.train.optim import AdamATan2
from etrm.train.schedule import lr_factor


def reference_adam_atan2(p, grads, lr, beta1, beta2, wd):
    """The reference TRM kernel's update, written out in float64 numpy."""
    p = p.astype(np.float64).copy()
    m = np.zeros_like(p)
    v = np.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        p *= 1 - lr * wd
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p -= lr / (1 - beta1**t) * np.arctan2(m, np.sqrt(v) / np.sqrt(1 - beta2**t))
    return p


def test_adam_atan2_matches_the_reference_formula():
    rng = np.random.default_rng(0)
    p0 = rng.normal(size=(7, 5))
    grads = [rng.normal(size=(7, 5)) * 10.0 ** rng.integers(-6, 2) for _ in range(6)]
    grads[2][0, 0] = 0.0  # atan2(0, 0) = 0: a zero gradient from the start stays a zero step
    param = torch.nn.Parameter(torch.tensor(p0, dtype=torch.float64))
    opt = AdamATan2([param], lr=0.05, betas=(0.9, 0.95), weight_decay=0.1)
    for g in grads:
        param.grad = torch.tensor(g)
        opt.step()
    expected = reference_adam_atan2(p0, grads, 0.05, 0.9, 0.95, 0.1)
    np.testing.assert_allclose(param.detach().numpy(), expected, rtol=1e-12, atol=1e-12)


def test_adam_atan2_pytorch_package_uses_a_different_rule():
    """Why etrm has its own AdamATan2: the PyPI package's defaults give another first step."""
    from adam_atan2_pytorch import AdamAtan2 as PackageAdamAtan2

    mine = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    theirs = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    for p, opt in [
        (mine, AdamATan2([mine], lr=0.1, weight_decay=0)),
        (theirs, PackageAdamAtan2([theirs], lr=0.1)),
    ]:
        p.grad = g.clone()
        opt.step()
    # Reference first step: lr/(1-β1) · atan2((1-β1)g, |g|) per element, a=1, bias correction outside atan2.
    first = -0.1 / 0.1 * torch.atan2(0.1 * g, g.abs())
    torch.testing.assert_close(mine.detach(), first)
    assert not torch.allclose(theirs.detach(), first)


def test_schedule_warmup_then_cosine_to_min_ratio():
    assert lr_factor(1, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(5, 10, 110, 0.1) == pytest.approx(0.5)
    assert lr_factor(10, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 110, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 4.9)))
    assert lr_factor(60, 10, 110, 1.0) == 1.0  # TRM's recipe: constant after warmup
    assert lr_factor(3, 0, 110, 1.0) == 1.0


def test_ema_follows_the_formula_and_leaves_buffers_live():
    model = torch.nn.BatchNorm1d(3)  # has parameters and buffers
    ema = EMA(model, rate=0.9)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expected = 0.9 * (0.9 * w0 + 0.1 * (w0 + 1)) + 0.1 * (w0 + 2)
    torch.testing.assert_close(ema.shadow["weight"], expected)
    model.running_mean.fill_(5.0)
    averaged = ema.averaged_copy(model)
    torch.testing.assert_close(averaged.weight.detach(), expected)
    assert torch.equal(averaged.running_mean, model.running_mean)
    torch.testing.assert_close(model.weight.detach(), w0 + 2)


def test_checkpoints_are_complete_kept_and_loaded_safely(tmp_path):
    cfg = get_preset("cpu-smoke")
    weights = {"a": torch.randn(2, 3), "b": torch.arange(4)}
    for step in (1, 2, 3, 4):
        save_checkpoint(
            tmp_path, step, weights, weights, cfg, {"step": step, "rng": torch.get_rng_state()}, keep=2
        )
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-3", "step-4"]
    # a folder with a missing file (or a temp folder of a killed write) is never picked
    (tmp_path / "step-9").mkdir()
    (tmp_path / ".step-10.tmp-abc").mkdir()
    assert resolve_checkpoint(tmp_path).name == "step-4"
    remove_partial_checkpoints(tmp_path)
    assert not (tmp_path / ".step-10.tmp-abc").exists()
    ckpt = tmp_path / "step-4"
    assert load_trainer_state(ckpt)["step"] == 4
    assert torch.equal(load_weights(ckpt / "model.safetensors")["a"], weights["a"])
    assert json.loads((ckpt / "config.json").read_text())["arch"]["hidden_size"] == 32

    # trainer state that is not plain tensors/containers is refused (weights_only), with the file named
    torch.save({"bad": EMA}, ckpt / "trainer_state.pt")
    with pytest.raises(EtrmError, match="trainer_state.pt"):
        load_trainer_state(ckpt)
    (ckpt / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(EtrmError, match="model.safetensors"):
        load_weights(ckpt / "model.safetensors")
    with pytest.raises(EtrmError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "step-9")
    with pytest.raises(EtrmError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nowhere")


def test_metrics_log_truncates_rows_past_the_resumed_step(tmp_path):
    cfg = get_preset("cpu-smoke")
    cfg.logging.wandb = "disabled"
    log = MetricsLogger(tmp_path, cfg)
    for step in range(1, 6):
        log.log(
            {"step": step, "epoch": step / 2, "train/lm_loss": torch.tensor(1.0 / step), "x": float("nan")}
        )
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "ep')  # a line cut by a kill
    log = MetricsLogger(tmp_path, cfg, resume_step=3)
    log.log({"step": 4, "epoch": 2.0, "event": "lr_halved"})
    log.close()
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[1]["train/lm_loss"] == pytest.approx(0.5) and rows[1]["x"] == "nan"
    assert rows[-1]["event"] == "lr_halved"


def test_wandb_offline_writes_inside_the_run_folder(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = get_preset("cpu-smoke")
    cfg.logging.wandb = "offline"
    run = tmp_path / "run"
    run.mkdir()
    log = MetricsLogger(run, cfg)
    log.log({"step": 1, "epoch": 0.5, "train/lm_loss": 1.0, "train/steps_hist": [1, 2]})
    log.close()
    assert list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert not (cwd / "wandb").exists()
    assert read_metrics(run)[0]["train/steps_hist"] == [1, 2]


def test_step_statistics_are_summed_over_ranks_and_read_back_by_name(monkeypatch):
    from etrm import distributed

    monkeypatch.setattr(distributed.dist, "all_reduce", lambda flat: flat.mul_(2))  # two ranks, equal values
    ctx = distributed.DistContext(rank=0, world_size=2, device=torch.device("cpu"))
    values = {
        "loss": torch.tensor(1.5, requires_grad=True),
        "count": torch.tensor(3),
        "halted_after": torch.tensor([0, 2, 5]),
        "context_size": torch.tensor(0.25, dtype=torch.float64),
    }
    expected = {"loss": 3.0, "count": 6.0, "halted_after": [0.0, 4.0, 10.0], "context_size": 0.5}
    assert sum_over_ranks(values, ctx) == expected
    # A value added in front shifts nothing: each comes back under its own name.
    assert sum_over_ranks({"extra": torch.tensor([7.0, 8.0]), **values}, ctx) == {
        "extra": [14.0, 16.0],
        **expected,
    }
    alone = distributed.DistContext(rank=0, world_size=1, device=torch.device("cpu"))
    assert sum_over_ranks(values, alone) == {
        "loss": 1.5,
        "count": 3.0,
        "halted_after": [0.0, 2.0, 5.0],
        "context_size": 0.25,
    }
