"""What a config's "N epochs" means in plain numbers, for its dataset, before anything trains.

An epoch here makes every pair of every training puzzle the query once (leave-one-out), as the
reference TRM's epoch visits every example of every group once; the public ETRM's epoch is one
episode per group, so ours is (pairs / groups) of its epochs. One optimizer step is one ACT step
over `global_batch_size` rows (halted rows take new episodes), so samples = steps × rows.
"""

from __future__ import annotations

import math
from typing import Any

from etrm.config import RunConfig


def training_budget(cfg: RunConfig, dataset) -> dict[str, Any]:
    """Steps per epoch, total steps, samples and evaluation points of `cfg` on `dataset`."""
    from etrm.data.dataset import first_groups
    from etrm.data.episodes import EpisodeSampler

    t = cfg.train
    split = first_groups(dataset.split("train"), cfg.data.max_train_groups)
    sampler = EpisodeSampler(
        split, batch_size=t.global_batch_size, mode="train", max_demos=cfg.data.max_demos
    )
    steps_per_epoch = len(sampler)
    total_steps = t.epochs * steps_per_epoch
    if t.max_steps:
        total_steps = min(total_steps, t.max_steps)
    eval_every = t.eval_interval * steps_per_epoch
    eval_steps = [0, *range(eval_every, total_steps + 1, eval_every)] if eval_every else []
    groups, episodes = len(split.puzzle_ids), sampler.num_episodes
    public_steps = math.ceil(groups / t.global_batch_size)
    return {
        "train_groups": groups,
        "episodes_per_epoch": episodes,
        "steps_per_epoch": steps_per_epoch,
        "epochs": t.epochs,
        "total_steps": total_steps,
        "samples": total_steps * t.global_batch_size,
        "eval_steps": eval_steps,
        "eval_epochs": [step / steps_per_epoch for step in eval_steps],
        "epoch_vs_reference_trm": (
            f"the same: TRM's epoch also visits every example of every group once ({episodes} rows, "
            f"{steps_per_epoch} steps at batch {t.global_batch_size})"
        ),
        "epoch_vs_public_etrm": (
            f"its epoch is one episode per group ({groups} rows, {public_steps} steps): one epoch here "
            f"= {episodes / groups:.2f} of its epochs"
        ),
    }


def budget_lines(budget: dict[str, Any]) -> list[str]:
    """The budget as lines for a terminal."""
    evals = budget["eval_epochs"]
    shown = ", ".join(f"{e:g}" for e in evals[:8]) + (f", … ({len(evals)} in all)" if len(evals) > 8 else "")
    return [
        f"training groups: {budget['train_groups']}, episodes per epoch: {budget['episodes_per_epoch']}",
        f"steps per epoch: {budget['steps_per_epoch']}, epochs: {budget['epochs']}, "
        f"total optimizer steps: {budget['total_steps']:,}",
        f"samples (ACT steps × rows): {budget['samples']:,}",
        f"evaluations at epochs: {shown or 'none'}",
        f"vs the reference TRM's epoch: {budget['epoch_vs_reference_trm']}",
        f"vs the public ETRM's epoch: {budget['epoch_vs_public_etrm']}",
    ]
