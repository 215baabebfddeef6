"""The ACT training loop: one optimizer step per ACT step, the carry persisting across batches (as TRM).

`train(cfg, out_dir)` is the library entry point (`etrm train` and `etrm quickstart` call it).
Per step: the loss head advances every row of the carry by one ACT step (halted rows take the
next batch's rows), gradients are summed over ranks, measured (encoder / decoder / total norm),
clipped, and the optimizer steps; the puzzle-id table (TRM baseline) gets its sparse sign-SGD
update. Everything a resumed run needs to continue bit for bit goes into each checkpoint.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from etrm import __version__
from etrm.config import RunConfig, apply_overrides, config_to_dict
from etrm.console import err_console, make_progress
from etrm.data.dataset import first_groups
from etrm.data.episodes import to_device
from etrm.distributed import (
    DistContext,
    all_reduce_grads_,
    barrier,
    broadcast_from_main,
    broadcast_parameters_,
    gather_to_main,
    init_distributed,
    shutdown,
)
from etrm.errors import EtrmError
from etrm.io import atomic_write_json
from etrm.runs import checkpoint as ckpt_io
from etrm.runs.folder import RunLock, claim_run_folder
from etrm.train.ema import EMA
from etrm.train.metrics import MetricsLogger, check_wandb_login, sum_over_ranks
from etrm.train.optim import build_optimizer
from etrm.train.schedule import lr_factor

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
SPIKE_WINDOW = 50  # steps in the recent-loss average a spike is compared with
SPIKE_MIN_HISTORY = 10  # no spike test before this many steps
_SUM_KEYS = (
    "count",
    "accuracy",
    "exact_accuracy",
    "q_halt_accuracy",
    "steps",
    "lm_loss",
    "q_halt_loss",
    "q_continue_loss",
    "kl_loss",
)


def train(
    cfg: RunConfig, out_dir: str | Path, *, resume: bool = False, preset: str = "", progress: bool = True
) -> Path:
    """Train as `cfg` says into `out_dir` (continuing its latest checkpoint when `resume`); returns the run folder.

    Stops after `train.epochs`, or earlier at `train.max_steps` steps or `train.max_minutes`
    minutes, and always leaves a checkpoint of the last step.
    """
    ctx = init_distributed()
    lock = None
    try:
        lock = _claim(Path(out_dir), cfg, ctx, resume, preset)
        trainer = Trainer(cfg, Path(out_dir), ctx, resume=resume, preset=preset)
        trainer.run(progress=progress and ctx.is_main)
    finally:
        if lock is not None:
            lock.release()
        shutdown(ctx)
    return Path(out_dir)


def _claim(run_dir: Path, cfg: RunConfig, ctx: DistContext, resume: bool, preset: str) -> RunLock | None:
    """Rank 0 checks what would fail later and locks the run folder; every rank stops on its refusal.
    Nothing is written before these checks pass."""
    lock, refusal = None, None
    if ctx.is_main:
        try:
            if not resume:
                require_decoder_choice(cfg, preset)
            check_wandb_login(cfg)
            lock = claim_run_folder(run_dir, resume=resume)
        except EtrmError as e:
            refusal = str(e)
    refusal = broadcast_from_main(refusal, ctx)
    if refusal is not None:
        raise EtrmError(refusal)
    return lock


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


@dataclass
class Window:
    """Sums over the steps since the last metrics row (identical on every rank: they are all-reduced)."""

    steps: int = 0
    sums: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in _SUM_KEYS})
    steps_hist: list[int] = field(default_factory=list)
    norms: dict[str, float] = field(default_factory=lambda: {"encoder": 0.0, "inner": 0.0, "total": 0.0})
    context_rms: float = 0.0

    def as_state(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class Trainer:
    def __init__(
        self, cfg: RunConfig, run_dir: Path, ctx: DistContext, *, resume: bool = False, preset: str = ""
    ):
        from etrm.data.dataset import open_dataset
        from etrm.data.episodes import EpisodeSampler
        from etrm.models import build_model
        from etrm.models.losses import ACTLossHead

        cfg = apply_overrides(cfg, [])  # a private copy: the dataset fills in fields below
        self.cfg, self.run_dir, self.ctx = cfg, run_dir, ctx
        t = cfg.train
        if t.global_batch_size % ctx.world_size:
            raise EtrmError(
                f"train.global_batch_size={t.global_batch_size} is not divisible by the {ctx.world_size} processes"
            )
        self.local_batch = t.global_batch_size // ctx.world_size
        start = self._find_start(resume)

        self.dataset = open_dataset(cfg.data.path)
        if cfg.arch.encoder_type == "puzzle_embedding":
            cfg.arch.num_puzzle_identifiers = int(self.dataset.manifest["num_puzzle_identifiers"])
        self.resume_changes: list[tuple[str, Any, Any]] = []
        if start is not None:
            self.resume_changes = check_resume_compatible(ckpt_io.load_checkpoint_config(start), cfg, run_dir)
            _check_resumed_data(run_dir, self.dataset)  # a leak names its puzzles: checked first
            check_same_dataset(
                (ckpt_io.checkpoint_meta(start) or {}).get("dataset"), self.dataset.manifest, start
            )

        _seed_everything(t.seed)
        self.model = build_model(cfg.arch).to(ctx.device)
        # The scale of what the context replaces: TRM's puzzle vectors when starting from its checkpoint.
        self.prefix_rms = None
        inherited = {"decoder_provenance": "none", "foreign": False, "datasets": []}
        if start is None:
            inherited, self.prefix_rms = _init_decoder(
                self.model, t.init_from, self.dataset.split("test"), ctx
            )
        broadcast_parameters_(self.model, ctx)
        self.loss_head = ACTLossHead(self.model)
        self.step_fn = _compiled(self.loss_head, t.compile)
        self.optimizer = build_optimizer(self.model, t)
        self.dense_params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.encoder_param_ids = {id(p) for p in self.model.encoder.parameters()}
        self.sparse_table = self.model.encoder if hasattr(self.model.encoder, "take_sparse_grads") else None
        self.ema = EMA(self.model, t.ema_rate) if t.ema else None
        # Each rank explores and samples on its own stream once the shared weights exist.
        _seed_everything(t.seed + 1 + ctx.rank)

        self.sampler = EpisodeSampler(
            first_groups(self.dataset.split("train"), cfg.data.max_train_groups),
            batch_size=self.local_batch,
            mode="train",
            max_demos=cfg.data.max_demos,
            seed=t.seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
            num_aug=cfg.data.num_aug_train,
            translate=cfg.data.translate,
            compact=True,
        )
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = t.epochs * self.steps_per_epoch

        self.step = 0
        self.carry = None
        self.lr_scale = 1.0
        self.recent_losses: collections.deque[float] = collections.deque(maxlen=SPIKE_WINDOW)
        self.window = Window(steps_hist=[0] * cfg.arch.halt_max_steps)
        self.last_checkpoint: Path | None = None
        if start is not None:
            self._load(start)
        self.batches = iter(self.sampler)

        self.logger = None
        if ctx.is_main:
            self.training_data = self._training_data(inherited, resumed=start is not None)
            self.logger = MetricsLogger(run_dir, cfg, resume_step=self.step if start is not None else None)
            self._write_run_info(preset)
        for key, old, new in self.resume_changes:
            self._log_event("resume_change", key=key, old=old, new=new)

    # ------------------------------------------------------------------ setup

    def _find_start(self, resume: bool) -> Path | None:
        """The checkpoint to resume from (None for a fresh run; `claim_run_folder` vetted the folder)."""
        if not resume:
            return None
        if self.ctx.is_main:
            ckpt_io.remove_partial_checkpoints(self.run_dir)
        barrier(self.ctx)
        return ckpt_io.resolve_checkpoint(self.run_dir)

    def _training_data(self, inherited: dict, resumed: bool) -> dict:
        """What this run's weights have seen: the inherited datasets (or, resumed, the run's own record)
        plus the training groups of data.path."""
        from etrm.data.provenance import dataset_record, read_training_data

        if resumed:  # a run from before runs recorded their data: only a decoder from scratch is known
            scratch = self.cfg.train.init_from in ("", "none")
            inherited = read_training_data(self.run_dir) or {
                "decoder_provenance": "none" if scratch else "foreign",
                "foreign": not scratch,
                "datasets": [],
            }
        train_split = first_groups(self.dataset.split("train"), self.cfg.data.max_train_groups)
        own = dataset_record(self.dataset, train_split)
        known = [(d["manifest_sha256"], d["puzzle_ids"]) for d in inherited["datasets"]]
        datasets = inherited["datasets"]
        if (own["manifest_sha256"], own["puzzle_ids"]) not in known:
            datasets = [*datasets, own]
        return {**inherited, "datasets": datasets}

    def _write_run_info(self, preset: str) -> None:
        from etrm.data.provenance import TRAINING_DATA_FILE

        self.run_dir.mkdir(parents=True, exist_ok=True)
        info_file = self.run_dir / "run_info.json"
        if not preset and info_file.is_file():  # a resumed run keeps the preset it started from
            preset = json.loads(info_file.read_text()).get("preset", "")
        atomic_write_json(self.run_dir / "config.json", config_to_dict(self.cfg))
        atomic_write_json(self.run_dir / TRAINING_DATA_FILE, self.training_data)
        data = self.training_data
        encoder_params = sum(p.numel() for p in self.model.encoder.parameters())
        total = sum(p.numel() for p in self.model.parameters())
        atomic_write_json(
            info_file,
            {
                "name": self.cfg.logging.run_name or self.run_dir.name,
                "preset": preset,
                "num_params": total,
                "encoder_params": encoder_params,
                "decoder_params": total - encoder_params,
                # Few-shot only when no weight has seen a test puzzle: every dataset trained on (this
                # one and the decoder's) is a few-shot build and no foreign checkpoint is in the chain.
                "fewshot": not data["foreign"] and all(d["fewshot"] for d in data["datasets"]),
                "decoder_provenance": data["decoder_provenance"],
                "dataset": str(self.cfg.data.path),
                "etrm_version": __version__,
                "world_size": self.ctx.world_size,
            },
        )

    # ------------------------------------------------------------------ checkpoints

    def _rank_state(self) -> dict[str, Any]:
        carry = None
        if self.carry is not None:
            carry = {}
            for f in fields(self.carry):
                value = getattr(self.carry, f.name)
                if isinstance(value, dict):
                    value = {k: v.cpu() for k, v in value.items()}
                elif value is not None:
                    value = value.cpu()
                carry[f.name] = value
        return {"carry": carry, "sampler": self.sampler.state_dict(), "rng": _rng_state()}

    def save(self) -> None:
        """Write step-N/ (rank 0), with every rank's carry, sampler position and RNG state.

        Weights and optimizer state are the same on every rank, so every rank checks them and all
        stop together rather than save a checkpoint that is not finite.
        """
        nonfinite = self._nonfinite_state()
        if nonfinite:
            self._log_event("nonfinite_state", tensors=nonfinite)
            self._stop_nonfinite(f"non-finite values in {', '.join(nonfinite[:3])} after step {self.step}")
        ranks = gather_to_main(self._rank_state(), self.ctx)
        if self.ctx.is_main:
            state = {
                "step": self.step,
                "epoch": self.step / self.steps_per_epoch,
                "world_size": self.ctx.world_size,
                "optimizer": self.optimizer.state_dict(),
                "lr_scale": self.lr_scale,
                "prefix_rms": self.prefix_rms,
                "recent_losses": list(self.recent_losses),
                "window": self.window.as_state(),
                "ranks": ranks,
            }
            ema_state = self.ema.model_state_dict(self.model) if self.ema else None
            self.last_checkpoint = ckpt_io.save_checkpoint(
                self.run_dir,
                self.step,
                self.model.state_dict(),
                ema_state,
                self.cfg,
                state,
                self.cfg.train.keep_checkpoints,
                dataset=manifest_record(self.dataset.manifest),
            )
        # Every rank knows the step saved, so none saves it again at the end while rank 0 has left.
        self.last_checkpoint = broadcast_from_main(self.last_checkpoint, self.ctx)

    def _nonfinite_state(self) -> list[str]:
        """Names of the weights, EMA weights and optimizer-state tensors holding NaN or inf."""
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

    def _load(self, path: Path) -> None:
        from etrm.models import Carry

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
        self.step = int(state["step"])
        self.lr_scale = float(state["lr_scale"])
        self.prefix_rms = state["prefix_rms"]
        self.recent_losses.extend(state["recent_losses"])
        self.window = Window(**state["window"])
        mine = state["ranks"][self.ctx.rank]
        self.sampler.load_state_dict(mine["sampler"])
        _set_rng_state(mine["rng"])
        if mine["carry"] is not None:
            values = {}
            for name, value in mine["carry"].items():
                if isinstance(value, dict):
                    value = {k: v.to(self.ctx.device) for k, v in value.items()}
                elif value is not None:
                    value = value.to(self.ctx.device)
                values[name] = value
            self.carry = Carry(**values)
        self.last_checkpoint = path

    # ------------------------------------------------------------------ the loop

    def run(self, progress: bool = True) -> None:
        t = self.cfg.train
        end = self.total_steps if not t.max_steps else min(t.max_steps, self.total_steps)
        eval_every = t.eval_interval * self.steps_per_epoch
        ckpt_every = (t.checkpoint_interval * self.steps_per_epoch) or eval_every
        deadline = time.monotonic() + t.max_minutes * 60 if t.max_minutes > 0 else None
        self.model.train()
        window_start = time.perf_counter()
        bar = make_progress()
        try:
            with bar if progress else contextlib.nullcontext():
                task = bar.add_task("train", total=end, completed=self.step, info="")
                if eval_every and self.step == 0:  # the untrained model: the curve's first point
                    self._evaluate()
                while self.step < end:
                    self._train_step()
                    if self.step % self.cfg.logging.log_interval == 0:
                        row = self._log_window(time.perf_counter() - window_start)
                        window_start = time.perf_counter()
                        bar.update(task, completed=self.step, info=_progress_info(row))
                    if eval_every and self.step % eval_every == 0:
                        self._evaluate()
                    if ckpt_every and self.step % ckpt_every == 0:
                        self.save()
                    if deadline is not None and self._past(deadline):
                        break
                    bar.update(task, completed=self.step)
            if self.last_checkpoint is None or ckpt_io.checkpoint_step(self.last_checkpoint) != self.step:
                self.save()
        except KeyboardInterrupt:
            self._say_interrupted()
            raise
        finally:
            if self.logger is not None:
                self.logger.close()

    def _say_interrupted(self) -> None:
        """Ctrl-C: say which checkpoint a resume would continue from (the newest complete one)."""
        if not self.ctx.is_main:
            return
        saved = ckpt_io.complete_checkpoints(self.run_dir)
        kept = (
            f"kept checkpoint {saved[-1]} (step {ckpt_io.checkpoint_step(saved[-1])}); "
            f"continue with etrm train --resume {self.run_dir}"
            if saved
            else f"no checkpoint was kept in {self.run_dir}"
        )
        err_console.print(f"interrupted at step {self.step}: {kept}", soft_wrap=True)

    def _past(self, deadline: float) -> bool:
        """All ranks stop together: rank 0's clock decides."""
        return bool(broadcast_from_main(time.monotonic() >= deadline, self.ctx))

    def _next_batch(self) -> dict[str, torch.Tensor]:
        try:
            batch = next(self.batches)
        except StopIteration:
            self.batches = iter(self.sampler)
            batch = next(self.batches)
        return to_device(batch, self.ctx.device, non_blocking=True)

    def _train_step(self) -> None:
        t = self.cfg.train
        batch = self._next_batch()
        if self.carry is None:
            self.carry = self.loss_head.initial_carry(batch)
        self.carry, loss, metrics, outputs, _ = self.step_fn(self.carry, batch)
        (loss / t.global_batch_size).backward()

        # Sum over ranks: gradients (dense and the puzzle-id rows) and this step's statistics.
        all_reduce_grads_(self.dense_params, self.ctx)
        sparse = self.sparse_table.take_sparse_grads() if self.sparse_table is not None else None
        if sparse is not None:
            sparse = _all_gather_rows(sparse, self.ctx)
        stats = sum_over_ranks(self._step_statistics(loss, metrics, outputs), self.ctx)
        norms = self._grad_norms(sparse)

        loss_per_sample = stats["loss"] / t.global_batch_size
        if not (math.isfinite(loss_per_sample) and math.isfinite(norms["total"])):
            self._log_event("nonfinite_loss", loss=loss_per_sample, grad_norm=norms["total"])
            self._stop_nonfinite(
                f"non-finite loss ({loss_per_sample}) or gradient norm ({norms['total']}) at step {self.step + 1}"
            )
        self._check_spike(loss_per_sample)

        factor = lr_factor(self.step + 1, t.lr_warmup_steps, self.total_steps, t.lr_min_ratio) * self.lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        if t.grad_clip > 0 and norms["total"] > t.grad_clip:
            for p in self.dense_params:
                if p.grad is not None:
                    p.grad.mul_(t.grad_clip / (norms["total"] + 1e-6))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if sparse is not None:
            self.sparse_table.sign_sgd_step(
                *sparse, lr=t.puzzle_emb_lr * factor, weight_decay=t.puzzle_emb_weight_decay
            )
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        self._accumulate(stats, norms, factor)

    def _step_statistics(self, loss, metrics, outputs) -> dict[str, torch.Tensor]:
        """This rank's step, by name: the loss, the metric sums, the context slots' square-sum and size,
        and how many rows halted after 1, 2, … halt_max_steps ACT steps."""
        halted = self.carry.halted
        hist = torch.bincount(self.carry.steps[halted].long(), minlength=self.cfg.arch.halt_max_steps + 1)
        context = outputs["context"].float()
        return {
            "loss": loss,
            **{k: metrics[k] for k in _SUM_KEYS},
            "context_square_sum": context.square().sum(),
            "context_size": torch.tensor(float(context.numel())),
            "halted_after": hist[1:],
        }

    def _grad_norms(self, sparse) -> dict[str, float]:
        """Gradient norms after the all-reduce, before clipping: encoder (incl. the puzzle-id rows), decoder, total."""
        sq = {"encoder": 0.0, "inner": 0.0}
        for p in self.dense_params:
            if p.grad is not None:
                part = "encoder" if id(p) in self.encoder_param_ids else "inner"
                sq[part] += p.grad.detach().double().square().sum().item()
        if sparse is not None:
            sq["encoder"] += sparse[1].double().square().sum().item()
        return {
            "encoder": math.sqrt(sq["encoder"]),
            "inner": math.sqrt(sq["inner"]),
            "total": math.sqrt(sq["encoder"] + sq["inner"]),
        }

    def _check_spike(self, loss: float) -> None:
        """A loss over spike_factor × its recent average halves the learning rate from here on."""
        t = self.cfg.train
        if t.spike_factor and len(self.recent_losses) >= SPIKE_MIN_HISTORY:
            recent = sum(self.recent_losses) / len(self.recent_losses)
            if loss > t.spike_factor * recent:
                self.lr_scale *= 0.5
                self._log_event(
                    "lr_halved",
                    loss=loss,
                    recent_mean=recent,
                    spike_factor=t.spike_factor,
                    lr_scale=self.lr_scale,
                )
        self.recent_losses.append(loss)

    def _stop_nonfinite(self, what: str) -> None:
        """Stop with advice that works: resume the last checkpoint whose weights still gave a finite
        loss, or start afresh when there is none."""
        if self.logger is not None:
            self.logger.close()
            self.logger = None
        # A checkpoint of step s is good when step s + 1, computed from its weights, was finite.
        saved = ckpt_io.complete_checkpoints(self.run_dir)
        good = [c for c in saved if ckpt_io.checkpoint_step(c) < self.step]
        bad = [c for c in saved if ckpt_io.checkpoint_step(c) >= self.step]
        lower_lr = f"train.lr={self.cfg.train.lr / 10:g}"
        if good:
            advice = f"the last good checkpoint is {good[-1]}; "
            advice += f"delete {bad[-1]} (its weights gave this), then " if bad else ""
            advice += (
                f"resume with a lower learning rate or clip: "
                f"etrm train --resume {self.run_dir} --set {lower_lr} (or train.grad_clip=...)"
            )
        else:
            held = f" ({bad[-1]} holds the weights that gave this)" if bad else ""
            where = "a new --out" if bad else f"--out {self.run_dir} (it holds no checkpoint)"
            advice = (
                f"no good checkpoint{held}; start afresh in {where} "
                f"with a lower learning rate, e.g. --set {lower_lr}"
            )
        raise EtrmError(
            f"{what} (epoch {(self.step + 1) / self.steps_per_epoch:.2f}) in {self.run_dir}; "
            f"stopped without saving; {advice}. Check the data too."
        )

    def _accumulate(self, stats: dict[str, Any], norms: dict[str, float], factor: float) -> None:
        w = self.window
        for k in _SUM_KEYS:
            w.sums[k] += stats[k]
        w.context_rms += math.sqrt(stats["context_square_sum"] / max(stats["context_size"], 1.0))
        w.steps_hist = [a + int(b) for a, b in zip(w.steps_hist, stats["halted_after"], strict=True)]
        for k in w.norms:
            w.norms[k] += norms[k]
        w.steps += 1
        self.lr_now = self.cfg.train.lr * factor

    def _log_window(self, seconds: float) -> dict[str, Any]:
        w, t = self.window, self.cfg.train
        count = max(w.sums["count"], 1.0)
        per_sample = t.global_batch_size * w.steps
        row: dict[str, Any] = {"step": self.step, "epoch": self.step / self.steps_per_epoch}
        for k in ("lm_loss", "q_halt_loss", "q_continue_loss", "kl_loss"):
            row[f"train/{k}"] = w.sums[k] / per_sample
        for k in ("accuracy", "exact_accuracy", "q_halt_accuracy", "steps"):
            row[f"train/{k}"] = w.sums[k] / count
        row["train/steps_hist"] = list(w.steps_hist)
        row["train/lr"] = self.lr_now
        for k, v in w.norms.items():
            row[f"grad/{k}_norm"] = v / w.steps
        row["encoder/context_rms"] = w.context_rms / w.steps
        row["encoder/prefix_rms"] = (
            self.prefix_rms if self.prefix_rms is not None else _token_embedding_rms(self.model)
        )
        row["perf/samples_per_s"] = per_sample / max(seconds, 1e-9)
        row["perf/peak_mem_mb"] = _peak_memory_mb(self.ctx.device)
        self.window = Window(steps_hist=[0] * self.cfg.arch.halt_max_steps)
        if self.logger is not None:
            self.logger.log(row)
        return row

    def _log_event(self, event: str, **values: Any) -> None:
        if self.logger is not None:
            self.logger.log(
                {
                    "step": self.step + 1,
                    "epoch": (self.step + 1) / self.steps_per_epoch,
                    "event": event,
                    **values,
                }
            )

    def _evaluate(self) -> None:
        """Every rank evaluates its share (the EMA weights when kept) of the test split and of train EM,
        both voted over the same augmentations; rank 0 gathers, writes and logs."""
        from etrm.eval import evaluate

        model = self.ema.averaged_copy(self.model) if self.ema is not None else self.model
        data = _TrainGroupsView(self.dataset, self.cfg.data.max_train_groups)
        common = dict(
            num_aug=self.cfg.train.eval_num_aug,
            batch_size=self.local_batch,
            device=self.ctx.device,
            max_demos=self.cfg.data.max_demos,
            progress=False,
            step=self.step,
            ctx=self.ctx,
        )
        # Evaluation must not move the training RNG streams, or a resumed run would diverge.
        with torch.random.fork_rng(devices=[self.ctx.device] if self.ctx.device.type == "cuda" else []):
            result = evaluate(model, data, "test", **common)
            train = data.split("train")
            has_queries = all(train.num_queries(g) > 0 for g in range(len(train.puzzle_ids)))
            train_em = evaluate(model, data, "train", **common) if has_queries else None
        self.model.train()
        if result is None:  # not rank 0: its share went to rank 0
            return
        from etrm.eval.results import BY_TRAINING

        out = self.run_dir / "eval" / f"step-{self.step}"
        result.predictions.meta["evaluated_by"] = BY_TRAINING
        result.write(out)
        row: dict[str, Any] = {"step": self.step, "epoch": self.step / self.steps_per_epoch}
        row.update(result.metrics_row())
        if train_em is not None:  # a --split trm set has training groups that are all demos
            row["eval/train_em"] = train_em.metrics["train_em"]
            row["eval/train_protocol"] = train_em.protocol
        row["eval/results"] = str((out / "results.json").relative_to(self.run_dir))
        self.logger.log(row)


