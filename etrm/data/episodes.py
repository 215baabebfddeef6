"""Batches of few-shot episodes (demos + one query) drawn from a dataset split.

An episode is a puzzle's demo pairs plus one query input, labelled with the
query output, all under one augmentation of that puzzle. In training every pair
of a training puzzle takes a turn as the query with the others as demos
(leave-one-out); in evaluation each test puzzle's ARC demos are the demos and
each of its ARC test pairs is a query, under every requested augmentation.

Order and randomness depend only on (seed, epoch, global batch index), and ranks
take consecutive slices of each global batch of batch_size * world_size rows, so
a run resumed from state_dict() sees exactly the batches it would have seen.
"""

from __future__ import annotations

import math
import sys

import numpy as np

from etrm.data.augment import NUM_DIHEDRAL, CanvasBank, transformed_shapes
from etrm.data.encoding import CANVAS, IGNORE_LABEL_ID, PAD_TOKEN, SEQ_LEN
from etrm.errors import EtrmError

MODES = ("train", "eval")


class EpisodeSampler:
    """Iterable of batches (dicts of CPU tensors, keys in docs/interfaces.md), one epoch per pass.

    batch_size is the number of rows this rank yields per batch; the global batch is
    batch_size * world_size. num_aug limits the augmentations used per puzzle to the
    first num_aug stored (0 = all). translate (TRM's random canvas offset per pair)
    applies in train mode only. compact batches hold tokens as uint8, labels with PAD
    where the loss ignores a cell: `to_device` casts them on the device (an eighth of the
    bytes to write and to copy). Demos beyond max_demos are dropped (the first ones are
    kept) and missing ones masked. A train epoch visits every (puzzle, query pair) once,
    each under a random augmentation; its last batch is completed from the start of the
    epoch's order. An eval epoch enumerates every (puzzle, query, augmentation) once in a
    fixed order; rows past the end are padding with valid=False.
    """

    def __init__(
        self,
        split,
        batch_size: int,
        mode: str,
        max_demos: int = 10,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        num_aug: int = 0,
        translate: bool = False,
        compact: bool = False,
    ):
        if mode not in MODES:
            raise EtrmError(f"episode mode {mode!r}: choose one of {', '.join(MODES)}")
        if batch_size < 1 or max_demos < 0 or num_aug < 0:
            raise EtrmError(
                f"batch_size {batch_size}, max_demos {max_demos}, num_aug {num_aug}: must be positive"
            )
        if not 0 <= rank < world_size:
            raise EtrmError(f"rank {rank} is outside world_size {world_size}")
        self.split = split
        self.batch_size = batch_size
        self.mode = mode
        self.max_demos = max_demos
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.translate = translate and mode == "train"
        self.epoch = 0
        self.position = 0  # batches of the current epoch already yielded

        self._bank = CanvasBank(split.tokens, split.shapes)
        self.compact = compact
        self._buffers = _BufferPool(np.uint8 if compact else np.int64)
        self._plan_epoch = None
        stored_augs = np.diff(split.aug_offsets)
        self._augs_per_group = np.minimum(stored_augs, num_aug) if num_aug else stored_augs
        pair_counts = np.diff(split.pair_offsets)
        if mode == "train":
            # Every pair of every group is a query once per epoch; local index within its group.
            self._group = np.repeat(np.arange(len(pair_counts)), pair_counts)
            self._local_query = np.arange(len(self._group)) - np.repeat(split.pair_offsets[:-1], pair_counts)
            self._aug = None
        else:
            query_counts = pair_counts - split.num_demos
            per_group = query_counts * self._augs_per_group
            self._group = np.repeat(np.arange(len(per_group)), per_group)
            within = np.arange(len(self._group)) - np.repeat(np.cumsum(per_group) - per_group, per_group)
            augs = self._augs_per_group[self._group]
            self._local_query = split.num_demos[self._group] + within // augs
            self._aug = within % augs
        if len(self._group) == 0:
            raise EtrmError(
                f"the {split.name} split has no {'pairs' if mode == 'train' else 'queries'} to sample"
            )

    @property
    def num_episodes(self) -> int:
        """Episodes in one epoch (over all ranks, without padding)."""
        return len(self._group)

    def __len__(self) -> int:
        return math.ceil(self.num_episodes / (self.batch_size * self.world_size))

    def __iter__(self):
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        while self.position < len(self):
            self.position += 1
            # No local name for the batch: once the caller drops it, its buffers can be reused.
            yield self._batch(self.epoch, self.position - 1)
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "mode": self.mode,
            "seed": self.seed,
            "num_episodes": self.num_episodes,
            "global_batch_size": self.batch_size * self.world_size,
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("mode", "seed", "num_episodes", "global_batch_size"):
            if state.get(key) != mine[key]:
                raise EtrmError(
                    f"sampler state: {key} is {state.get(key)!r} in the checkpoint but {mine[key]!r} now"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def episodes(self, group: np.ndarray, local_query: np.ndarray, aug: np.ndarray) -> dict:
        """A batch of the given (group, pair within the group, augmentation) episodes, built as this
        mode builds them (train: the other pairs are the demos); every row valid, no translation.
        Test-time adaptation draws its leave-one-out episodes over a puzzle's demos with it."""
        return self._assemble(group, local_query, aug, np.ones(len(group), bool), None)

    def _batch(self, epoch: int, index: int) -> dict:
        global_size = self.batch_size * self.world_size
        rows = np.arange(index * global_size, (index + 1) * global_size)[
            self.rank * self.batch_size : (self.rank + 1) * self.batch_size
        ]
        if self.mode == "train":
            order, aug_draw = self._epoch_plan(epoch)
            episodes = order[rows % self.num_episodes]
            valid = np.ones(len(rows), bool)
            group = self._group[episodes]
            aug = (aug_draw[episodes] * self._augs_per_group[group]).astype(np.int64)
        else:
            valid = rows < self.num_episodes
            episodes = np.minimum(rows, self.num_episodes - 1)
            group = self._group[episodes]
            aug = self._aug[episodes]
        offsets_rng = np.random.default_rng([self.seed, epoch, index, self.rank]) if self.translate else None
        return self._assemble(group, self._local_query[episodes], aug, valid, offsets_rng)

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """A train epoch's episode order and one uniform draw per episode (which picks its augmentation)."""
        if self._plan_epoch != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._plan = (rng.permutation(self.num_episodes), rng.random(self.num_episodes))
            self._plan_epoch = epoch
        return self._plan

    def _assemble(self, group, local_query, aug, valid, offsets_rng) -> dict:
        import torch

        split = self.split
        n, slots = len(group), self.max_demos
        first_pair = split.pair_offsets[group]
        if self.mode == "train":
            available = split.pair_offsets[group + 1] - first_pair - 1  # all pairs but the query
            skip = local_query
        else:
            available = split.num_demos[group]
            skip = np.full(n, np.iinfo(np.int64).max)
        slot = np.arange(slots)[None, :]
        demo_mask = slot < available[:, None]
        demo_pairs = first_pair[:, None] + slot + (slot >= skip[:, None])

        # Rows 0..n-1 hold the queries and row n + e * slots + s demo slot s of episode e, so that
        # inputs and demo_inputs are contiguous views of one array; absent demo slots stay zero.
        pairs = np.concatenate([first_pair + local_query, demo_pairs[demo_mask]])
        dest = np.concatenate([np.arange(n), n + np.flatnonzero(demo_mask)])
        aug_row = split.aug_offsets[group] + aug
        row_aug = np.concatenate([aug_row, aug_row[np.nonzero(demo_mask)[0]]])
        dihedral = split.aug_dihedral[row_aug].astype(np.int64)
        colors = split.aug_colors[row_aug]
        offsets = None if offsets_rng is None else self._random_offsets(pairs, dihedral, offsets_rng)
        inputs, outputs = (self._buffers.take(n * (1 + slots), dest) for _ in range(2))
        for side, buffer in ((0, inputs), (1, outputs)):
            self._bank.render_into(
                buffer, dest, (2 * pairs + side) * NUM_DIHEDRAL + dihedral, colors, offsets
            )
        if not self.compact:
            labels = outputs[:n]
            np.putmask(labels, labels == PAD_TOKEN, IGNORE_LABEL_ID)
        inputs, outputs = torch.from_numpy(inputs), torch.from_numpy(outputs)
        return {
            "inputs": inputs[:n],
            "labels": outputs[:n],
            "demo_inputs": inputs[n:].view(n, slots, SEQ_LEN),
            "demo_outputs": outputs[n:].view(n, slots, SEQ_LEN),
            "demo_mask": torch.from_numpy(demo_mask),
            "puzzle_identifiers": torch.from_numpy(split.puzzle_identifiers[aug_row].astype(np.int64)),
            "group_ids": torch.from_numpy(group.astype(np.int64)),
            "aug_ids": torch.from_numpy(aug.astype(np.int64)),
            "query_ids": torch.from_numpy(
                (local_query - (split.num_demos[group] if self.mode == "eval" else 0)).astype(np.int64)
            ),
            "valid": torch.from_numpy(valid),
        }

    def _random_offsets(self, pairs, dihedral, rng) -> np.ndarray:
        """TRM's translation: one random (row, column) shift per pair that keeps both grids on the canvas."""
        split = self.split
        in_shapes = transformed_shapes(split.shapes[2 * pairs].astype(np.int64), dihedral)
        out_shapes = transformed_shapes(split.shapes[2 * pairs + 1].astype(np.int64), dihedral)
        room = CANVAS - np.maximum(in_shapes, out_shapes) + 1
        return (rng.random((len(pairs), 2)) * room).astype(np.int64)


TOKEN_KEYS = ("inputs", "labels", "demo_inputs", "demo_outputs")


def to_device(batch: dict, device, non_blocking: bool = False) -> dict:
    """A batch on `device` as the model takes it: a compact batch's uint8 tokens are widened to
    int64 there, after the copy, and its labels' PAD cells become IGNORE_LABEL_ID."""
    import torch

    out = {k: v.to(device, non_blocking=non_blocking) for k, v in batch.items()}
    if out["inputs"].dtype == torch.uint8:
        for key in TOKEN_KEYS:
            out[key] = out[key].long()
        out["labels"] = out["labels"].masked_fill(out["labels"] == PAD_TOKEN, IGNORE_LABEL_ID)
    return out


class _BufferPool:
    """Token buffers handed out again once no tensor uses them any more.

    Writing into fresh memory costs a page fault per page, which dominated the
    sampler's time. A buffer is reused only when the pool holds the last reference to
    it (every tensor of its batch has been dropped: torch.from_numpy keeps the array
    alive), so a batch the caller still holds is never overwritten; otherwise a new
    buffer is allocated.
    """

    def __init__(self, dtype, capacity: int = 4):
        self.dtype, self.capacity = dtype, capacity
        self._entries: list[list] = []  # [buffer, rows written into it last time]

    def take(self, rows: int, dest: np.ndarray) -> np.ndarray:
        """A [rows, 900] token buffer, zero outside `dest` (rows the caller overwrites)."""
        for entry in self._entries:
            # References: the entry's list slot and getrefcount's argument.
            if entry[0].shape[0] == rows and sys.getrefcount(entry[0]) == 2:
                buffer, written = entry
                stale = np.setdiff1d(written, dest, assume_unique=True)
                buffer[stale] = 0
                entry[1] = dest
                return buffer
        buffer = np.zeros((rows, SEQ_LEN), self.dtype)
        if len(self._entries) < self.capacity:
            self._entries.append([buffer, dest])
        return buffer
