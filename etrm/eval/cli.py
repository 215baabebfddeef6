"""`etrm eval`: augmented inference and voting on a checkpoint, or re-voting saved predictions."""

from __future__ import annotations

from pathlib import Path

import typer

from etrm.errors import EtrmError
from etrm.io import check_replaceable

SPLITS = ("test", "train")


def eval_command(
    run: Path | None = typer.Argument(
        None,
        metavar="RUN_OR_CHECKPOINT",
        help="Run folder (its newest checkpoint) or a step-N/ checkpoint folder.",
    ),
    data: Path | None = typer.Option(None, "--data", help="Dataset folder (default: the run's data.path)."),
    split: str = typer.Option(
        "test",
        "--split",
        help="test: unseen puzzles; train: held-out pairs of the training puzzles the run trained on "
        "(its data.max_train_groups first groups when set).",
    ),
    all_groups: bool = typer.Option(
        False,
        "--all-groups",
        help="With --split train: score every training puzzle of the dataset, not only those the run trained on.",
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
    adapt: str = typer.Option(
        "none", "--adapt", help="Test-time adaptation on each puzzle's demos: none | latent | finetune."
    ),
    adapt_steps: int = typer.Option(20, "--adapt-steps", help="Adaptation steps per puzzle."),
    adapt_lr: float | None = typer.Option(
        None, "--adapt-lr", help="Adam learning rate (default: 1e-2 latent, 1e-4 finetune)."
    ),
    adapt_batch: int = typer.Option(8, "--adapt-batch", help="Leave-one-out demo episodes per step."),
    adapt_params: str | None = typer.Option(
        None, "--adapt-params", help="With --adapt finetune: encoder | decoder | all (default all)."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the adaptation's episode draws."),
) -> None:
    """Vote over augmented predictions and score pass@k; write results.json, predictions.npz and submissions."""
    from etrm.eval.adapt import AdaptOptions
    from etrm.eval.results import EVAL_OUTPUT
    from etrm.eval.voting import KS

    adapt_options = AdaptOptions(adapt, adapt_steps, adapt_lr, adapt_batch, adapt_params, seed).validate()
    if adapt_options.mode != "none" and from_predictions is not None:
        raise EtrmError("--adapt needs a model run; it cannot go with --from-predictions")

    if num_aug < 0:
        raise EtrmError(f"--num-aug must be ≥ 0, got {num_aug}")
    if batch_size < 1:
        raise EtrmError(f"--batch-size must be ≥ 1, got {batch_size}")
    if split not in SPLITS:
        raise EtrmError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if all_groups and (split != "train" or tasks or from_predictions is not None):
        raise EtrmError("--all-groups goes with --split train on a run, without --task")
    ks = tuple(ks) if ks else KS
    if out is not None:
        check_replaceable(out, EVAL_OUTPUT)
    if from_predictions is not None:
        if run is not None:
            raise EtrmError("give either RUN_OR_CHECKPOINT or --from-predictions, not both")
        result, scope = _revote(from_predictions, num_aug if vote else 1, tasks or None, ks), ""
    else:
        if run is None:
            raise EtrmError("missing RUN_OR_CHECKPOINT (or --from-predictions predictions.npz)")
        result, out, scope = _run_model(
            run,
            data,
            split,
            vote,
            num_aug,
            batch_size,
            device,
            ema,
            out,
            ks,
            tasks,
            all_groups,
            adapt_options,
        )
    if out is not None:
        result.write(out)
    _show(result, out, as_json)
    if adapt_options.mode != "none" and not as_json:
        from etrm.eval.adapt import show_adaptation

        show_adaptation(result)
    if scope and not as_json:
        from etrm.console import console

        console.print(scope)


def _revote(path: Path, num_aug: int, tasks: list[str] | None, ks: tuple[int, ...]):
    from etrm.eval.results import EvalResult

    return EvalResult.from_predictions_file(path, num_aug=num_aug, task_ids=tasks, ks=ks)


def _run_model(
    run,
    data,
    split,
    vote,
    num_aug,
    batch_size,
    device,
    ema,
    out,
    ks,
    tasks=None,
    all_groups=False,
    adapt=None,
):
    """(EvalResult, output folder, which training groups were scored) of a checkpoint on its (or the
    given) dataset."""
    import torch

    from etrm.console import err_console
    from etrm.data.dataset import ArcDataset
    from etrm.eval.inference import evaluate
    from etrm.runs.checkpoint import choose_weights, describe_weights, load_for_inference, resolve_checkpoint

    checkpoint = resolve_checkpoint(run)
    model, cfg, step = load_for_inference(checkpoint, use_ema=ema)
    err_console.print(f"evaluating the {describe_weights(choose_weights(checkpoint, ema))}", soft_wrap=True)
    data = data if data is not None else Path(cfg.data.path)
    if not data.is_dir():
        raise EtrmError(f"dataset folder {data} not found (set --data)")
    scored, scope = tasks, ""
    if split == "train" and not tasks:
        scored, scope = _training_groups(ArcDataset.open(data), cfg.data.max_train_groups, all_groups)
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
        task_ids=scored,
    )
    if adapt is not None and adapt.mode != "none":
        from etrm.eval.adapt import evaluate_adapted

        result = evaluate_adapted(
            model,
            data,
            split,
            adapt,
            unadapted=result,
            num_aug=num_aug if vote else 1,
            batch_size=batch_size,
            device=device,
            max_demos=cfg.data.max_demos,
            step=step,
            ks=ks,
        )
    if out is None and tasks:
        return result, None, scope  # a few puzzles' scores must not replace the checkpoint's full evaluation
    # Train EM goes beside the checkpoint's test evaluation, which `etrm report` reads, not over it.
    # An adapted evaluation goes beside the unadapted one (its results.json holds both), not over it.
    name = checkpoint.name if split == "test" else f"{checkpoint.name}-{split}"
    name += f"-adapt-{adapt.mode}" if adapt is not None and adapt.mode != "none" else ""
    return result, out if out is not None else checkpoint.parent / "eval" / name, scope


def _training_groups(dataset, max_train_groups: int, all_groups: bool) -> tuple[list[str] | None, str]:
    """(puzzles to score, None = the whole split; a line saying which) for train EM: by default the
    groups the run trained on, as the evaluation inside training scores them."""
    from etrm.data.dataset import first_groups

    train = dataset.split("train")
    trained = first_groups(train, max_train_groups).puzzle_ids
    total = len(train.puzzle_ids)
    if len(trained) == total:
        return None, f"scored all {total} training puzzles: the run trained on all of them"
    if all_groups:
        return None, (
            f"scored all {total} training puzzles (--all-groups); the run trained on the first "
            f"{len(trained)} (data.max_train_groups={max_train_groups})"
        )
    return trained, (
        f"scored the {len(trained)} training puzzles the run trained on (data.max_train_groups="
        f"{max_train_groups}) of {total}; --all-groups scores all"
    )


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
