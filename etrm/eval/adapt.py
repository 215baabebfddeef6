"""Test-time adaptation (`etrm eval --adapt`): learn each unseen puzzle from its own demos, then predict.

Per puzzle, the objective is leave-one-out over its demos alone: each demo pair in turn is the
query and the other demos its context, under the augmentations the evaluation votes over (k demos
→ k × augmentations episodes, `batch` of them drawn per step). Adaptation episodes are built from
a split holding the puzzle's demos only, so a query output is never read. The loss is the training
loss head's LM term (stablemax cross-entropy, mean over each sample's labelled cells), summed over
all `halt_max_steps` ACT steps as evaluation runs them; the context is re-encoded at every step so
that its gradient comes from each step (as `arch.encoder_reencode=true` would).

- latent: a learned offset per augmentation on the encoder's context slots, starting at zero (the
  encoder's own context; for puzzle_embedding, the blank id's embedding: a new puzzle embedding
  learned at test time). The model's weights are frozen; per-cell vectors (cell_lookup) stay as encoded.
- finetune: the chosen parameters (encoder, decoder or all) trained on the demos, then restored; or,
  with params "lora", a low-rank delta beside every linear layer (CastedLinear) of the encoder and
  decoder, its up-projection starting at zero (so the model starts as it was), the weights untouched.

A puzzle with a single demo has no leave-one-out episode: it is predicted unadapted and counted.
All adaptation state is dropped after each puzzle, so memory is bounded by one puzzle's copy.
Randomness (which episodes each step draws, the low-rank deltas' start) comes from (seed, puzzle id)
alone, so a puzzle adapts the same whichever rank of a sharded evaluation takes it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from etrm.data.encoding import IGNORE_LABEL_ID
from etrm.errors import EtrmError
from etrm.eval.predictions import NOT_EVALUATED, GridInterner, Predictions
from etrm.eval.results import EvalResult
from etrm.eval.voting import KS
from etrm.models.encoders import EncoderOutput
from etrm.models.layers import CastedLinear
from etrm.models.losses import stablemax_cross_entropy

ADAPT_MODES = ("none", "latent", "finetune")
ADAPT_PARAMS = ("encoder", "decoder", "all", "lora")
# Adam; the latent offset lives on the context's scale, a low-rank delta starts from nothing
DEFAULT_LR = {"latent": 1e-2, "finetune": 1e-4, "lora": 1e-3}
DEFAULT_RANK = 4


@dataclass(frozen=True)
class AdaptOptions:
    mode: str = "none"
    steps: int = 20
    lr: float | None = None  # None: DEFAULT_LR of the mode
    batch: int = 8  # episodes per step
    params: str | None = None  # finetune only; None = all
    seed: int = 0
    rank: int | None = None  # params "lora" only; None = DEFAULT_RANK

    def validate(self) -> AdaptOptions:
        """One line naming the bad option, or these options with the mode's defaults filled in."""
        if self.mode not in ADAPT_MODES:
            raise EtrmError(f"--adapt must be one of {', '.join(ADAPT_MODES)}, got {self.mode!r}")
        if self.steps < 0:
            raise EtrmError(f"--adapt-steps must be ≥ 0, got {self.steps}")
        if self.batch < 1:
            raise EtrmError(f"--adapt-batch must be ≥ 1, got {self.batch}")
        if self.lr is not None and not self.lr > 0:
            raise EtrmError(f"--adapt-lr must be > 0, got {self.lr}")
        if self.params is not None and self.mode != "finetune":
            raise EtrmError(f"--adapt-params goes with --adapt finetune, not --adapt {self.mode}")
        if self.params is not None and self.params not in ADAPT_PARAMS:
            raise EtrmError(f"--adapt-params must be one of {', '.join(ADAPT_PARAMS)}, got {self.params!r}")
        if self.rank is not None and self.params != "lora":
            raise EtrmError("--adapt-rank goes with --adapt finetune --adapt-params lora")
        if self.rank is not None and self.rank < 1:
            raise EtrmError(f"--adapt-rank must be ≥ 1, got {self.rank}")
        if self.mode == "none":
            return self
        params = (self.params or "all") if self.mode == "finetune" else None
        lora = params == "lora"
        return replace(
            self,
            lr=self.lr or DEFAULT_LR["lora" if lora else self.mode],
            params=params,
            rank=(self.rank or DEFAULT_RANK) if lora else None,
        )


