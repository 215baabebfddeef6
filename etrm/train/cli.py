"""`etrm train` and `etrm presets`: resolve a config (preset → --config → --set), then call `etrm.train.train`."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from etrm.errors import EtrmError


def resolve_config(
    preset: str | None,
    size: str,
    config_file: Path | None,
    overrides: list[str],
    wandb: str | None,
    resume: Path | None,
):
    """The RunConfig a command line describes: a preset (or a resumed run's config), a config file, then --set."""
    from etrm.config import RunConfig, apply_overrides, get_preset, load_config

    if resume is not None:
        if preset is not None:
            raise EtrmError(
                "--resume continues a run with its own config; drop --preset (use --set to change it)"
            )
        saved = resume / "config.json"
        if not saved.is_file():
            raise EtrmError(f"--resume {resume}: not a run folder (no config.json)")
        cfg = load_config(saved)
    elif preset is not None:
        cfg = get_preset(preset, size=size)
    elif config_file is not None:
        cfg = RunConfig()
    else:
        raise EtrmError("give --preset NAME (see `etrm presets`), --config FILE or --resume RUN_DIR")
    if config_file is not None:
        cfg = load_config(config_file, base=cfg)
    if wandb is not None:
        overrides = [*overrides, f"logging.wandb={wandb}"]
    return apply_overrides(cfg, overrides)


def train_command(
    preset: str | None = typer.Option(None, "--preset", "-p", help="Experiment preset (see `etrm presets`)."),
    size: str = typer.Option(
        "full", "--size", help="full, or cpu-smoke for a quick local run of the preset."
    ),
    overrides: list[str] = typer.Option(
        [], "--set", help="Override a config key: --set arch.hidden_size=64 (repeatable)."
    ),
    config_file: Path | None = typer.Option(None, "--config", help="JSON config laid over the preset."),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print the resolved config as JSON, and its budget (steps, samples, evaluations) on stderr; then stop.",
    ),
    out: Path | None = typer.Option(None, "--out", help="Run folder (default runs/<run name>)."),
    resume: Path | None = typer.Option(None, "--resume", help="Continue the run in this folder exactly."),
    wandb: str | None = typer.Option(
        None, "--wandb", help="W&B mode: online, offline (default) or disabled."
    ),
    nproc: int = typer.Option(1, "--nproc", help="Processes on this machine (launches torchrun)."),
) -> None:
    """Train a model: a preset or config, dotted overrides, a run folder with metrics and checkpoints."""
    from etrm.config import config_to_dict
    from etrm.console import console, print_json

    cfg = resolve_config(preset, size, config_file, overrides, wandb, resume)
    if dry_run:
        print_json(config_to_dict(cfg))
        _print_budget(cfg)
        return
    if resume is not None:
        if out is not None and out.resolve() != resume.resolve():
            raise EtrmError(
                f"--out {out} and --resume {resume} name different folders; a resumed run stays in place"
            )
        out = resume
    out = out or Path("runs") / (cfg.logging.run_name or preset or "run")

    if nproc < 1 or cfg.train.global_batch_size % nproc:
        raise EtrmError(
            f"--nproc {nproc}: train.global_batch_size={cfg.train.global_batch_size} must split evenly "
            f"over the processes (choose a divisor of it, or change the batch)"
        )
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        from etrm.distributed import launch_torchrun
        from etrm.train.init_decoder import require_decoder_choice

        if resume is None:
            require_decoder_choice(cfg, preset or "")

        args = ["train", "--size", size, "--out", str(out)]
        args += ["--preset", preset] if preset else []
        args += ["--resume", str(resume)] if resume else []
        args += ["--config", str(config_file)] if config_file else []
        args += ["--wandb", wandb] if wandb else []
        for item in overrides:
            args += ["--set", item]
        raise typer.Exit(launch_torchrun(nproc, args))

    from etrm.train.loop import describe, train

    run_dir = train(cfg, out, resume=resume is not None, preset=preset or "")
    if int(os.environ.get("RANK", "0")) == 0:
        console.print(f"trained {describe(run_dir)}")


def _print_budget(cfg) -> None:
    from etrm.console import err_console
    from etrm.train.budget import budget_lines, training_budget

    dataset = _dataset_or_none(cfg.data.path)
    if dataset is None:
        lines = [f"budget: no dataset at data.path={cfg.data.path} (build it with `etrm data build`)"]
    else:
        lines = [f"budget on {cfg.data.path}:", *budget_lines(training_budget(cfg, dataset))]
    for line in lines:
        err_console.print(line, markup=False, highlight=False)


def _dataset_or_none(path: str):
    from etrm.data.dataset import ArcDataset

    return ArcDataset.open(path) if (Path(path) / "manifest.json").is_file() else None


def presets_command(
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """List the experiment presets with their encoder, size and parameter count.

    With --json each preset also lists every value it sets and its source (the design, the
    reference TRM, the public ETRM or our choice), and its budget on its data.path when built.
    """
    from etrm.config import PRESETS, preset_sources
    from etrm.console import emit
    from etrm.train.budget import training_budget

    datasets = {}
    rows = []
    for name, info in PRESETS.items():
        cfg = info.build()
        if as_json and cfg.data.path not in datasets:
            datasets[cfg.data.path] = _dataset_or_none(cfg.data.path)
        a, t = cfg.arch, cfg.train
        total, encoder = parameter_count(cfg.arch)
        rows.append(
            {
                "name": name,
                "phase": info.phase,
                "encoder": a.encoder_type,
                "layers": a.encoder_num_layers,
                "explore": a.halt_exploration_prob,
                "batch": t.global_batch_size,
                "kl": a.kl_weight,
                "epochs": t.epochs,
                "params": total,
                "encoder_params": encoder,
                "description": info.description,
                "project": cfg.logging.project,
                "run_name": cfg.logging.run_name,
            }
        )
        if as_json:
            dataset = datasets[cfg.data.path]
            rows[-1]["sources"] = preset_sources(name)
            rows[-1]["budget"] = training_budget(cfg, dataset) if dataset is not None else None
    columns = ["name", "phase", "encoder", "layers", "explore", "batch", "kl", "epochs", "params"]
    emit(rows, columns, as_json, title="presets (params: trainable, puzzle-id table excluded)")


def parameter_count(arch) -> tuple[int, int]:
    """(trainable parameters, of which encoder) of the model `arch` describes, built on the meta device."""
    import dataclasses

    import torch

    from etrm.models import build_model

    arch = dataclasses.replace(arch, num_puzzle_identifiers=max(arch.num_puzzle_identifiers, 1))
    with torch.device("meta"):
        model = build_model(arch)
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    encoder = sum(p.numel() for p in model.encoder.parameters() if p.requires_grad)
    return total, encoder
