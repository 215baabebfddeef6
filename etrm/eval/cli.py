"""`etrm eval`: augmented inference and voting on a checkpoint, or re-voting saved predictions."""

from __future__ import annotations

import os
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
    nproc: int = typer.Option(
        1, "--nproc", help="Processes on this machine sharing the work (launches torchrun); rank 0 writes."
    ),
    compile: bool = typer.Option(
        False, "--compile", help="torch.compile the ACT step (CUDA only; pays off on long evaluations)."
    ),
    adapt: str = typer.Option(
        "none", "--adapt", help="Test-time adaptation on each puzzle's demos: none | latent | finetune."
    ),
    adapt_steps: int = typer.Option(20, "--adapt-steps", help="Adaptation steps per puzzle."),
    adapt_lr: float | None = typer.Option(
        None, "--adapt-lr", help="Adam learning rate (default: 1e-2 latent, 1e-4 finetune)."
    ),
    adapt_batch: int = typer.Option(8, "--adapt-batch", help="Leave-one-out demo episodes per step."),
    adapt_params: str | None = typer.Option(
        None,
        "--adapt-params",
        help="With --adapt finetune: encoder | decoder | all (default all), or lora: low-rank deltas "
        "beside every linear layer (default lr 1e-3).",
    ),
    adapt_rank: int | None = typer.Option(
        None, "--adapt-rank", help="With --adapt-params lora: the deltas' rank (default 4)."
    ),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the adaptation's episode draws and low-rank deltas (per puzzle)."
    ),
) -> None:
    """Vote over augmented predictions and score pass@k; write results.json, predictions.npz and submissions."""
    from etrm.eval.adapt import AdaptOptions
    from etrm.eval.results import EVAL_OUTPUT
    from etrm.eval.voting import KS

    adapt_options = AdaptOptions(
        adapt, adapt_steps, adapt_lr, adapt_batch, adapt_params, seed, adapt_rank
    ).validate()
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
    if nproc < 1:
        raise EtrmError(f"--nproc must be ≥ 1, got {nproc}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if (nproc > 1 or world_size > 1) and (from_predictions is not None or device != "auto"):
        raise EtrmError(
            "--nproc and torchrun share out a model run: drop --from-predictions, and --device "
            "(each process takes the GPU of its LOCAL_RANK, or the CPU)"
        )
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
        if nproc > 1 and world_size == 1:
            from etrm.distributed import launch_torchrun
            from etrm.runs.checkpoint import resolve_checkpoint

            resolve_checkpoint(run)  # a wrong path is one line here, not one per process
            args = ["eval", str(run), "--split", split, "--num-aug", str(num_aug)]
            args += ["--batch-size", str(batch_size), "--vote" if vote else "--no-vote"]
            args += ["--ema" if ema else "--no-ema"] + (["--all-groups"] if all_groups else [])
            args += ["--json"] if as_json else []
            args += ["--compile"] if compile else []
            args += ["--adapt", adapt, "--adapt-steps", str(adapt_steps), "--adapt-batch", str(adapt_batch)]
            args += ["--seed", str(seed)]
            for flag, value in (
                ("--data", data),
                ("--out", out),
                ("--adapt-lr", adapt_lr),
                ("--adapt-params", adapt_params),
                ("--adapt-rank", adapt_rank),
            ):
                args += [flag, str(value)] if value is not None else []
            for flag, values in (("--task", tasks or []), ("--k", list(ks) if ks != KS else [])):
                for value in values:
                    args += [flag, str(value)]
            raise typer.Exit(launch_torchrun(nproc, args))
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
            compile,
            adapt_options,
        )
        if result is None:  # a rank other than 0: its share went to rank 0
            return
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
    compile=False,
    adapt=None,
):
    """(EvalResult, output folder, which training groups were scored) of a checkpoint on its (or the
    given) dataset."""
    import torch

    from etrm.console import err_console
    from etrm.data.dataset import ArcDataset
    from etrm.distributed import init_distributed, shutdown
    from etrm.eval.inference import evaluate
    from etrm.eval.results import BY_EVAL_COMMAND
    from etrm.runs.checkpoint import choose_weights, describe_weights, load_for_inference, resolve_checkpoint

    checkpoint = resolve_checkpoint(run)
    model, cfg, step = load_for_inference(checkpoint, use_ema=ema)
    ctx = init_distributed() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if ctx is None or ctx.is_main:
        err_console.print(
            f"evaluating the {describe_weights(choose_weights(checkpoint, ema))}", soft_wrap=True
        )
    data = data if data is not None else Path(cfg.data.path)
    if not data.is_dir():
        raise EtrmError(f"dataset folder {data} not found (set --data)")
    scored, scope = tasks, ""
    if split == "train" and not tasks:
        scored, scope = _training_groups(ArcDataset.open(data), cfg.data.max_train_groups, all_groups)
    if ctx is not None:
        device = ctx.device
    elif device == "auto":
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
    if compile and device.type != "cuda":
        raise EtrmError(f"--compile needs a CUDA device; this evaluation runs on {device.type}")
    adapting = adapt is not None and adapt.mode != "none"
    try:
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
            progress=ctx is None or ctx.is_main,
            ctx=ctx,
            compile=compile,
        )
        if adapting:
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
                progress=ctx is None or ctx.is_main,
                step=step,
                ks=ks,
                ctx=ctx,
            )
    finally:
        if ctx is not None:
            shutdown(ctx)
    if result is None:
        return None, None, scope
    result.predictions.meta["evaluated_by"] = BY_EVAL_COMMAND
    if out is None and tasks:
        return result, None, scope  # a few puzzles' scores must not replace the checkpoint's full evaluation
    # Train EM goes beside the checkpoint's test evaluation, which `etrm report` reads, not over it.
    # An adapted evaluation goes beside the unadapted one (its results.json holds both), not over it.
    name = checkpoint.name if split == "test" else f"{checkpoint.name}-{split}"
    # Each adapted parameter set has its own folder: LoRA's results must not replace a full finetune's.
    name += f"-adapt-{adapt.mode}" + (f"-{adapt.params}" if adapt.params else "") if adapting else ""
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