@dataclass
class PuzzleAdaptation:
    """One puzzle's adapted predictions and what adapting it cost."""

    predictions: Predictions
    seconds: float  # adaptation alone, without the prediction
    skipped: bool  # a single demo: predicted unadapted
    losses: list[float]  # the objective before each step and after the last (empty when skipped)


def demo_split(split, g: int):
    """A one-puzzle Split holding group g's demos only (its queries are not in it) and augmentations."""
    from etrm.data.dataset import Split

    one = split.subset([g])
    k = int(one.num_demos[0])
    arrays = {
        "tokens": one.tokens[: 2 * k],
        "shapes": one.shapes[: 2 * k],
        "pair_offsets": np.array([0, k], dtype=np.int64),
        "num_demos": one.num_demos,
        "aug_offsets": one.aug_offsets,
        "aug_dihedral": one.aug_dihedral,
        "aug_colors": one.aug_colors,
        "puzzle_identifiers": one.puzzle_identifiers,
    }
    return Split(split.name, [{"id": one.puzzle_ids[0], "source": one.puzzle_sources[0]}], arrays)


class DemoObjective:
    """The leave-one-out LM loss on one puzzle's demos, over episodes drawn with a seeded generator."""

    def __init__(self, split, g: int, num_aug: int, max_demos: int, batch: int, seed: int, device):
        from etrm.data.augment import task_seed
        from etrm.data.episodes import EpisodeSampler

        demos = demo_split(split, g)
        self.num_demos = int(demos.num_demos[0])
        self.num_augs = min(num_aug, demos.num_augs(0)) if num_aug else demos.num_augs(0)
        self.sampler = EpisodeSampler(demos, batch, mode="train", max_demos=max_demos)
        self.batch = batch
        self.device = device
        self.seed = task_seed(seed, split.puzzle_ids[g])
        self.rng = np.random.default_rng(self.seed)

    def draw(self) -> dict:
        """`batch` distinct (demo as query, augmentation) episodes (all of them when there are fewer)."""
        total = self.num_demos * self.num_augs
        picked = self.rng.choice(total, size=min(self.batch, total), replace=False)
        episodes = self.sampler.episodes(
            np.zeros(len(picked), np.int64), picked // self.num_augs, picked % self.num_augs
        )
        return {k: v.to(self.device) for k, v in episodes.items()}

    @staticmethod
    def loss(model, batch: dict, backward: bool) -> float:
        """Σ over ACT steps of the mean per-sample LM loss; with `backward`, its gradient accumulated
        step by step (the carry is detached between steps, so each step's graph is freed at once)."""
        total = 0.0
        carry = model.initial_carry(batch)
        for _ in range(model.arch.halt_max_steps):
            carry.context = carry.context_cells = None  # re-encode: the context's gradient from every step
            carry, outputs = model(carry, batch)
            labels = carry.current_data["labels"]
            per_cell = stablemax_cross_entropy(outputs["logits"], labels)
            labelled = (labels != IGNORE_LABEL_ID).sum(-1).clamp_min(1)
            step_loss = (per_cell.sum(-1) / labelled).mean()
            if backward:
                step_loss.backward()
            total += float(step_loss.detach())
            del outputs
        return total


class ContextOffset(nn.Module):
    """The model's encoder with a learned offset per augmentation added to its context slots (zero at first)."""

    def __init__(self, encoder: nn.Module, num_augs: int, probe: dict):
        super().__init__()
        self.encoder = encoder
        with torch.no_grad():
            slots = encoder(probe).slots
        self.offsets = nn.Parameter(torch.zeros(num_augs, *slots.shape[1:], device=slots.device))

    def forward(self, batch: dict) -> EncoderOutput:
        out = self.encoder(batch)
        return replace(out, slots=out.slots + self.offsets[batch["aug_ids"]].to(out.slots.dtype))


