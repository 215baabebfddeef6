"""Does the encoder read the demos? Context spread across puzzles vs across augmentations of one puzzle.

For each context token t, with c[p, a, t] the context of puzzle p under augmentation a:

- within_t = RMS over hidden units of the spread across augmentations of one puzzle
  (standard deviation over a, averaged as variance over puzzles);
- across_t = the same across puzzles (standard deviation over p, averaged over augmentations);
- ratio_t = within_t / across_t.

Both are measured on single contexts, so if the context says nothing about which
puzzle it came from, the two spreads are equal and the ratio is near 1: collapse.
An encoder that captures the puzzle keeps augmentations of one puzzle close
relative to different puzzles (ratio well below 1). A context that does not change
at all (across = 0) is collapse too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from etrm.errors import EtrmError

COLLAPSE_RATIO = 0.9  # ratio at or above this (or no spread across puzzles at all) is collapse
CONSTANT_SPREAD = 1e-6  # across-puzzle spread below this fraction of the context's RMS counts as none


@dataclass
class EncoderStats:
    puzzles: int
    augmentations: int
    rms: np.ndarray  # [context_len] RMS of each context token
    within: np.ndarray  # [context_len]
    across: np.ndarray  # [context_len]

    @property
    def ratio(self) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(
                self.across > 0, self.within / np.where(self.across > 0, self.across, 1.0), np.inf
            )

    @property
    def overall_within(self) -> float:
        return float(np.sqrt(np.mean(self.within**2)))

    @property
    def overall_across(self) -> float:
        return float(np.sqrt(np.mean(self.across**2)))

    @property
    def overall_ratio(self) -> float:
        return self.overall_within / self.overall_across if self.overall_across > 0 else math.inf

    @property
    def constant(self) -> bool:
        """The context hardly changes between puzzles at all."""
        return self.overall_across <= CONSTANT_SPREAD * float(np.sqrt(np.mean(self.rms**2)))

    @property
    def collapsed_tokens(self) -> list[int]:
        return [int(t) for t in np.flatnonzero(~(self.ratio < COLLAPSE_RATIO))]

    @property
    def warning(self) -> str | None:
        if self.constant:
            return "encoder collapse: the context is the same for every puzzle (it ignores the demos)"
        if not self.overall_ratio < COLLAPSE_RATIO:
            return (
                f"encoder collapse: augmentations of one puzzle spread as much as different puzzles "
                f"(ratio {self.overall_ratio:.2f} ≥ {COLLAPSE_RATIO})"
            )
        if self.collapsed_tokens:
            return f"context tokens {self.collapsed_tokens} have collapsed (ratio ≥ {COLLAPSE_RATIO})"
        return None


def context_spread(contexts: np.ndarray) -> EncoderStats:
    """Spreads of contexts shaped [puzzles, augmentations, context_len, hidden]."""
    if contexts.ndim != 4:
        raise ValueError(
            f"contexts must be [puzzles, augmentations, tokens, hidden], got shape {contexts.shape}"
        )
    puzzles, augs = contexts.shape[:2]
    if puzzles < 2 or augs < 2:
        raise EtrmError(
            f"encoder spread needs at least 2 puzzles and 2 augmentations, got {puzzles} and {augs}"
        )
    c = contexts.astype(np.float64)
    within = np.sqrt(c.var(axis=1).mean(axis=(0, 2)))
    across = np.sqrt(c.var(axis=0).mean(axis=(0, 2)))
    rms = np.sqrt((c**2).mean(axis=(0, 1, 3)))
    return EncoderStats(puzzles, augs, rms, within, across)


def collect_contexts(
    encode: Callable[[dict[str, Any]], Any], batches: Iterable[dict[str, Any]], puzzles: int, augs: int
) -> np.ndarray:
    """Run `encode` (batch → context slots [B, n, hidden]) on each (puzzle < puzzles, augmentation < augs)
    once, from evaluation-order batches.

    Batches come from EpisodeSampler(mode="eval"), which lists puzzles in order, so
    reading stops after the last wanted puzzle. Only each puzzle's first query row is
    used: the demos, and so the context, are the same for all its queries.
    """
    import torch

    found: dict[tuple[int, int], np.ndarray] = {}
    with torch.no_grad():
        for batch in batches:
            group, aug = batch["group_ids"], batch["aug_ids"]
            keep = batch["valid"] & (batch["query_ids"] == 0) & (group < puzzles) & (aug < augs)
            rows = torch.nonzero(keep).flatten()
            if len(rows):
                context = encode({k: v[rows] for k, v in batch.items()})
                for row, ctx in zip(rows.tolist(), context.float().cpu().numpy(), strict=True):
                    found[(int(group[row]), int(aug[row]))] = ctx
            if int(group[batch["valid"]].min()) >= puzzles:
                break
    missing = [(p, a) for p in range(puzzles) for a in range(augs) if (p, a) not in found]
    if missing:
        raise EtrmError(f"no episode for (puzzle, augmentation) {missing[:3]} in the evaluation batches")
    return np.stack([np.stack([found[(p, a)] for a in range(augs)]) for p in range(puzzles)])


def encoder_stats(
    path: str,
    data: str | None = None,
    split: str = "test",
    puzzles: int = 32,
    augs: int = 8,
    batch_size: int = 16,
) -> tuple[EncoderStats, dict[str, Any]]:
    """Load a checkpoint, run its encoder on a dataset split's first puzzles; (stats, what was measured)."""
    from etrm.console import make_progress
    from etrm.data.dataset import ArcDataset
    from etrm.data.episodes import EpisodeSampler
    from etrm.runs.checkpoint import load_for_inference

    if puzzles < 2 or augs < 2 or batch_size < 1:
        raise EtrmError(f"--puzzles {puzzles} and --augs {augs} must be at least 2, --batch-size at least 1")
    model, cfg, step = load_for_inference(path)
    data_path = data or cfg.data.path
    dataset_split = ArcDataset.open(data_path).split(split)
    puzzles = min(puzzles, len(dataset_split.puzzle_ids))
    augs = min([augs, *(dataset_split.num_augs(g) for g in range(puzzles))])
    sampler = EpisodeSampler(
        dataset_split, batch_size, mode="eval", max_demos=cfg.data.max_demos, num_aug=augs
    )
    episodes = sum(dataset_split.num_queries(g) for g in range(puzzles)) * augs

    with make_progress(transient=True) as progress:
        task = progress.add_task(
            "encoding", total=math.ceil(episodes / batch_size), info=cfg.arch.encoder_type
        )

        def batches():
            for batch in sampler:
                yield batch
                progress.advance(task)

        # The context slots only: the per-cell vectors of arch.cell_lookup describe the query, not the demos.
        contexts = collect_contexts(lambda batch: model.encoder(batch).slots, batches(), puzzles, augs)
    about = {
        "checkpoint_step": step,
        "encoder_type": cfg.arch.encoder_type,
        "data": str(data_path),
        "split": split,
    }
    return context_spread(contexts), about
