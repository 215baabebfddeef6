"""Gradient-health classes and windows, and ACT step statistics, on hand-made runs."""

import json
import math
import subprocess
import sys

import pytest
from diagnose_run_folders import TRAIN_ROWS_PER_WINDOW, make_run

from etrm.diagnose.act import act_stats
from etrm.diagnose.grad_health import grad_health, health_class, row_ratio
from etrm.diagnose.runs import load_run


def etrm(*args):
    return subprocess.run([sys.executable, "-m", "etrm", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "ratio, expected",
    [
        (0.0, "unhealthy"),
        (0.0999, "unhealthy"),
        (0.1, "warning"),  # the boundaries belong to "warning": 0.1 ≤ ratio ≤ 0.2
        (0.1001, "warning"),
        (0.1999, "warning"),
        (0.2, "warning"),
        (0.2001, "healthy"),
        (0.9, "healthy"),
        (math.nan, "unknown"),
    ],
)
def test_health_classes_at_and_around_the_boundaries(ratio, expected):
    assert health_class(ratio) == expected


def test_row_ratio_is_encoder_over_total_and_falls_back_to_both_parts():
    assert row_ratio({"grad/encoder_norm": 0.5, "grad/inner_norm": 9.0, "grad/total_norm": 2.0}) == 0.25
    assert row_ratio({"grad/encoder_norm": 3.0, "grad/inner_norm": 4.0}) == pytest.approx(3.0 / 5.0)
    assert math.isnan(row_ratio({"grad/encoder_norm": 1.0, "grad/total_norm": 0.0}))
    assert math.isnan(row_ratio({"grad/encoder_norm": float("nan"), "grad/total_norm": 1.0}))
    assert math.isnan(row_ratio({"train/lm_loss": 1.0}))


def test_grad_health_per_window_verdict_and_trend(tmp_path):
    run = load_run(make_run(tmp_path, "A", test_em=[0.1, 0.2, 0.3], ratio=[0.35, 0.15, 0.05]))
    health = grad_health(run)
    assert [w.ratio for w in health.windows] == pytest.approx([0.35, 0.15, 0.05])
    assert [w.health for w in health.windows] == ["healthy", "warning", "unhealthy"]
    assert [w.rows for w in health.windows] == [TRAIN_ROWS_PER_WINDOW] * 3
    assert health.windows[0].encoder_norm == pytest.approx(0.7)
    assert health.windows[0].inner_norm == pytest.approx(2 * math.sqrt(1 - 0.35**2))
    assert (health.ratio, health.health, health.trend) == (pytest.approx(0.05), "unhealthy", "falling")
    assert health.change == pytest.approx(-0.30)  # a straight line through the three windows

    rising = grad_health(load_run(make_run(tmp_path, "B", test_em=[0.1, 0.2], ratio=[0.1, 0.3])))
    assert (rising.trend, rising.health) == ("rising", "healthy")
    steady = grad_health(load_run(make_run(tmp_path, "C", test_em=[0.1, 0.2], ratio=[0.3, 0.31])))
    assert steady.trend == "steady"


def test_grad_health_cli_json(tmp_path):
    path = make_run(tmp_path, "A", test_em=[0.1, 0.2], ratio=[0.12, 0.25])
    cli = etrm("diagnose", "grad-health", str(path), "--json")
    assert cli.returncode == 0, cli.stderr
    out = json.loads(cli.stdout)
    assert [w["health"] for w in out["windows"]] == ["warning", "healthy"]
    assert out["ratio"] == pytest.approx(0.25) and out["health"] == "healthy" and out["trend"] == "rising"


def test_act_statistics_sum_the_logged_histograms(tmp_path):
    hist = [0, 2, 3, 5, 0, 0, 0, 1]
    run = load_run(make_run(tmp_path, "A", test_em=[0.1, 0.2], steps_hist=hist))
    stats = act_stats(run)
    assert stats.histogram == [2 * TRAIN_ROWS_PER_WINDOW * c for c in hist]
    assert (stats.min_steps, stats.max_steps) == (2, 8)
    # halted rows: 2 at 2 steps, 3 at 3, 5 at 4, 1 at 8 (the logged train/steps of 4.0 is not used)
    assert stats.mean_steps == pytest.approx((2 * 2 + 3 * 3 + 5 * 4 + 1 * 8) / 11)
    assert stats.q_halt_accuracy == pytest.approx(0.8)
    assert stats.stuck_at is None and stats.warning is None
    assert [w.histogram for w in stats.windows] == [[TRAIN_ROWS_PER_WINDOW * c for c in hist]] * 2


@pytest.mark.parametrize(
    "hist, stuck_at",
    [
        ([0, 0, 0, 10], 4),  # every halted row at the maximum
        ([0, 1, 19, 0], 3),  # exactly 95% at one value: stuck
        ([0, 2, 18, 0], None),  # 90%: not stuck
    ],
)
def test_act_stuck_detection(tmp_path, hist, stuck_at):
    stats = act_stats(load_run(make_run(tmp_path, "A", test_em=[0.1], steps_hist=hist)))
    assert stats.stuck_at == stuck_at
    assert (stats.warning is not None) == (stuck_at is not None)


def test_act_stuck_from_mean_steps_when_no_histogram_is_logged(tmp_path):
    path = tmp_path / "A"
    path.mkdir()
    rows = [{"step": s, "epoch": 1.0, "train/steps": 16.0} for s in (1, 2, 3)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert act_stats(load_run(path)).stuck_at == 16
    rows[1]["train/steps"] = 12.0
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert act_stats(load_run(path)).stuck_at is None


def test_act_cli_warns_when_stuck(tmp_path):
    path = make_run(tmp_path, "A", test_em=[0.1], steps_hist=[0, 0, 0, 0, 7])
    cli = etrm("diagnose", "act", str(path))
    assert cli.returncode == 0, cli.stderr
    assert "stuck at 5" in cli.stderr
    out = json.loads(etrm("diagnose", "act", str(path), "--json").stdout)
    assert out["stuck_at"] == 5 and out["histogram"][4] == {"steps": 5, "halted rows": 28, "share": 1.0}
