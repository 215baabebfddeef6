"""`etrm eval`: augmented inference and voting on a checkpoint, or re-voting saved predictions."""

from __future__ import annotations

from pathlib import Path

import typer

from etrm.errors import EtrmError

SPLITS = ("test", "train")


def eval_command(
    run: Path | None = typer.Argument(
        None,
        metavar="RUN_OR_CHECKPOINT",
        help="Run folder (its newest checkpoint) or a step-N/ checkpoint folder.",
    ),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder (default: the run's data.path)."),
    split: str = typer.Option(
        "test", "--split", help="test: unseen puzzles; train: training puzzles' held-out pairs."
    ),
    vote: bool = typer.Option(
        True, "--vote/--no-vote", help="Vote over augmentations, or score the identity augmentation alone."
    ),
    num_aug: int = typer.Option(
        0, "--num-aug", help="Use the first N augmentations of each puzzle (0 = all)."
    ),
    batch_size: int = typer.Option(64, "--batch-size", help="Episodes per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N."),
    ema: bool = typer.Option(
        True, "--ema/--no-ema", help="Use the EMA weights when the checkpoint has them."
    ),
    out: Path | None = typer.Option(
        None,
        "--out",
        help="Output folder (default: RUN/eval/step-N; nothing written when re-voting or with --task).",
    ),
    from_predictions: Path | None = typer.Option(
        None, "--from-predictions", help="Re-vote a saved predictions.npz instead of running a model."
    ),
    tasks: list[str] | None = typer.Option(
        None, "--task", help="Only this puzzle (repeatable): run the model on it, or re-vote it."
    ),
    ks: list[int] | None = typer.Option(
        None, "--k", help="pass@k values (repeatable) (default: 1 2 5 10 100 1000)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the metrics as JSON."),
) -> None:
    """Vote over augmented predictions and score pass@k; write results.json, predictions.npz and submissions."""
    from etrm.eval.voting import KS

    if num_aug < 0:
        raise EtrmError(f"--num-aug must be ≥ 0, got {num_aug}")
    if batch_size < 1:
        raise EtrmError(f"--batch-size must be ≥ 1, got {batch_size}")
    if split not in SPLITS:
        raise EtrmError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    ks = tuple(ks) if ks else KS
    if from_predictions is not None:
        if run is not None:
            raise EtrmError("give either RUN_OR_CHECKPOINT or --from-predictions, not both")
        result = _revote(from_predictions, num_aug if vote else 1, tasks or None, ks)
    else:
        if run is None:
            raise EtrmError("missing RUN_OR_CHECKPOINT (or --from-predictions predictions.npz)")
        result, out = _run_model(run, data, split, vote, num_aug, batch_size, device, ema, out, ks, tasks)
    if out is not None:
        result.write(out)
    _show(result, out, as_json)


def _revote(path: Path, num_aug: int, tasks: list[str] | None, ks: tuple[int, ...]):
    from etrm.eval.results import EvalResult

    return EvalResult.from_predictions_file(path, num_aug=num_aug, task_ids=tasks, ks=ks)


def _run_model(run, data, split, vote, num_aug, batch_size, device, ema, out, ks, tasks=None):
    """(EvalResult, output folder) of a checkpoint on its (or the given) dataset."""
    import torch

    from etrm.console import err_console
    from etrm.eval.inference import evaluate
    from etrm.runs.checkpoint import choose_weights, describe_weights, load_for_inference, resolve_checkpoint

    checkpoint = resolve_checkpoint(run)
    model, cfg, step = load_for_inference(checkpoint, use_ema=ema)
    err_console.print(f"evaluating the {describe_weights(choose_weights(checkpoint, ema))}", soft_wrap=True)
    data = data if data is not None else Path(cfg.data.path)
    if not data.is_dir():
        raise EtrmError(f"dataset folder {data} not found (set --data)")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise EtrmError(f"--device {device!r}: {e}") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise EtrmError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s) "
            f"visible to torch; use --device cpu or auto"
        )
    result = evaluate(
        model.to(device),
        data,
        split,
        num_aug=num_aug,
        batch_size=batch_size,
        device=device,
        max_demos=cfg.data.max_demos,
        vote=vote,
        step=step,
        ks=ks,
        task_ids=tasks,
    )
    if out is None and tasks:
        return result, None  # a few puzzles' scores must not replace the checkpoint's full evaluation
    return result, out if out is not None else checkpoint.parent / "eval" / checkpoint.name


def _show(result, out: Path | None, as_json: bool) -> None:
    from etrm.console import console, emit, print_json

    metrics = result.metrics
    if as_json:
        print_json(metrics)
        return
    meta, puzzles = result.predictions.meta, metrics["num_puzzles"]
    rows = [
        {
            "k": k,
            "ARC pass@k": f"{metrics[f'pass@{k}']:.2%}",
            "fully solved": f"{metrics[f'fully_solved@{k}']}/{puzzles}",
        }
        for k in result.ks
    ]
    title = f"{meta.get('split')} · step {meta.get('step')} · {result.predictions.num_aug} augs"
    emit(rows, ["k", "ARC pass@k", "fully solved"], False, title=title)
    extra = f" · train EM {metrics['train_em']:.2%}" if "train_em" in metrics else ""
    console.print(
        f"{puzzles} puzzles, {metrics['num_queries']} queries · exact without voting "
        f"{metrics['exact_no_vote']:.2%}{extra}"
    )
    if out is not None:
        console.print(f"wrote {out}/ (results.json, predictions.npz, submission.json, submission.csv)")
