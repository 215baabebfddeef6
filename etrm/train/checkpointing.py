"""Checkpointing a run so that a resume continues bit for bit, and the checks a resume must pass.

`Checkpointer` writes `step-N/` (through `etrm.runs.checkpoint`, which keeps the newest
`train.keep_checkpoints`, and while training also the last good one): the weights and EMA, the optimizer, the loop's own state and, gathered from
every rank, its ACT carry, sampler position and RNG streams. It names the tensors that are not finite
(the trainer stops rather than save them) and, when a run diverges, which saved checkpoint is the
last good one.
"""

from __future__ import annotations

import random
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from etrm.config import RunConfig, config_to_dict
from etrm.distributed import DistContext, barrier, broadcast_from_main, gather_to_main
from etrm.errors import EtrmError
from etrm.runs import checkpoint as ckpt_io
from etrm.train.ema import EMA
from etrm.train.init_decoder import check_resumed_data

# Optimisation settings a resumed run may change (to continue past a divergence, say): each change
# is logged as a `resume_change` event, since it bends the training curves from that step on.
OPTIMISATION_CHANGES = (
    "train.lr",
    "train.lr_min_ratio",
    "train.lr_warmup_steps",
    "train.grad_clip",
    "train.encoder_lr_scale",
    "train.puzzle_emb_lr",
)
# Config keys a resumed run may change; anything else would make the saved state meaningless.
RESUMABLE_CHANGES = (
    *OPTIMISATION_CHANGES,
    "train.epochs",
    "train.max_steps",
    "train.max_minutes",
    "train.eval_interval",
    "train.eval_num_aug",
    "train.checkpoint_interval",
    "train.keep_checkpoints",
    "train.spike_factor",
    "data.path",
    "logging.project",
    "logging.run_name",
    "logging.wandb",
    "logging.log_interval",
)


def check_resume(start: Path, cfg: RunConfig, run_dir: Path, dataset) -> list[tuple[str, Any, Any]]:
    """Refuse to resume `start` with a config or dataset it cannot continue with; returns the
    optimisation changes (`check_resume_compatible`)."""
    changes = check_resume_compatible(ckpt_io.load_checkpoint_config(start), cfg, run_dir)
    check_resumed_data(run_dir, dataset)  # a leak names its puzzles: checked first
    check_same_dataset((ckpt_io.checkpoint_meta(start) or {}).get("dataset"), dataset.manifest, start)
    return changes


def check_resume_compatible(
    saved: RunConfig, requested: RunConfig, run_dir: Path
) -> list[tuple[str, Any, Any]]:
    """Only optimisation, schedule-length, evaluation, checkpointing and logging settings may change
    on resume; returns the optimisation changes as (key, saved value, requested value)."""
    saved_d, requested_d = config_to_dict(saved), config_to_dict(requested)
    changed = [
        f"{section}.{key}"
        for section, values in saved_d.items()
        for key, value in values.items()
        if requested_d[section][key] != value and f"{section}.{key}" not in RESUMABLE_CHANGES
    ]
    if changed:
        details = ", ".join(f"{k} ({_get(saved_d, k)!r} → {_get(requested_d, k)!r})" for k in changed)
        raise EtrmError(
            f"cannot resume {run_dir}: {details} differ from the run's config; "
            f"only {', '.join(RESUMABLE_CHANGES)} may change (start a new --out instead)"
        )
    return [
        (key, _get(saved_d, key), _get(requested_d, key))
        for key in OPTIMISATION_CHANGES
        if _get(saved_d, key) != _get(requested_d, key)
    ]


def check_same_dataset(recorded: dict[str, Any] | None, manifest: dict[str, Any], checkpoint: Path) -> None:
    """Refuse to resume on a dataset other than the one the checkpoint trained on, naming what changed.

    The data files' checksums decide (a dataset moved elsewhere is the same); the manifest's other
    entries say how it differs.
    """
    current = manifest_record(manifest)
    if recorded is None or recorded.get("files") == current.get("files"):  # None: recorded before etrm did
        return
    changes = []
    # The data files last: what made them differ (sources, seed, …) reads first.
    for key in sorted(set(recorded) | set(current), key=lambda k: (k == "files", k)):
        old, new = recorded.get(key), current.get(key)
        if old == new:
            continue
        if key == "files":
            old, new = old or {}, new or {}
            differ = sorted(name for name in set(old) | set(new) if old.get(name) != new.get(name))
            changes.append(f"files ({', '.join(differ)})")
        elif key == "sources":
            for side in sorted(set(old or {}) | set(new or {})):
                before, after = (d.get(side, []) for d in (old or {}, new or {}))
                if before != after:
                    names = [", ".join(src["spec"] for src in srcs) or "none" for srcs in (before, after)]
                    same = " (same names, other content)" if names[0] == names[1] else ""
                    changes.append(f"sources.{side} ({names[0]} → {names[1]}){same}")
        else:
            changes.append(f"{key} ({old!r} → {new!r})")
    if changes:
        raise EtrmError(
            f"cannot resume {checkpoint}: data.path holds another dataset than the one it trained on: "
            f"{'; '.join(changes)} differ (point data.path at the original dataset)"
        )


