"""The trainer's components on their own: the checkpointer, the metrics window and the spike guard."""

import math
import random

import numpy as np
import pytest
import torch

from etrm.config import get_preset
from etrm.distributed import DistContext
from etrm.errors import EtrmError
from etrm.models.act import Carry
from etrm.runs.checkpoint import complete_checkpoints
from etrm.train.checkpointing import Checkpointer
from etrm.train.ema import EMA
from etrm.train.metrics import MetricsLogger, TrainMetrics, read_metrics
from etrm.train.schedule import SPIKE_MIN_HISTORY, SpikeGuard

CPU = DistContext(0, 1, torch.device("cpu"))
MANIFEST = {"etrm_version": "0.0", "files": {"train.npz": "abc"}}


class Sampler:
    """Stands in for the episode sampler: a position the checkpoint must carry."""

    def __init__(self, position: int = 0):
        self.position = position

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def parts(base_lr: float = 0.1):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=base_lr, momentum=0.9)
    for group in optimizer.param_groups:
        group["base_lr"] = base_lr
    return model, optimizer, EMA(model, 0.5)


def checkpointer(tmp_path, keep: int = 2, base_lr: float = 0.1, ctx: DistContext = CPU):
    cfg = get_preset("cpu-smoke")
    cfg.train.keep_checkpoints = keep
    model, optimizer, ema = parts(base_lr)
    return Checkpointer(tmp_path, cfg, ctx, model, optimizer, ema, MANIFEST)


def take_a_step(ckpt: Checkpointer) -> None:
    ckpt.model(torch.randn(4, 3)).square().sum().backward()
    ckpt.optimizer.step()
    ckpt.optimizer.zero_grad()
    ckpt.ema.update(ckpt.model)


def draws() -> tuple:
    return torch.rand(3).tolist(), random.random(), np.random.rand()


def test_a_checkpoint_restores_weights_optimizer_carry_sampler_and_every_rng(tmp_path):
    saver = checkpointer(tmp_path)
    carry = Carry(
        z_H=torch.randn(2, 5, 4),
        z_L=torch.randn(2, 5, 4),
        steps=torch.tensor([1, 3], dtype=torch.int32),
        halted=torch.tensor([True, False]),
        current_data={"inputs": torch.arange(10).reshape(2, 5)},
        context=None,
    )
    for step in (1, 2, 3):
        take_a_step(saver)
        saver.save(step, step / 4, {"lr_scale": 0.5, "window": {"steps": step}}, carry, Sampler(10 * step))
    # the newest `train.keep_checkpoints` stay; the newest is the one the run holds
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-2", "step-3"]
    assert saver.last == tmp_path / "step-3" and saver.holds(3) and not saver.holds(2)
    expected = draws()

    resumed = checkpointer(tmp_path, base_lr=0.05)  # a resume may change train.lr
    assert not torch.equal(resumed.model.weight, saver.model.weight)
    sampler = Sampler()
    state, restored = resumed.load(tmp_path / "step-3", sampler)
    assert draws() == expected
    assert sampler.position == 30 and resumed.last == tmp_path / "step-3"
    assert (state["step"], state["epoch"], state["world_size"]) == (3, 0.75, 1)
    assert (state["lr_scale"], state["window"]) == (0.5, {"steps": 3})
    for name, value in saver.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], value)
        assert torch.equal(resumed.ema.shadow[name], saver.ema.shadow[name])
    old_state, new_state = saver.optimizer.state_dict(), resumed.optimizer.state_dict()
    for key in old_state["state"]:
        assert torch.equal(
            new_state["state"][key]["momentum_buffer"], old_state["state"][key]["momentum_buffer"]
        )
    assert [g["base_lr"] for g in resumed.optimizer.param_groups] == [0.05]
    for name in ("z_H", "z_L", "steps", "halted"):
        assert torch.equal(getattr(restored, name), getattr(carry, name))
    assert torch.equal(restored.current_data["inputs"], carry.current_data["inputs"])
    assert restored.context is None and restored.context_cells is None


