"""`etrm data synth`: the command over etrm.data.synth (imported when run, so `etrm --help` stays fast)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import typer

from etrm.console import emit


def synth_command(
    out: Path = typer.Option(..., "--out", help="Folder to write: train/*.json, test/*.json, synth.json."),
    families: str = typer.Option(
        "", "--families", help="Comma-separated family names (default: all; an unknown name lists them)."
    ),
    train_puzzles: int = typer.Option(200, "--train-puzzles", help="Training puzzles per family."),
    test_puzzles: int = typer.Option(20, "--test-puzzles", help="Test puzzles per family."),
    grid_size: str = typer.Option("3..12", "--grid-size", help="Grid side range MIN..MAX (every grid)."),
    seed: int = typer.Option(0, "--seed", help="Same seed and options give identical files."),
    holdout: str = typer.Option(
        "instances",
        "--holdout",
        help="instances: new puzzles of the trained families; families: unseen families.",
    ),
    test_families: str = typer.Option(
        "", "--test-families", help="With --holdout families: the held-out families (default: the last two)."
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
    as_json: bool = typer.Option(False, "--json", help="Print the per-family counts as JSON."),
) -> None:
    """Synthesise few-shot ARC task families as ARC JSON files (then: etrm data build)."""
    from etrm.data.synth import FAMILIES, parse_grid_size, write_synthetic

    manifest = write_synthetic(
        out,
        families=_split_names(families),
        train_per_family=train_puzzles,
        test_per_family=test_puzzles,
        grid_size=parse_grid_size(grid_size),
        seed=seed,
        holdout=holdout,
        test_families=_split_names(test_families),
        overwrite=overwrite,
    )
    counts = Counter((t["family"], t["split"]) for t in manifest["tasks"].values())
    rows = [
        {
            "family": name,
            "train": counts[name, "train"],
            "test": counts[name, "test"],
            "rule": FAMILIES[name].summary,
        }
        for name in dict.fromkeys(manifest["families"]["train"] + manifest["families"]["test"])
    ]
    emit(rows, ["family", "train", "test", "rule"], as_json, title=f"{out} (holdout: {holdout}, seed {seed})")


def _split_names(text: str) -> list[str] | None:
    return [name.strip() for name in text.split(",") if name.strip()] or None