class _TrainGroupsView:
    """The dataset as training saw it: `split("train")` limited to `max_train_groups` when set."""

    def __init__(self, dataset, max_train_groups: int):
        self._dataset, self._limit = dataset, max_train_groups

    def split(self, name: str):
        split = self._dataset.split(name)
        return first_groups(split, self._limit) if name == "train" else split

    def __getattr__(self, name: str):
        return getattr(self._dataset, name)


def _compiled(loss_head: nn.Module, backend: str):
    """The training step as called: the loss head itself, or torch.compile of it with `backend`."""
    if backend == "off":
        return loss_head
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise EtrmError(
            f"train.compile={backend!r} is not off or a torch.compile backend ({', '.join(known)})"
        )
    return torch.compile(loss_head, backend=backend)


# Presets whose design starts from a pretrained decoder: they need train.init_from set on purpose.
DECODER_PHASES = ("overfit", "semi-final", "final")
FOREIGN_WARNING = (
    "warning: train.init_from={path} is not an etrm run: its training data is unknown (the public TRM "
    "ARC checkpoints were trained on the evaluation puzzles' demos), so this run is not few-shot "
    "(decoder_provenance foreign)"
)


def require_decoder_choice(cfg: RunConfig, preset: str) -> None:
    """The design's overfit, semi-final and final runs start from a pretrained decoder: say which, or none."""
    from etrm.config import PRESETS

    info = PRESETS.get(preset)
    if info is not None and info.phase in DECODER_PHASES and not cfg.train.init_from:
        raise EtrmError(
            f"preset {preset} starts from a pretrained decoder: set train.init_from to an etrm run "
            f"(e.g. one trained with --preset trm) or a TRM checkpoint, or train.init_from=none to train "
            f"the decoder from scratch on purpose"
        )


