"""Evaluation during training: the test split and train EM at the step reached, written as
`eval/step-N/` in the run folder and as a metrics row (what `etrm eval` would write for that step)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from etrm.config import RunConfig
from etrm.data.dataset import first_groups
from etrm.distributed import DistContext
from etrm.train.ema import EMA
from etrm.train.metrics import TrainMetrics


class TrainingEvaluator:
    """Every rank evaluates its share (the EMA weights when kept) of the test split and of train EM,
    both voted over the same augmentations; rank 0 gathers, writes and logs."""

    def __init__(
        self,
        model: nn.Module,
        ema: EMA | None,
        dataset,
        cfg: RunConfig,
        ctx: DistContext,
        run_dir: Path,
        batch_size: int,
        metrics: TrainMetrics,
    ):
        self.model, self.ema, self.cfg, self.ctx = model, ema, cfg, ctx
        self.run_dir, self.batch_size, self.metrics = run_dir, batch_size, metrics
        self.data = _TrainGroupsView(dataset, cfg.data.max_train_groups)

    def evaluate(self, step: int) -> None:
        from etrm.eval import evaluate

        model = self.ema.averaged_copy(self.model) if self.ema is not None else self.model
        common = dict(
            num_aug=self.cfg.train.eval_num_aug,
            batch_size=self.batch_size,
            device=self.ctx.device,
            max_demos=self.cfg.data.max_demos,
            progress=False,
            step=step,
            ctx=self.ctx,
        )
        # Evaluation must not move the training RNG streams, or a resumed run would diverge.
        with torch.random.fork_rng(devices=[self.ctx.device] if self.ctx.device.type == "cuda" else []):
            result = evaluate(model, self.data, "test", **common)
            train = self.data.split("train")
            has_queries = all(train.num_queries(g) > 0 for g in range(len(train.puzzle_ids)))
            train_em = evaluate(model, self.data, "train", **common) if has_queries else None
        self.model.train()
        if result is None:  # not rank 0: its share went to rank 0
            return
        from etrm.eval.results import BY_TRAINING

        result.predictions.meta["evaluated_by"] = BY_TRAINING
        values = write_evaluation(result, self.run_dir, step)
        if train_em is not None:  # a --split trm set has training groups that are all demos
            values["eval/train_em"] = train_em.metrics["train_em"]
            values["eval/train_protocol"] = train_em.protocol
        self.metrics.log(step, values)


def write_evaluation(result, run_dir: Path, step: int) -> dict[str, Any]:
    """Write a test evaluation where `etrm report` reads it (`run_dir/eval/step-N/`); returns its
    metrics.jsonl values, the results file's path among them."""
    out = run_dir / "eval" / f"step-{step}"
    result.write(out)
    values: dict[str, Any] = result.metrics_row()
    values["eval/results"] = str((out / "results.json").relative_to(run_dir))
    return values


class _TrainGroupsView:
    """The dataset as training saw it: `split("train")` limited to `max_train_groups` when set."""

    def __init__(self, dataset, max_train_groups: int):
        self._dataset, self._limit = dataset, max_train_groups

    def split(self, name: str):
        split = self._dataset.split(name)
        return first_groups(split, self._limit) if name == "train" else split

    def __getattr__(self, name: str):
        return getattr(self._dataset, name)