def manifest_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records of its dataset: the manifest, less the version of etrm that built it."""
    return {k: v for k, v in manifest.items() if k != "etrm_version"}


def _get(d: dict, dotted: str) -> Any:
    section, key = dotted.split(".")
    return d[section][key]


def find_start(run_dir: Path, ctx: DistContext, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run; `claim_run_folder` vetted the folder)."""
    if not resume:
        return None
    if ctx.is_main:
        ckpt_io.remove_partial_checkpoints(run_dir)
    barrier(ctx)
    return ckpt_io.resolve_checkpoint(run_dir)


class Checkpointer:
    """Saves and restores a run's `step-N/` checkpoints; `last` is the newest one written or resumed.

    `good` is the newest checkpoint known to be good: the step after it, computed from its weights,
    was finite. Pruning down to `train.keep_checkpoints` never deletes it while the run goes on, so a
    divergence right after a save still leaves one checkpoint to resume from."""

    def __init__(
        self,
        run_dir: Path,
        cfg: RunConfig,
        ctx: DistContext,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        ema: EMA | None,
        dataset_manifest: dict[str, Any],
    ):
        self.run_dir, self.cfg, self.ctx = run_dir, cfg, ctx
        self.model, self.optimizer, self.ema = model, optimizer, ema
        self.dataset_record = manifest_record(dataset_manifest)
        self.last: Path | None = None
        self.good: Path | None = None

    def holds(self, step: int) -> bool:
        """Whether the newest checkpoint is of `step` (so the end of a run need not save it again)."""
        return self.last is not None and ckpt_io.checkpoint_step(self.last) == step

    def save(self, step: int, epoch: float, loop_state: dict[str, Any], carry, sampler) -> None:
        """Write step-N/ (rank 0), with every rank's carry, sampler position and RNG state; `loop_state`
        is the trainer's own (learning-rate scale, metrics window, …). Check `nonfinite_state` first."""
        ranks = gather_to_main(_rank_state(carry, sampler), self.ctx)
        if self.ctx.is_main:
            state = {
                "step": step,
                "epoch": epoch,
                "world_size": self.ctx.world_size,
                "optimizer": self.optimizer.state_dict(),
                **loop_state,
                "ranks": ranks,
            }
            ema_state = self.ema.model_state_dict(self.model) if self.ema else None
            self.last = ckpt_io.save_checkpoint(
                self.run_dir,
                step,
                self.model.state_dict(),
                ema_state,
                self.cfg,
                state,
                self.cfg.train.keep_checkpoints,
                dataset=self.dataset_record,
                protect=self.good,
            )
        # Every rank knows the step saved, so none saves it again at the end while rank 0 has left.
        self.last = broadcast_from_main(self.last, self.ctx)

    def confirm(self, step: int) -> None:
        """The step from `step`'s weights was finite: a checkpoint of `step` is good, older ones may go."""
        if self.holds(step):
            self.good = self.last
            if self.ctx.is_main:
                ckpt_io.prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints, protect=self.good)

    def finish(self) -> None:
        """The run ended: keep just the newest `train.keep_checkpoints`."""
        if self.ctx.is_main:
            ckpt_io.prune_checkpoints(self.run_dir, self.cfg.train.keep_checkpoints)

    def nonfinite_state(self) -> list[str]:
        """Names of the weights, EMA weights and optimizer-state tensors holding NaN or inf.

        They are the same on every rank, so every rank checks them and all stop together rather than
        save a checkpoint that is not finite."""
        named = list(self.model.state_dict().items())
        if self.ema is not None:
            named += [(f"ema {k}", v) for k, v in self.ema.shadow.items()]
        names = {id(p): n for n, p in self.model.named_parameters()}
        named += [
            (f"optimizer {key} of {names.get(id(param), '?')}", value)
            for param, state in self.optimizer.state.items()
            for key, value in state.items()
            if torch.is_tensor(value)
        ]
        return [
            name for name, value in named if value.is_floating_point() and not torch.isfinite(value).all()
        ]

    def load(self, path: Path, sampler) -> tuple[dict[str, Any], Any]:
        """Restore the weights, EMA, optimizer, this rank's sampler position and RNG streams from `path`;
        returns the saved state (for the loop's own part) and this rank's ACT carry (None if none)."""
        state = ckpt_io.load_trainer_state(path)
        if state["world_size"] != self.ctx.world_size:
            raise EtrmError(
                f"cannot resume {path}: it was trained by {state['world_size']} processes, "
                f"this run has {self.ctx.world_size}; resume with --nproc {state['world_size']}"
            )
        try:
            self.model.load_state_dict(ckpt_io.load_weights(path / ckpt_io.MODEL_FILE))
            if self.ema is not None:
                self.ema.load_shadow(ckpt_io.load_weights(path / ckpt_io.EMA_FILE))
        except (RuntimeError, KeyError) as e:
            raise EtrmError(
                f"cannot resume {path}: its weights do not fit the configured model ({e})"
            ) from None
        base_lrs = [group["base_lr"] for group in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, base_lr in zip(self.optimizer.param_groups, base_lrs, strict=True):
            group["base_lr"] = base_lr  # the configured rate: a resume may change train.lr
        mine = state["ranks"][self.ctx.rank]
        sampler.load_state_dict(mine["sampler"])
        set_rng_state(mine["rng"])
        self.last = path
        return state, _carry_on(mine["carry"], self.ctx.device)

    def divergence_advice(self, step: int) -> str:
        """What to do after step `step` + 1 diverged: resume the last checkpoint whose weights still gave
        a finite loss, or start afresh when there is none."""
        # A checkpoint of step s is good when step s + 1, computed from its weights, was finite.
        saved = ckpt_io.complete_checkpoints(self.run_dir)
        good = [c for c in saved if ckpt_io.checkpoint_step(c) < step]
        bad = [c for c in saved if ckpt_io.checkpoint_step(c) >= step]
        lower_lr = f"train.lr={self.cfg.train.lr / 10:g}"
        if good:
            advice = f"the last good checkpoint is {good[-1]}; "
            advice += f"delete {bad[-1]} (its weights gave this), then " if bad else ""
            return advice + (
                f"resume with a lower learning rate or clip: "
                f"etrm train --resume {self.run_dir} --set {lower_lr} (or train.grad_clip=...)"
            )
        held = f" ({bad[-1]} holds the weights that gave this)" if bad else ""
        where = "a new --out" if bad else f"--out {self.run_dir} (it holds no checkpoint)"
        return (
            f"no good checkpoint{held}; start afresh in {where} "
            f"with a lower learning rate, e.g. --set {lower_lr}"
        )

    def kept(self) -> str:
        """Which checkpoint a resume would continue from (the newest complete one), in words."""
        saved = ckpt_io.complete_checkpoints(self.run_dir)
        if not saved:
            return f"no checkpoint was kept in {self.run_dir}"
        return (
            f"kept checkpoint {saved[-1]} (step {ckpt_io.checkpoint_step(saved[-1])}); "
            f"continue with etrm train --resume {self.run_dir}"
        )


def _rank_state(carry, sampler) -> dict[str, Any]:
    """What differs between ranks: the ACT carry (on the CPU), the sampler position, the RNG streams."""
    saved = None
    if carry is not None:
        saved = {}
        for f in fields(carry):
            value = getattr(carry, f.name)
            if isinstance(value, dict):
                value = {k: v.cpu() for k, v in value.items()}
            elif value is not None:
                value = value.cpu()
            saved[f.name] = value
    return {"carry": saved, "sampler": sampler.state_dict(), "rng": rng_state()}


def _carry_on(saved: dict[str, Any] | None, device: torch.device):
    """The ACT carry `_rank_state` saved, back on `device`."""
    if saved is None:
        return None
    from etrm.models import Carry

    values = {}
    for name, value in saved.items():
        if isinstance(value, dict):
            value = {k: v.to(device) for k, v in value.items()}
        elif value is not None:
            value = value.to(device)
        values[name] = value
    return Carry(**values)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every RNG the step may draw from, as tensors and plain values (loadable with weights_only)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