def _check_resumed_data(run_dir: Path, dataset) -> None:
    """A resumed run may move to another data.path: what it trained on so far must not be in its test split."""
    from etrm.data.provenance import manifest_sha256, read_training_data

    record = read_training_data(run_dir)
    if record is None:
        return
    current = manifest_sha256(dataset.manifest)
    earlier = [d for d in record["datasets"] if d["manifest_sha256"] != current]
    refuse_test_overlap(earlier, dataset.split("test"), f"--resume {run_dir}: the run")


def _init_decoder(
    model: nn.Module, init_from: str, test_split, ctx: DistContext
) -> tuple[dict, float | None]:
    """Start the decoder as train.init_from says; returns (the training data it inherits, prefix RMS).

    "" or "none": from scratch. An etrm run folder or step-N/: its decoder weights (EMA when kept),
    refused if its training data shares a puzzle or grid pair with the test split. Anything else: a
    reference TRM checkpoint, whose training data is unknown (foreign).
    """
    if init_from in ("", "none"):
        return {"decoder_provenance": "none", "foreign": False, "datasets": []}, None
    if (Path(init_from) / ckpt_io.CONFIG_FILE).is_file():
        return _init_decoder_from_etrm(model, Path(init_from), test_split, ctx), None
    prefix_rms = _init_decoder_from_trm(model, init_from, ctx)
    if ctx.is_main:
        err_console.print(FOREIGN_WARNING.format(path=init_from), markup=False, highlight=False)
    return {"decoder_provenance": "foreign", "foreign": True, "datasets": []}, prefix_rms