def test_a_checkpoint_of_other_processes_or_weights_is_refused(tmp_path):
    saver = checkpointer(tmp_path)
    saver.save(1, 0.25, {}, None, Sampler())
    two_ranks = checkpointer(tmp_path, ctx=DistContext(0, 2, torch.device("cpu")))
    with pytest.raises(EtrmError, match=r"trained by 1 processes, this run has 2; resume with --nproc 1$"):
        two_ranks.load(tmp_path / "step-1", Sampler())
    other = checkpointer(tmp_path)
    other.model = torch.nn.Linear(3, 5)
    with pytest.raises(EtrmError, match="its weights do not fit the configured model"):
        other.load(tmp_path / "step-1", Sampler())
    _, carry = checkpointer(tmp_path).load(tmp_path / "step-1", Sampler())
    assert carry is None


def test_nonfinite_state_names_the_weights_ema_and_optimizer_tensors(tmp_path):
    ckpt = checkpointer(tmp_path)
    assert ckpt.nonfinite_state() == []
    take_a_step(ckpt)
    assert ckpt.nonfinite_state() == []
    with torch.no_grad():
        ckpt.model.bias[1] = math.nan
    ckpt.ema.shadow["weight"][0, 0] = math.inf
    ckpt.optimizer.state[ckpt.model.weight]["momentum_buffer"][1, 2] = -math.inf
    assert ckpt.nonfinite_state() == ["bias", "ema weight", "optimizer momentum_buffer of weight"]


def test_divergence_advice_names_the_last_good_checkpoint(tmp_path):
    ckpt = checkpointer(tmp_path, keep=5)
    lower = "--set train.lr=" + f"{ckpt.cfg.train.lr / 10:g}"
    assert ckpt.divergence_advice(0) == (
        f"no good checkpoint; start afresh in --out {tmp_path} (it holds no checkpoint) "
        f"with a lower learning rate, e.g. {lower}"
    )
    assert ckpt.kept() == f"no checkpoint was kept in {tmp_path}"
    for step in (2, 4):
        ckpt.save(step, step / 4, {}, None, Sampler())
    # Step 5 diverged: the weights of step-4 gave it, step-2's were still good.
    assert ckpt.divergence_advice(4) == (
        f"the last good checkpoint is {tmp_path / 'step-2'}; delete {tmp_path / 'step-4'} (its weights "
        f"gave this), then resume with a lower learning rate or clip: etrm train --resume {tmp_path} "
        f"{lower} (or train.grad_clip=...)"
    )
    assert ckpt.divergence_advice(6) == (
        f"the last good checkpoint is {tmp_path / 'step-4'}; resume with a lower learning rate or clip: "
        f"etrm train --resume {tmp_path} {lower} (or train.grad_clip=...)"
    )
    assert ckpt.divergence_advice(2) == (
        f"no good checkpoint ({tmp_path / 'step-4'} holds the weights that gave this); start afresh in "
        f"a new --out with a lower learning rate, e.g. {lower}"
    )
    assert ckpt.kept() == (
        f"kept checkpoint {tmp_path / 'step-4'} (step 4); continue with etrm train --resume {tmp_path}"
    )


def step_stats(lm_loss, exact, count, hist, context, loss=0.0):
    """One step's statistics by name, in an order unlike SUM_KEYS (names, never positions, decide)."""
    return {
        "halted_after": hist,
        "context_size": float(context.numel()),
        "context_square_sum": float(context.square().sum()),
        "kl_loss": 0.0,
        "q_continue_loss": 0.5,
        "q_halt_loss": 2 * lm_loss,
        "lm_loss": lm_loss,
        "steps": 3.0 * count,
        "q_halt_accuracy": count,
        "exact_accuracy": exact,
        "accuracy": 0.5 * count,
        "count": count,
        "loss": loss,
    }


