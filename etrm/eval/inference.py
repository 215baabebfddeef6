"""Augmented inference: every (query, augmentation) of a split through all ACT steps, mapped back and voted."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from etrm.eval.predictions import NO_GRID, GridInterner, Predictions, PredictionsBuilder, Shard
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
    ctx: Any = None,
    compile: bool = False,
) -> EvalResult | None:
    """Vote and score `model` on a split: first `num_aug` augmentations (0 = all); identity only without `vote`.

    `dataset` is an `ArcDataset` or its folder. Each batch starts from a fresh carry and
    runs all `halt_max_steps` ACT steps, so nothing carries over between batches or calls.
    With a `DistContext` of several processes every rank must call it; the batches are shared
    out and rank 0 alone gets the result (the others None). `compile` runs the ACT step through
    torch.compile (worth it on CUDA, for a long evaluation).
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
        ctx=ctx,
        compile=compile,
    )
    return None if predictions is None else EvalResult(predictions, ks=ks)


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
    ctx: Any = None,
    compile: bool = False,
) -> Predictions | None:
    """De-augmented predictions and q_halt logits for every (query, augmentation) of `split`
    (or of its puzzles `task_ids` alone).

    With a `DistContext` of several processes each takes its share of the batches and rank 0
    gathers them: it alone returns the predictions (the others None), the same whatever the
    number of processes.
    """
    import torch

    from etrm.console import make_progress
    from etrm.data.dataset import ArcDataset
    from etrm.data.episodes import EpisodeSampler, to_device
    from etrm.distributed import DistContext, gather_to_main

    if isinstance(dataset, (str, os.PathLike)):
        dataset = ArcDataset.open(dataset)
    data = dataset.split(split)
    if task_ids:
        data = data.subset([data.group_index(t) for t in dict.fromkeys(task_ids)])
    # Puzzles without queries (a TRM-split test puzzle's demos on the train side) have nothing to score.
    queries = {g: data.queries(g) for g in range(len(data.puzzle_ids))}
    groups = [g for g, pairs in queries.items() if pairs]
    task_of_group = np.full(len(data.puzzle_ids), -1, dtype=np.int64)
    task_of_group[groups] = np.arange(len(groups))
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ctx = ctx or DistContext(0, 1, device)
    sampler = EpisodeSampler(
        data,
        batch_size,
        mode="eval",
        max_demos=max_demos,
        num_aug=num_aug,
        rank=ctx.rank,
        world_size=ctx.world_size,
        compact=True,
    )
    shard = ShardCollector(data, task_of_group)
    was_training = model.training
    model.eval()
    step_fn = torch.compile(model) if compile else model
    try:
        with torch.inference_mode(), make_progress(transient=True) as bar:
            task = bar.add_task(f"eval {split}", total=len(sampler), info="", visible=progress)
            for batch in sampler:
                batch = to_device(batch, device)
                carry = model.initial_carry(batch)
                for _ in range(model.arch.halt_max_steps):
                    carry, outputs = step_fn(carry, batch)
                shard.add(
                    outputs["logits"].argmax(-1).to(torch.uint8).cpu().numpy(),
                    outputs["q_halt_logits"].float().cpu().numpy(),
                    {k: batch[k].cpu().numpy() for k in ("group_ids", "query_ids", "aug_ids", "valid")},
                )
                bar.advance(task)
    finally:
        model.train(was_training)
    shards = gather_to_main(shard.finish(), ctx)
    if shards is None:
        return None
    builder = PredictionsBuilder(
        [data.puzzle_ids[g] for g in groups],
        [[output for _, output in queries[g]] for g in groups],
        [min(num_aug, data.num_augs(g)) if num_aug else data.num_augs(g) for g in groups],
        meta={"split": split, "fewshot": bool(dataset.manifest.get("fewshot")), "step": step},
    )
    for part in shards:
        builder.add_shard(part)
    return builder.build()


class ShardCollector:
    """One process's predictions, cropped and mapped back to the original frame a batch at a time."""

    def __init__(self, split: Any, task_of_group: np.ndarray) -> None:
        self.split, self.task_of_group = split, task_of_group
        self.grids = GridInterner()
        self.parts: list[tuple[np.ndarray, ...]] = []

    def add(self, tokens: np.ndarray, q_halt: np.ndarray, ids: dict[str, np.ndarray]) -> None:
        """A batch's predicted tokens [B, 900], q_halt logits [B] and row ids (padding rows dropped)."""
        from etrm.data.augment import invert_grids
        from etrm.data.encoding import decode_grids

        valid = ids["valid"].astype(bool)
        if not valid.any():  # the last batch of a rank past the end of the split
            return
        group, aug = ids["group_ids"][valid], ids["aug_ids"][valid]
        rows = self.split.aug_offsets[group] + aug
        colours, shapes = decode_grids(tokens[valid])
        colours, shapes = invert_grids(
            colours, shapes, self.split.aug_dihedral[rows], self.split.aug_colors[rows]
        )
        # Each distinct grid of the batch is interned once: the shape and cells as one row.
        keys = np.concatenate([shapes.astype(np.uint8), colours.reshape(len(colours), -1)], axis=1)
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        ids_of_unique = np.array(
            [
                NO_GRID if h == 0 else self.grids.add(colours[i, :h, :w])
                for i, (h, w) in zip(first, shapes[first], strict=True)
            ],
            dtype=np.int64,
        )
        self.parts.append(
            (
                self.task_of_group[group],
                ids["query_ids"][valid],
                aug,
                ids_of_unique[inverse.reshape(-1)],
                q_halt[valid].astype(np.float32),
            )
        )

    def finish(self) -> Shard:
        empty = (np.zeros(0, np.int64),) * 4 + (np.zeros(0, np.float32),)
        task, query, aug, grid_ids, q_halt = (np.concatenate(c) for c in zip(*self.parts, empty, strict=True))
        return Shard(
            task=task.astype(np.int64),
            query=query.astype(np.int64),
            aug=aug.astype(np.int64),
            grid_ids=grid_ids.astype(np.int64),
            q_halt=q_halt,
            grids=self.grids.table(),
        )