def _init_decoder_from_etrm(model: nn.Module, path: Path, test_split, ctx: DistContext) -> dict:
    """Load the decoder of an etrm checkpoint (any encoder type); the encoder keeps its init."""
    from etrm.data.provenance import read_training_data

    step_dir = ckpt_io.resolve_checkpoint(path)
    run_dir = step_dir.parent
    weights_file = step_dir / ckpt_io.EMA_FILE
    if not weights_file.is_file():
        weights_file = step_dir / ckpt_io.MODEL_FILE
    decoder = {k: v for k, v in ckpt_io.load_weights(weights_file).items() if k.startswith("decoder.")}
    own = {k: v for k, v in model.state_dict().items() if k.startswith("decoder.")}
    misfits = [k for k in own if k not in decoder or decoder[k].shape != own[k].shape]
    misfits += [k for k in decoder if k not in own]
    if misfits:
        raise EtrmError(
            f"train.init_from={path}: its decoder does not fit this run's arch ({', '.join(misfits[:5])}); "
            f"set the arch.* sizes of {step_dir / ckpt_io.CONFIG_FILE}"
        )
    record = read_training_data(run_dir)
    if record is None:
        if ctx.is_main:
            err_console.print(FOREIGN_WARNING.format(path=path), markup=False, highlight=False)
        record = {"foreign": True, "datasets": []}
    refuse_test_overlap(record["datasets"], test_split, f"train.init_from={path}: its decoder")
    model.load_state_dict(decoder, strict=False)
    name = _run_name(run_dir)
    if ctx.is_main:
        err_console.print(
            f"decoder initialised from etrm run {name} ({weights_file}): {len(decoder)} tensors",
            markup=False,
            highlight=False,
        )
        if record["foreign"]:
            err_console.print(
                f"warning: run {name}'s decoder descends from a checkpoint of unknown training data; "
                f"this run is not few-shot",
                markup=False,
                highlight=False,
            )
    return {
        "decoder_provenance": f"etrm:{name}",
        "foreign": record["foreign"],
        "datasets": record["datasets"],
    }


