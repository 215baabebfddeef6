"""Augmented inference: every (query, augmentation) of a split through all ACT steps, mapped back and voted."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from etrm.eval.predictions import Predictions, PredictionsBuilder
from etrm.eval.results import EvalResult
from etrm.eval.voting import KS


def evaluate(
    model: Any,
    dataset: Any,
    split: str = "test",
    *,
    num_aug: int = 0,
    batch_size: int = 64,
    device: Any = None,
    max_demos: int = 10,
    vote: bool = True,
    progress: bool = True,
    step: int | None = None,
    ks: Sequence[int] = KS,
    task_ids: Sequence[str] | None = None,
) -> EvalResult:
    """Vote and score `model` on a split: first `num_aug` augmentations (0 = all); identity only without `vote`.

    `dataset` is an `ArcDataset` or its folder. Each batch starts from a fresh carry and
    runs all `halt_max_steps` ACT steps, so nothing carries over between batches or calls.
    """
    predictions = predict(
        model,
        dataset,
        split,
        num_aug=num_aug if vote else 1,
        batch_size=batch_size,
        device=device,
        max_demos=max_demos,
        progress=progress,
        step=step,
        task_ids=task_ids,
    )
    return EvalResult(predictions, ks=ks)


def predict(
    model: Any,
    dataset: Any,
    split: str = "test",
    *,
    num_aug: int = 0,
    batch_size: int = 64,
    device: Any = None,
    max_demos: int = 10,
    progress: bool = True,
    step: int | None = None,
    task_ids: Sequence[str] | None = None,
) -> Predictions:
    """De-augmented predictions and q_halt logits for every (query, augmentation) of `split`
    (or of its puzzles `task_ids` alone)."""
    import torch

    from etrm.console import make_progress
    from etrm.data.dataset import ArcDataset
    from etrm.data.encoding import decode_grid
    from etrm.data.episodes import EpisodeSampler

    if isinstance(dataset, (str, os.PathLike)):
        dataset = ArcDataset.open(dataset)
    data = dataset.split(split)
    if task_ids:
        data = data.subset([data.group_index(t) for t in dict.fromkeys(task_ids)])
    # Puzzles without queries (a TRM-split test puzzle's demos on the train side) have nothing to score.
    queries = {g: data.queries(g) for g in range(len(data.puzzle_ids))}
    groups = [g for g, pairs in queries.items() if pairs]
    task_of_group = {g: task for task, g in enumerate(groups)}
    builder = PredictionsBuilder(
        [data.puzzle_ids[g] for g in groups],
        [[output for _, output in queries[g]] for g in groups],
        [min(num_aug, data.num_augs(g)) if num_aug else data.num_augs(g) for g in groups],
        meta={"split": split, "fewshot": bool(dataset.manifest.get("fewshot")), "step": step},
    )
    sampler = EpisodeSampler(data, batch_size, mode="eval", max_demos=max_demos, num_aug=num_aug)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), make_progress(transient=True) as bar:
            task = bar.add_task(f"eval {split}", total=len(sampler), info="", visible=progress)
            for batch in sampler:
                batch = {k: v.to(device) for k, v in batch.items()}
                carry = model.initial_carry(batch)
                for _ in range(model.arch.halt_max_steps):
                    carry, outputs = model(carry, batch)
                tokens = outputs["logits"].argmax(-1).cpu().numpy()
                q_halt = outputs["q_halt_logits"].float().cpu().numpy()
                ids = {k: batch[k].cpu().numpy() for k in ("group_ids", "query_ids", "aug_ids", "valid")}
                for row in np.flatnonzero(ids["valid"]):
                    g, a = int(ids["group_ids"][row]), int(ids["aug_ids"][row])
                    grid = decode_grid(tokens[row])
                    builder.add(
                        task_of_group[g],
                        int(ids["query_ids"][row]),
                        a,
                        None if grid is None else data.invert_grid(grid, g, a),
                        float(q_halt[row]),
                    )
                bar.advance(task)
    finally:
        model.train(was_training)
    return builder.build()
