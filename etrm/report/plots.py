"""The report's figures as PNG files, drawn off-screen (Agg: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from etrm.data.encoding import NUM_COLORS  # noqa: E402
from etrm.diagnose.grad_health import HEALTHY_ABOVE, UNHEALTHY_BELOW  # noqa: E402
from etrm.diagnose.runs import Run  # noqa: E402
from etrm.report.failures import Confusion, Outcomes  # noqa: E402
from etrm.report.summary import RunSummary  # noqa: E402

DPI = 100
# The colours ARC's own viewer uses for 0..9.
ARC_COLOURS = [
    "#000000",
    "#0074D9",
    "#FF4136",
    "#2ECC40",
    "#FFDC00",
    "#AAAAAA",
    "#F012BE",
    "#FF851B",
    "#7FDBFF",
    "#870C25",
]
ARC_CMAP = ListedColormap(ARC_COLOURS)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _percent(values: list[float]) -> np.ndarray:
    return np.array([v * 100 if math.isfinite(v) else np.nan for v in values])


def plot_test_em(summaries: list[RunSummary], winner: str | None, path: Path) -> Path:
    names = [s.name for s in summaries]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.5), layout="constrained")
    ax.bar(x - 0.2, _percent([s.test_em for s in summaries]), 0.4, label="pass@1")
    ax.bar(x + 0.2, _percent([s.test_pass2 for s in summaries]), 0.4, label="pass@2")
    ax.set_xticks(x, [f"★ {n}" if n == winner else n for n in names], rotation=30, ha="right")
    ax.set_ylabel("test exact match (%)")
    ax.set_title("Test EM at the last evaluation (★ = selected)")
    ax.legend()
    return _save(fig, path)


def plot_learning_curves(runs: list[Run], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5), layout="constrained")
    for i, run in enumerate(runs):
        colour = f"C{i % 10}"
        evals = sorted(run.eval_rows, key=lambda r: r["step"])
        epochs = [r.get("epoch", math.nan) for r in evals]
        ax.plot(
            epochs,
            _percent([r.get("eval/pass@1", math.nan) for r in evals]),
            "-o",
            color=colour,
            label=f"{run.name} test",
        )
        ax.plot(
            epochs,
            _percent([r.get("eval/train_em", math.nan) for r in evals]),
            "--",
            color=colour,
            label=f"{run.name} train",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("exact match (%)")
    ax.set_title("Learning curves (solid: test EM pass@1, dashed: train EM)")
    ax.legend(fontsize="small", ncol=2)
    return _save(fig, path)


HEALTH_COLUMNS = ("ratio (last)", "ratio (mean)", "ratio (min)", "encoder norm", "inner norm")


def plot_grad_health(names: list[str], table: np.ndarray, path: Path) -> Path:
    """Runs × health metrics (`HEALTH_COLUMNS`); colour scaled per column, values written in the cells."""
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.5 * len(names)), layout="constrained")
    column_max = np.nanmax(np.where(np.isfinite(table), np.abs(table), np.nan), axis=0, initial=0.0)
    scaled = table / np.where(column_max > 0, column_max, 1.0)
    # Ratio columns are coloured on an absolute scale, so red/yellow/green read as the health classes.
    scaled[:, :3] = table[:, :3] / (2 * HEALTHY_ABOVE)
    ax.imshow(np.nan_to_num(scaled, nan=0.0), cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
    for (i, j), value in np.ndenumerate(table):
        ax.text(j, i, f"{value:.3g}" if math.isfinite(value) else "—", ha="center", va="center", fontsize=9)
    ax.set_xticks(range(len(HEALTH_COLUMNS)), HEALTH_COLUMNS)
    ax.set_yticks(range(len(names)), names)
    ax.set_title(
        f"Gradient health (ratio = encoder/total; healthy > {HEALTHY_ABOVE}, unhealthy < {UNHEALTHY_BELOW})"
    )
    return _save(fig, path)


def plot_train_vs_test(summaries: list[RunSummary], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 6), layout="constrained")
    train, test = _percent([s.train_em for s in summaries]), _percent([s.test_em for s in summaries])
    ax.scatter(train, test)
    for s, x, y in zip(summaries, train, test, strict=True):
        if np.isfinite(x) and np.isfinite(y):
            ax.annotate(s.name, (x, y), textcoords="offset points", xytext=(4, 4))
    ax.plot([0, 100], [0, 100], ":", color="grey", label="no gap")
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("train EM (%)")
    ax.set_ylabel("test EM (%)")
    ax.set_title("Train vs test exact match")
    ax.legend()
    return _save(fig, path)


def plot_act_steps(histograms: dict[str, list[int]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5), layout="constrained")
    logged = {name: h for name, h in histograms.items() if sum(h)}
    for name, histogram in logged.items():
        steps = np.arange(1, len(histogram) + 1)
        ax.plot(steps, 100 * np.array(histogram) / sum(histogram), "-o", label=name)
    if logged:
        ax.legend(fontsize="small")
    else:
        ax.text(0.5, 0.5, "no train/steps_hist logged", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("ACT steps until halting")
    ax.set_ylabel("halted rows (%)")
    ax.set_title("ACT steps in training")
    return _save(fig, path)


def pareto_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats with fewer (or equal) parameters and higher (or equal) accuracy."""
    frontier: list[tuple[float, float]] = []
    for params, accuracy in sorted(points, key=lambda p: (p[0], -p[1])):
        if not frontier or accuracy > frontier[-1][1]:
            frontier.append((params, accuracy))
    return frontier