def refuse_test_overlap(datasets: list[dict], test_split, whose: str) -> None:
    """An error naming the test puzzles that recorded training data shares an id or a grid pair with."""
    from etrm.data.provenance import overlap_with_test_split

    overlap = overlap_with_test_split(datasets, test_split)
    if overlap:
        raise EtrmError(
            f"{whose} was trained on {len(overlap)} puzzle(s) of this run's test split: "
            f"{'; '.join(overlap[:10])}{' ...' if len(overlap) > 10 else ''}; pretrain it on a build "
            f"without them (etrm data build drops them from the training side)"
        )


def _run_name(run_dir: Path) -> str:
    info_file = run_dir / "run_info.json"
    name = json.loads(info_file.read_text()).get("name") if info_file.is_file() else None
    return name or run_dir.name


def _init_decoder_from_trm(model: nn.Module, path: str, ctx: DistContext) -> float | None:
    """Load TRM's weights into the decoder; returns the RMS of TRM's trained puzzle vectors (None if blank)."""
    from etrm.models.trm_checkpoint import PUZZLE_TABLE, init_decoder_from_trm, read_trm_checkpoint

    report = init_decoder_from_trm(model, path)
    if ctx.is_main:
        err_console.print(
            f"decoder initialised from {path}: {len(report.loaded)} tensors loaded, "
            f"{len(report.missing)} left at init (the encoder), dropped: {', '.join(report.dropped) or 'none'}"
        )
    table = read_trm_checkpoint(path).tensors.get(PUZZLE_TABLE)
    if table is None:
        return None
    used = table[table.abs().sum(-1) > 0].float()
    return used.square().mean().sqrt().item() if used.numel() else None


