"""Where a run's decoder starts and what its weights have seen (the provenance behind `fewshot`).

`train.init_from` names the start: nothing, an etrm run (its decoder, refused when its training data
shares a puzzle with this run's test split) or a reference TRM checkpoint (foreign: unknown data).
`training_data` is what the run records in its folder, so a later run built on it can be checked.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

from etrm.config import PRESETS, RunConfig
from etrm.console import err_console
from etrm.data.dataset import first_groups
from etrm.distributed import DistContext
from etrm.errors import EtrmError
from etrm.runs import checkpoint as ckpt_io

# Presets whose design starts from a pretrained decoder: they need train.init_from set on purpose.
DECODER_PHASES = ("overfit", "semi-final", "final")
FOREIGN_WARNING = (
    "warning: train.init_from={path} is not an etrm run: its training data is unknown (the public TRM "
    "ARC checkpoints were trained on the evaluation puzzles' demos), so this run is not few-shot "
    "(decoder_provenance foreign)"
)


def require_decoder_choice(cfg: RunConfig, preset: str) -> None:
    """The design's overfit, semi-final and final runs start from a pretrained decoder: say which, or none."""
    info = PRESETS.get(preset)
    if info is not None and info.phase in DECODER_PHASES and not cfg.train.init_from:
        raise EtrmError(
            f"preset {preset} starts from a pretrained decoder: set train.init_from to an etrm run "
            f"(e.g. one trained with --preset trm) or a TRM checkpoint, or train.init_from=none to train "
            f"the decoder from scratch on purpose"
        )


def check_resumed_data(run_dir: Path, dataset) -> None:
    """A resumed run may move to another data.path: what it trained on so far must not be in its test split."""
    from etrm.data.provenance import manifest_sha256, read_training_data

    record = read_training_data(run_dir)
    if record is None:
        return
    current = manifest_sha256(dataset.manifest)
    earlier = [d for d in record["datasets"] if d["manifest_sha256"] != current]
    refuse_test_overlap(earlier, dataset.split("test"), f"--resume {run_dir}: the run")


def init_decoder(model: nn.Module, init_from: str, test_split, ctx: DistContext) -> tuple[dict, float | None]:
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


def training_data(cfg: RunConfig, run_dir: Path, dataset, inherited: dict, resumed: bool) -> dict:
    """What a run's weights have seen: the inherited datasets (or, resumed, the run's own record)
    plus the training groups of data.path."""
    from etrm.data.provenance import dataset_record, read_training_data

    if resumed:  # a run from before runs recorded their data: only a decoder from scratch is known
        scratch = cfg.train.init_from in ("", "none")
        inherited = read_training_data(run_dir) or {
            "decoder_provenance": "none" if scratch else "foreign",
            "foreign": not scratch,
            "datasets": [],
        }
    train_split = first_groups(dataset.split("train"), cfg.data.max_train_groups)
    own = dataset_record(dataset, train_split)
    known = [(d["manifest_sha256"], d["puzzle_ids"]) for d in inherited["datasets"]]
    datasets = inherited["datasets"]
    if (own["manifest_sha256"], own["puzzle_ids"]) not in known:
        datasets = [*datasets, own]
    return {**inherited, "datasets": datasets}