def test_the_window_row_averages_named_step_statistics(tmp_path):
    cfg = get_preset("cpu-smoke")
    cfg.logging.wandb = "disabled"
    cfg.train.global_batch_size = 4
    cfg.arch.halt_max_steps = 3
    metrics = TrainMetrics(cfg, steps_per_epoch=8, device=torch.device("cpu"))
    metrics.logger = MetricsLogger(tmp_path, cfg)
    metrics.add_step(
        step_stats(8.0, 1.0, 4.0, [1.0, 0.0, 2.0], torch.full((2, 3), 2.0)),
        {"encoder": 1.0, "inner": 3.0, "total": 5.0},
        lr=1e-4,
    )
    metrics.add_step(
        step_stats(4.0, 2.0, 2.0, [0.0, 1.0, 1.0], torch.full((4,), 4.0)),
        {"encoder": 2.0, "inner": 5.0, "total": 7.0},
        lr=2e-4,
    )
    metrics.log_event(3, "lr_halved", lr_scale=0.5)
    row = metrics.log_window(2, seconds=0.5, prefix_rms=0.25)
    metrics.logger.close()

    assert read_metrics(tmp_path)[0] == {"step": 3, "epoch": 3 / 8, "event": "lr_halved", "lr_scale": 0.5}
    logged = read_metrics(tmp_path)[1]
    assert {k: v for k, v in logged.items() if k != "perf/peak_mem_mb"} == {
        "step": 2,
        "epoch": 0.25,
        # losses per sample: summed over 2 steps of 4 samples
        "train/lm_loss": 12.0 / 8,
        "train/q_halt_loss": 24.0 / 8,
        "train/q_continue_loss": 1.0 / 8,
        "train/kl_loss": 0.0,
        # accuracies per counted query: 6 of them
        "train/accuracy": 3.0 / 6,
        "train/exact_accuracy": 3.0 / 6,
        "train/q_halt_accuracy": 1.0,
        "train/steps": 3.0,
        "train/steps_hist": [1, 1, 3],
        "train/lr": 2e-4,  # the last step's
        "grad/encoder_norm": 1.5,
        "grad/inner_norm": 4.0,
        "grad/total_norm": 6.0,
        "encoder/context_rms": 3.0,  # the mean of the steps' RMS, 2 and 4
        "encoder/prefix_rms": 0.25,
        "perf/samples_per_s": 16.0,
    }
    assert logged["perf/peak_mem_mb"] > 0 and row == logged
    # a new window starts empty
    assert metrics.window.steps == 0 and metrics.window.steps_hist == [0, 0, 0]
    assert set(metrics.window.sums.values()) == {0.0}


def test_the_spike_guard_halves_the_rate_after_a_loss_above_its_recent_mean():
    guard = SpikeGuard(spike_factor=2.0)
    assert [guard.observe(1.0) for _ in range(SPIKE_MIN_HISTORY - 1)] == [None] * (SPIKE_MIN_HISTORY - 1)
    assert guard.observe(5.0) is None  # too little history to judge: only recorded
    assert guard.observe(1.0) is None  # mean 1.4: 1.0 is no spike
    recent = (SPIKE_MIN_HISTORY + 5.0) / (SPIKE_MIN_HISTORY + 1)
    assert guard.observe(3.0) == {"loss": 3.0, "recent_mean": recent, "spike_factor": 2.0, "lr_scale": 0.5}
    assert guard.observe(3.0) is None  # mean 18 / 12 = 1.5: a spike must be over twice that
    assert guard.observe(3.5)["lr_scale"] == 0.25  # mean 21 / 13 ≈ 1.62: halved again
    assert guard.observe(3.2) is None  # mean 24.5 / 14 = 1.75
    assert guard.lr_scale == 0.25 and len(guard.recent_losses) == SPIKE_MIN_HISTORY + 5
    off = SpikeGuard(spike_factor=0.0)
    assert [off.observe(x) for x in [1.0] * 20 + [1e6]] == [None] * 21 and off.lr_scale == 1.0
