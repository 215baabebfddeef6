"""Hand-made run folders with known metrics, laid out as docs/interfaces.md fixes them."""

from __future__ import annotations

import json
import math
from pathlib import Path

TRAIN_ROWS_PER_WINDOW = 4


def grid_results(puzzles: dict[str, tuple[list, list, bool]]) -> dict:
    """results.json for puzzles given as task_id → (target grid, predicted grid, solved)."""
    out = {}
    for task_id, (target, predicted, solved) in puzzles.items():
        out[task_id] = {
            "pass@k": {"1": float(solved), "2": float(solved)},
            "queries": [
                {
                    "query": 0,
                    "solved@k": {"1": solved, "2": solved},
                    "target": target,
                    "candidates": [{"grid": predicted, "votes": 3, "mean_q": 0.4}],
                }
            ],
        }
    solved = sum(p[2] for p in puzzles.values())
    return {
        "split": "test",
        "fewshot": True,
        "num_aug": 8,
        "step": 0,
        "metrics": {"pass@1": solved / max(len(puzzles), 1), "num_puzzles": len(puzzles)},
        "puzzles": out,
    }


def make_run(
    root: Path,
    name: str,
    *,
    test_em: list[float],
    train_em: list[float] | None = None,
    ratio: float | list[float] = 0.3,
    params: int | None = 1_000_000,
    exploration: float = 0.5,
    steps_hist: list[int] | None = None,
    results: dict | None = None,
    epochs_per_eval: int = 200,
    write_info: bool = True,
) -> Path:
    """A run with one evaluation per `test_em` value; `ratio` is the encoder share of every window's gradient."""
    run = root / name
    run.mkdir(parents=True)
    train_em = train_em or [em + 0.05 for em in test_em]
    ratios = ratio if isinstance(ratio, list) else [ratio] * len(test_em)
    steps_hist = steps_hist or [0, 2, 3, 5, 4, 2, 1, 1]
    rows = []
    step = 0
    for i, (em, tem, r) in enumerate(zip(test_em, train_em, ratios, strict=True)):
        for _ in range(TRAIN_ROWS_PER_WINDOW):
            step += 10
            rows.append(
                {
                    "step": step,
                    "epoch": (i + 0.5) * epochs_per_eval,
                    "train/lm_loss": 1.0,
                    "train/steps": 4.0,
                    "train/steps_hist": steps_hist,
                    "train/q_halt_accuracy": 0.8,
                    "grad/encoder_norm": 2.0 * r,
                    "grad/inner_norm": 2.0 * math.sqrt(1 - r * r),
                    "grad/total_norm": 2.0,
                }
            )
        eval_dir = f"eval/step-{step}"
        rows.append(
            {
                "step": step,
                "epoch": float((i + 1) * epochs_per_eval),
                "eval/pass@1": em,
                "eval/pass@2": min(1.0, em + 0.02),
                "eval/train_em": tem,
                "eval/num_puzzles": 10,
                "eval/results": f"{eval_dir}/results.json",
            }
        )
        if results is not None:
            (run / eval_dir).mkdir(parents=True)
            (run / eval_dir / "results.json").write_text(json.dumps(results))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "data": {"path": str(root / "no-dataset")},
        "arch": {
            "encoder_type": "hybrid_standard",
            "encoder_num_layers": 4,
            "halt_exploration_prob": exploration,
            "halt_max_steps": len(steps_hist),
            "kl_weight": 0.0,
        },
        "train": {"global_batch_size": 128, "epochs": epochs_per_eval * len(test_em)},
        "logging": {"project": "etrm", "run_name": name},
    }
    (run / "config.json").write_text(json.dumps(config))
    if write_info:
        info = {"name": name, "preset": name, "num_params": params, "fewshot": True, "world_size": 1}
        (run / "run_info.json").write_text(json.dumps(info))
    return run
