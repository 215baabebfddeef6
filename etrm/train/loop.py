"""The ACT training loop: one optimizer step per ACT step, the carry persisting across batches (as TRM).

`train(cfg, out_dir)` is the library entry point (`etrm train` and `etrm quickstart` call it).
Per step: the loss head advances every row of the carry by one ACT step (halted rows take the
next batch's rows), gradients are summed over ranks, measured (encoder / decoder / total norm),
clipped, and the optimizer steps; the puzzle-id table (TRM baseline) gets its sparse sign-SGD
update. `Trainer` owns the step and wires the components that do the rest: where the decoder starts
(`init_decoder`), checkpoints and resume (`checkpointing`), the metrics rows (`metrics`), evaluation
(`evaluation`) and the spike guard (`schedule`).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

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
    broadcast_from_main,
    broadcast_parameters_,
    init_distributed,
    shutdown,
)
from etrm.errors import EtrmError
from etrm.io import atomic_write_json
from etrm.runs import checkpoint as ckpt_io
from etrm.runs.folder import RunLock, claim_run_folder
from etrm.train.checkpointing import (
    Checkpointer,
    check_resume,
    find_start,
    seed_everything,
)
from etrm.train.ema import EMA
from etrm.train.evaluation import TrainingEvaluator
from etrm.train.init_decoder import init_decoder, require_decoder_choice, training_data
from etrm.train.metrics import (
    SUM_KEYS,
    MetricsLogger,
    TrainMetrics,
    Window,
    check_wandb_login,
    sum_over_ranks,
)
from etrm.train.optim import build_optimizer
from etrm.train.schedule import SpikeGuard, lr_factor


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


class Trainer:
    """One run's training: builds the model, optimizer and sampler, takes the steps, and hands
    checkpoints, metrics rows and evaluations to its components."""

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
        start = find_start(run_dir, ctx, resume)

        self.dataset = open_dataset(cfg.data.path)
        if cfg.arch.encoder_type == "puzzle_embedding":
            cfg.arch.num_puzzle_identifiers = int(self.dataset.manifest["num_puzzle_identifiers"])
        self.resume_changes = check_resume(start, cfg, run_dir, self.dataset) if start is not None else []

        seed_everything(t.seed)
        self.model = build_model(cfg.arch).to(ctx.device)
        # The scale of what the context replaces: TRM's puzzle vectors when starting from its checkpoint.
        self.prefix_rms = None
        inherited = {"decoder_provenance": "none", "foreign": False, "datasets": []}
        if start is None:
            inherited, self.prefix_rms = init_decoder(
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
        seed_everything(t.seed + 1 + ctx.rank)

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
        self.spike_guard = SpikeGuard(t.spike_factor)
        self.metrics = TrainMetrics(cfg, self.steps_per_epoch, ctx.device)
        self.checkpointer = Checkpointer(
            run_dir, cfg, ctx, self.model, self.optimizer, self.ema, self.dataset.manifest
        )
        if start is not None:
            self._load(start)
        self.batches = iter(self.sampler)

        self.logger = None  # rank 0's metrics.jsonl (and W&B), written once the checks above passed
        if ctx.is_main:
            self.training_data = training_data(
                cfg, run_dir, self.dataset, inherited, resumed=start is not None
            )
            self.logger = MetricsLogger(run_dir, cfg, resume_step=self.step if start is not None else None)
            self.metrics.logger = self.logger
            self._write_run_info(preset)
        self.evaluator = TrainingEvaluator(
            self.model, self.ema, self.dataset, cfg, ctx, run_dir, self.local_batch, self.metrics
        )
        for key, old, new in self.resume_changes:
            self._log_event("resume_change", key=key, old=old, new=new)

    # ------------------------------------------------------------------ setup

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

    def save(self) -> None:
        """Checkpoint this step; weights or optimizer state that are not finite stop the run instead."""
        nonfinite = self.checkpointer.nonfinite_state()
        if nonfinite:
            self._log_event("nonfinite_state", tensors=nonfinite)
            self._stop_nonfinite(f"non-finite values in {', '.join(nonfinite[:3])} after step {self.step}")
        loop_state = {
            "lr_scale": self.spike_guard.lr_scale,
            "prefix_rms": self.prefix_rms,
            "recent_losses": list(self.spike_guard.recent_losses),
            "window": self.metrics.window.as_state(),
        }
        self.checkpointer.save(
            self.step, self.step / self.steps_per_epoch, loop_state, self.carry, self.sampler
        )

    def _load(self, path: Path) -> None:
        """Continue from `path`: the checkpointer restores what it saved, the loop its own state."""
        state, self.carry = self.checkpointer.load(path, self.sampler)
        self.step = int(state["step"])
        self.spike_guard.lr_scale = float(state["lr_scale"])
        self.spike_guard.recent_losses.extend(state["recent_losses"])
        self.prefix_rms = state["prefix_rms"]
        self.metrics.window = Window(**state["window"])

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
                    self.evaluator.evaluate(self.step)
                while self.step < end:
                    self._train_step()
                    if self.step % self.cfg.logging.log_interval == 0:
                        seconds = time.perf_counter() - window_start
                        row = self.metrics.log_window(self.step, seconds, self._prefix_rms())
                        window_start = time.perf_counter()
                        bar.update(task, completed=self.step, info=_progress_info(row))
                    if eval_every and self.step % eval_every == 0:
                        self.evaluator.evaluate(self.step)
                    if ckpt_every and self.step % ckpt_every == 0:
                        self.save()
                    if deadline is not None and self._past(deadline):
                        break
                    bar.update(task, completed=self.step)
            if not self.checkpointer.holds(self.step):
                self.save()
            self.checkpointer.finish()
        except KeyboardInterrupt:
            self._say_interrupted()
            raise
        finally:
            if self.logger is not None:
                self.logger.close()

    def _say_interrupted(self) -> None:
        """Ctrl-C: say which checkpoint a resume would continue from (the newest complete one)."""
        if self.ctx.is_main:
            err_console.print(f"interrupted at step {self.step}: {self.checkpointer.kept()}", soft_wrap=True)

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
        self.checkpointer.confirm(self.step)
        halved = self.spike_guard.observe(loss_per_sample)
        if halved is not None:
            self._log_event("lr_halved", **halved)

        factor = (
            lr_factor(self.step + 1, t.lr_warmup_steps, self.total_steps, t.lr_min_ratio)
            * self.spike_guard.lr_scale
        )
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
        self.metrics.add_step(stats, norms, t.lr * factor)

    def _step_statistics(self, loss, metrics, outputs) -> dict[str, torch.Tensor]:
        """This rank's step, by name: the loss, the metric sums, the context slots' square-sum and size,
        and how many rows halted after 1, 2, … halt_max_steps ACT steps."""
        halted = self.carry.halted
        hist = torch.bincount(self.carry.steps[halted].long(), minlength=self.cfg.arch.halt_max_steps + 1)
        context = outputs["context"].float()
        return {
            "loss": loss,
            **{k: metrics[k] for k in SUM_KEYS},
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

    def _stop_nonfinite(self, what: str) -> None:
        """Stop with advice that works (the checkpointer knows which saved weights still gave a finite loss)."""
        raise EtrmError(
            f"{what} (epoch {(self.step + 1) / self.steps_per_epoch:.2f}) in {self.run_dir}; "
            f"stopped without saving; {self.checkpointer.divergence_advice(self.step)}. Check the data too."
        )

    def _prefix_rms(self) -> float:
        """The scale of what the context replaces: TRM's trained puzzle vectors when the decoder came
        from a TRM checkpoint, else the decoder's token embeddings (the inputs the prefix sits beside)."""
        if self.prefix_rms is not None:
            return self.prefix_rms
        weight = self.model.decoder.embed_tokens.embedding_weight
        return weight.detach().float().square().mean().sqrt().item()

    def _log_event(self, event: str, **values: Any) -> None:
        """An event of the step being taken (`self.step` + 1)."""
        self.metrics.log_event(self.step + 1, event, **values)


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


def _progress_info(row: dict[str, Any]) -> str:
    return (
        f"epoch {row['epoch']:.2f} loss {row['train/lm_loss']:.4f} "
        f"exact {row['train/exact_accuracy']:.3f} {row['perf/samples_per_s']:.1f} samples/s"
    )


def describe(run_dir: Path) -> str:
    """One line about where a run stands (used by the CLI's final message)."""
    info = json.loads((run_dir / "run_info.json").read_text())
    latest = ckpt_io.complete_checkpoints(run_dir)
    where = latest[-1].name if latest else "no checkpoint"
    return f"{info['name']}: {info['num_params']:,} parameters, {where} in {run_dir}"