class LowRankDelta(nn.Module):
    """x ↦ (x Aᵀ) Bᵀ beside a linear layer of weight [out, in]: a rank-r change to its output. A is
    random (drawn from `generator`), B zero, so the layer starts exactly as it was."""

    def __init__(self, linear: CastedLinear, rank: int, generator: torch.Generator):
        super().__init__()
        out_features, in_features = linear.weight.shape
        down = torch.randn(rank, in_features, generator=generator) / math.sqrt(in_features)
        self.down = nn.Parameter(down.to(linear.weight.device))
        self.up = nn.Parameter(torch.zeros(out_features, rank, device=linear.weight.device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down.to(x.dtype)), self.up.to(x.dtype))


def attach_low_rank(model: nn.Module, rank: int, seed) -> tuple[list[LowRankDelta], Callable[[], None]]:
    """A LowRankDelta added to the output of every CastedLinear of `model` (by a forward hook; the
    weights are not touched), and a function that detaches them all."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence(seed).generate_state(1)[0]))
    deltas, handles = [], []
    for linear in [m for m in model.modules() if isinstance(m, CastedLinear)]:
        delta = LowRankDelta(linear, rank, generator)
        handles.append(linear.register_forward_hook(lambda _m, args, out, d=delta: out + d(args[0])))
        deltas.append(delta)

    def detach():
        for handle in handles:
            handle.remove()

    return deltas, detach


@contextlib.contextmanager
def adapted(model, objective: DemoObjective, options: AdaptOptions):
    """The model adapted to one puzzle for the `with` body (the objective's values as its target); on
    exit its encoder and weights are as they were and every adaptation tensor is dropped."""
    losses: list[float] = []
    trainable, restore = _prepare(model, objective, options)
    try:
        optimizer = torch.optim.Adam(trainable, lr=options.lr)
        for _ in range(options.steps):
            optimizer.zero_grad(set_to_none=True)
            losses.append(objective.loss(model, objective.draw(), backward=True))
            optimizer.step()
        del optimizer
        with torch.no_grad():
            losses.append(objective.loss(model, objective.draw(), backward=False))
        yield losses
    finally:
        restore()


def _prepare(model, objective: DemoObjective, options: AdaptOptions):
    """(parameters to train, a function that undoes the adaptation)."""
    frozen = {p: p.requires_grad for p in model.parameters()}
    model.requires_grad_(False)

    def unfreeze():
        for p, flag in frozen.items():
            p.requires_grad_(flag)

    if options.mode == "latent":
        encoder = model.encoder
        offset = ContextOffset(encoder, objective.num_augs, objective.draw())
        model.encoder = offset

        def restore():
            model.encoder = encoder
            unfreeze()

        return [offset.offsets], restore
    if options.params == "lora":
        deltas, detach = attach_low_rank(model, options.rank, objective.seed)

        def restore():
            detach()
            unfreeze()

        return [p for d in deltas for p in d.parameters()], restore
    chosen = {"encoder": model.encoder, "decoder": model.decoder, "all": model}[options.params]
    params = list(chosen.parameters())
    if not params:
        unfreeze()
        raise EtrmError(
            f"--adapt-params {options.params}: this model's {options.params} has no parameters "
            "(the puzzle_embedding baseline keeps its table as a buffer); use --adapt latent"
        )
    saved = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)

    def restore():
        with torch.no_grad():
            for p, value in zip(params, saved, strict=True):
                p.copy_(value)
                p.grad = None
        saved.clear()
        unfreeze()

    return params, restore


def adapt_and_predict(
    model,
    dataset,
    split: str,
    g: int,
    options: AdaptOptions,
    *,
    num_aug: int,
    batch_size: int,
    device,
    max_demos: int,
    step: int | None,
) -> PuzzleAdaptation:
    """Adapt to puzzle g of `split` on its demos, then predict its queries × augmentations.

    One puzzle's unit of work: a sharded evaluation can hand each rank its own puzzles."""
    from etrm.eval.inference import predict

    data = dataset.split(split)
    task_id = data.puzzle_ids[g]

    def run_predict():
        return predict(
            model,
            dataset,
            split,
            num_aug=num_aug,
            batch_size=batch_size,
            device=device,
            max_demos=max_demos,
            progress=False,
            step=step,
            task_ids=[task_id],
        )

    if int(data.num_demos[g]) < 2:
        return PuzzleAdaptation(run_predict(), 0.0, True, [])
    objective = DemoObjective(data, g, num_aug, max_demos, options.batch, options.seed, device)
    start = time.perf_counter()
    was_training = model.training
    model.eval()  # evaluation's semantics: every ACT step, μ of variational encoders
    try:
        with torch.enable_grad(), adapted(model, objective, options) as losses:
            seconds = time.perf_counter() - start
            predictions = run_predict()
    finally:
        model.train(was_training)
    return PuzzleAdaptation(predictions, seconds, False, losses)


def merge_predictions(parts: Sequence[Predictions], meta: dict[str, Any]) -> Predictions:
    """One Predictions of several puzzles' (each its own grid table), puzzles in the given order."""
    interner = GridInterner()
    width = max((p.num_aug for p in parts), default=0)

    def reintern(part: Predictions, ids: np.ndarray) -> np.ndarray:
        """Ids into the merged table; the negative markers (no grid, not evaluated) kept as they are."""
        table = {int(i): interner.add(part.grids.grid(int(i))) for i in np.unique(ids) if i >= 0}
        return np.vectorize(lambda i: table.get(int(i), int(i)), otypes=[np.int32])(ids)

    task_ids, query_task, query_index, grid_ids, q_halt, target_ids = [], [], [], [], [], []
    for part in parts:
        pad = width - part.num_aug
        query_task.append(part.query_task + len(task_ids))
        task_ids += part.task_ids
        query_index.append(part.query_index)
        grid_ids.append(
            np.pad(reintern(part, part.grid_ids), ((0, 0), (0, pad)), constant_values=NOT_EVALUATED)
        )
        q_halt.append(np.pad(part.q_halt, ((0, 0), (0, pad)), constant_values=np.nan))
        target_ids.append(reintern(part, part.target_ids))
    return Predictions(
        task_ids=task_ids,
        query_task=np.concatenate(query_task).astype(np.int32),
        query_index=np.concatenate(query_index).astype(np.int32),
        grid_ids=np.concatenate(grid_ids).astype(np.int32),
        q_halt=np.concatenate(q_halt).astype(np.float32),
        target_ids=np.concatenate(target_ids).astype(np.int32),
        grids=interner.table(),
        meta=meta,
    )


class AdaptedResult(EvalResult):
    """An adapted evaluation, with the unadapted one of the same checkpoint and augmentations beside it."""

    def __init__(
        self,
        predictions: Predictions,
        unadapted: EvalResult,
        options: AdaptOptions,
        outcomes: dict[str, PuzzleAdaptation],
        ks: Sequence[int] = KS,
    ) -> None:
        super().__init__(predictions, ks=ks)
        self.unadapted = unadapted
        self.options = options
        self.outcomes = outcomes

    def adapt_block(self) -> dict[str, Any]:
        """Per puzzle solved (all queries at the smallest k) without and with adaptation, and the changes."""
        k = self.ks[0]
        before, after = _solved(self.unadapted, k), _solved(self, k)
        adapted = [t for t, o in self.outcomes.items() if not o.skipped]
        seconds = [self.outcomes[t].seconds for t in adapted]
        return {
            **asdict(self.options),
            "solved_at_k": k,
            "unadapted_metrics": self.unadapted.metrics,
            "solved_to_unsolved": sorted(t for t in before if before[t] and not after[t]),
            "unsolved_to_solved": sorted(t for t in before if after[t] and not before[t]),
            "skipped_single_demo": sorted(t for t, o in self.outcomes.items() if o.skipped),
            "mean_adapt_seconds": float(np.mean(seconds)) if seconds else 0.0,
            "puzzles": {
                t: {
                    "unadapted_solved": before[t],
                    "adapted_solved": after[t],
                    "skipped": o.skipped,
                    "seconds": o.seconds,
                    "losses": o.losses,
                }
                for t, o in self.outcomes.items()
            },
        }

    def results_json(self) -> dict[str, Any]:
        return {**super().results_json(), "adapt": self.adapt_block()}


def _solved(result: EvalResult, k: int) -> dict[str, bool]:
    j = result.ks.index(k)
    return {
        t: bool(result.scores.puzzle_pass[i, j] == 1.0) for i, t in enumerate(result.predictions.task_ids)
    }


def evaluate_adapted(
    model,
    dataset,
    split: str,
    options: AdaptOptions,
    *,
    unadapted: EvalResult | None,
    num_aug: int = 0,
    batch_size: int = 64,
    device=None,
    max_demos: int = 10,
    progress: bool = True,
    step: int | None = None,
    ks: Sequence[int] = KS,
    ctx=None,
) -> AdaptedResult | None:
    """Adapt to and predict every puzzle `unadapted` scored (same checkpoint, split and augmentations).

    With a `DistContext` of several processes every rank calls it (`unadapted` is rank 0's result,
    None elsewhere): the puzzles are dealt out over the ranks, each adapted by one rank alone, and
    rank 0 alone gets the result (the others None), the same whatever the number of processes."""
    from etrm.console import make_progress
    from etrm.data.dataset import ArcDataset
    from etrm.distributed import DistContext, broadcast_from_main, gather_to_main

    if not isinstance(dataset, ArcDataset):
        dataset = ArcDataset.open(dataset)
    data = dataset.split(split)
    ctx = ctx or DistContext(0, 1, device)
    task_ids = broadcast_from_main(unadapted.predictions.task_ids if ctx.is_main else None, ctx)
    mine = task_ids[ctx.rank :: ctx.world_size]
    outcomes: dict[str, PuzzleAdaptation] = {}
    with make_progress(transient=True) as bar:
        task = bar.add_task(f"adapt ({options.mode})", total=len(mine), info="", visible=progress)
        for task_id in mine:
            outcomes[task_id] = adapt_and_predict(
                model,
                dataset,
                split,
                data.group_index(task_id),
                options,
                num_aug=num_aug,
                batch_size=batch_size,
                device=device,
                max_demos=max_demos,
                step=step,
            )
            bar.advance(task)
    shares = gather_to_main(outcomes, ctx)
    if shares is None:
        return None
    every = {t: o for share in shares for t, o in share.items()}
    outcomes = {t: every[t] for t in task_ids}
    meta = {**unadapted.predictions.meta, "adapt": options.mode}
    merged = merge_predictions([o.predictions for o in outcomes.values()], meta)
    return AdaptedResult(merged, unadapted, options, outcomes, ks=ks)


def show_adaptation(result: AdaptedResult) -> None:
    """The console's lines on adaptation: before → after, the changes, the skipped puzzles, the time."""
    from etrm.console import console

    block = result.adapt_block()
    k = block["solved_at_k"]
    console.print(
        f"adapt {block['mode']}: pass@{k} {block['unadapted_metrics'][f'pass@{k}']:.2%} unadapted → "
        f"{result.metrics[f'pass@{k}']:.2%} adapted · solved→unsolved {len(block['solved_to_unsolved'])} · "
        f"unsolved→solved {len(block['unsolved_to_solved'])} · skipped (single demo) "
        f"{len(block['skipped_single_demo'])} · {block['mean_adapt_seconds']:.2f} s adapting per puzzle",
        markup=False,
        soft_wrap=True,
    )