def plot_params_pareto(summaries: list[RunSummary], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    known = [s for s in summaries if s.num_params is not None and s.evaluated]
    points = [(float(s.num_params), s.test_em * 100) for s in known]
    ax.scatter([p[0] for p in points], [p[1] for p in points])
    for s, (x, y) in zip(known, points, strict=True):
        ax.annotate(s.name, (x, y), textcoords="offset points", xytext=(4, 4))
    frontier = pareto_frontier(points)
    if frontier:
        rightmost = max(p[0] for p in points)
        xs, ys = [p[0] for p in frontier] + [rightmost], [p[1] for p in frontier] + [frontier[-1][1]]
        ax.step(xs, ys, where="post", color="C3", label="Pareto frontier")
        ax.scatter(xs[:-1], ys[:-1], s=120, facecolors="none", edgecolors="C3")
        ax.legend()
        if rightmost >= 10 * min(p[0] for p in points):
            ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("test EM pass@1 (%)")
    ax.set_title("Accuracy vs parameters")
    return _save(fig, path)


def plot_outcomes(outcomes: Outcomes, path: Path) -> Path:
    count = len(outcomes.puzzles)
    fig, ax = plt.subplots(
        figsize=(min(30.0, max(8.0, 3 + 0.15 * count)), max(3.0, 1.5 + 0.4 * len(outcomes.runs))),
        layout="constrained",
    )
    cmap = plt.get_cmap("Greens").with_extremes(bad="#dddddd")
    ax.imshow(
        np.ma.masked_invalid(outcomes.solved),
        cmap=cmap,
        vmin=0,
        vmax=1,
        aspect="auto",
        interpolation="nearest",
    )
    ax.set_yticks(range(len(outcomes.runs)), outcomes.runs)
    if count <= 60:
        ax.set_xticks(range(count), outcomes.puzzles, rotation=90, fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{count} test puzzles")
    ax.set_title("Test puzzles solved within 2 attempts (green: solved; grey: not evaluated)", fontsize=10)
    return _save(fig, path)


def plot_confusions(confusions: dict[str, Confusion], path: Path) -> Path:
    count = len(confusions)
    fig, axes = plt.subplots(1, count, figsize=(4.2 * count, 4.6), squeeze=False, layout="constrained")
    for ax, (name, confusion) in zip(axes[0], confusions.items(), strict=True):
        ax.imshow(confusion.counts, cmap="Reds", vmin=0)
        darkest = confusion.counts.max()
        for (i, j), value in np.ndenumerate(confusion.counts):
            if value:
                colour = "white" if value > darkest / 2 else "black"
                ax.text(j, i, str(value), ha="center", va="center", fontsize=7, color=colour)
        ax.set_xticks(range(NUM_COLORS))
        ax.set_yticks(range(NUM_COLORS))
        ax.set_xlabel("predicted colour")
        ax.set_ylabel("expected colour")
        ax.set_title(
            f"{name}\n{confusion.shape_mismatches} wrong shape, {confusion.no_prediction} no grid", fontsize=9
        )
    fig.suptitle("Wrongly predicted cells (top-voted candidate, same-shape failures)")
    return _save(fig, path)


def draw_grid(ax: plt.Axes, grid: np.ndarray | None, title: str) -> None:
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    if grid is None:
        ax.text(0.5, 0.5, "no grid", ha="center", va="center", transform=ax.transAxes)
        return
    ax.imshow(grid, cmap=ARC_CMAP, vmin=0, vmax=NUM_COLORS - 1, interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, grid.shape[1], 1), minor=True)
    ax.set_yticks(np.arange(-0.5, grid.shape[0], 1), minor=True)
    ax.grid(which="minor", color="#555555", linewidth=0.5)
    ax.tick_params(which="minor", length=0)


def plot_gallery(rows: list[tuple[str, list[tuple[str, np.ndarray | None]]]], path: Path) -> Path:
    """One row per failed puzzle: (row title, [(panel title, grid), ...])."""
    columns = max(len(panels) for _, panels in rows)
    fig, axes = plt.subplots(
        len(rows),
        columns,
        figsize=(max(6.0, 1.9 * columns), 2.2 * len(rows) + 0.5),
        squeeze=False,
        layout="constrained",
    )
    for axes_row, (title, panels) in zip(axes, rows, strict=True):
        for ax in axes_row[len(panels) :]:
            ax.axis("off")
        for ax, (panel_title, grid) in zip(axes_row, panels, strict=False):
            draw_grid(ax, grid, panel_title)
        axes_row[0].set_ylabel(title, fontsize=8)
    fig.suptitle("Failed test puzzles: demos, expected and predicted output")
    return _save(fig, path)