def _all_gather_rows(sparse, ctx: DistContext):
    """(ids, grads) of the puzzle-id rows used on every rank (each rank uses the same number of rows)."""
    if ctx.world_size == 1:
        return sparse
    import torch.distributed as dist

    ids, grads = sparse
    all_ids = [torch.empty_like(ids) for _ in range(ctx.world_size)]
    all_grads = [torch.empty_like(grads) for _ in range(ctx.world_size)]
    dist.all_gather(all_ids, ids)
    dist.all_gather(all_grads, grads)
    return torch.cat(all_ids), torch.cat(all_grads)


def _token_embedding_rms(model: nn.Module) -> float:
    """RMS of the decoder's token-embedding table: the scale of the inputs the prefix sits beside.

    Used as `encoder/prefix_rms` when no TRM checkpoint gave trained puzzle vectors to compare with.
    """
    weight = model.decoder.embed_tokens.embedding_weight
    return weight.detach().float().square().mean().sqrt().item()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _progress_info(row: dict[str, Any]) -> str:
    return (
        f"epoch {row['epoch']:.2f} loss {row['train/lm_loss']:.4f} "
        f"exact {row['train/exact_accuracy']:.3f} {row['perf/samples_per_s']:.1f} samples/s"
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
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


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def describe(run_dir: Path) -> str:
    """One line about where a run stands (used by the CLI's final message)."""
    info = json.loads((run_dir / "run_info.json").read_text())
    latest = ckpt_io.complete_checkpoints(run_dir)
    where = latest[-1].name if latest else "no checkpoint"
    return f"{info['name']}: {info['num_params']:,} parameters, {where} in {run_dir}"
