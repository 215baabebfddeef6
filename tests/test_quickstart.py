"""`etrm quickstart` end to end, the few-shot scoring helpers, and the decoder's small-canvas mode it relies on."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from etrm.cli import main
from etrm.config import RunConfig, apply_overrides
from etrm.data.encoding import encode_grid, labels_from_tokens
from etrm.errors import EtrmError
from etrm.models import build_model
from etrm.quickstart import FEWSHOT_FAMILIES, family_scores

TINY = [
    "arch.hidden_size=16",
    "arch.num_heads=2",
    "arch.expansion=2",
    "arch.H_cycles=1",
    "arch.L_cycles=1",
    "arch.halt_max_steps=2",
    "arch.encoder_type=standard",
    "arch.encoder_num_layers=1",
    "arch.context_len=4",
]


def _corner_tokens(grid: np.ndarray, side: int) -> np.ndarray:
    """TRM's encoding written out directly on a side×side canvas (colour c → c+2, EOS=1 below and right)."""
    h, w = grid.shape
    canvas = np.zeros((side, side), dtype=np.int64)
    canvas[:h, :w] = grid + 2
    canvas[h, :w] = 1
    canvas[:h, w] = 1
    return canvas.reshape(-1)


def _batch(grids):
    tokens = torch.as_tensor(np.stack([encode_grid(g) for g in grids]).astype(np.int64))
    n = len(grids)
    return {
        "inputs": tokens,
        "labels": torch.as_tensor(labels_from_tokens(tokens.numpy())),
        "demo_inputs": tokens[:, None].repeat(1, 2, 1),
        "demo_outputs": tokens[:, None].repeat(1, 2, 1),
        "demo_mask": torch.ones(n, 2, dtype=torch.bool),
        "puzzle_identifiers": torch.zeros(n, dtype=torch.long),
    }


def test_small_canvas_decoder_sees_the_corner_and_predicts_pad_outside():
    torch.manual_seed(0)
    model = build_model(apply_overrides(RunConfig(), [*TINY, "arch.seq_len=81"]).arch).eval()
    rng = np.random.default_rng(0)
    grids = [rng.integers(0, 10, size=(3, 8)), rng.integers(0, 10, size=(8, 5))]
    batch = _batch(grids)
    with torch.no_grad():
        _, outputs = model(model.initial_carry(batch), batch)
        # The same decoder step on canvases built by hand at 9×9 must give the corner's logits.
        corner = torch.as_tensor(np.stack([_corner_tokens(g, 9) for g in grids]))
        z_H, z_L = model.decoder.reset_latents(
            torch.ones(2, dtype=torch.bool), *(torch.zeros(2, 16 + 81, 16) for _ in range(2))
        )
        context = model.encoder(batch).slots
        _, _, expected, _, _ = model.decoder(z_H, z_L, corner, context)
    logits = outputs["logits"].view(2, 30, 30, 12)
    torch.testing.assert_close(logits[:, :9, :9].reshape(2, 81, 12), expected)
    outside = torch.ones(30, 30, dtype=torch.bool)
    outside[:9, :9] = False
    assert (logits[:, outside].argmax(-1) == 0).all()  # PAD everywhere past the corner

    with pytest.raises(EtrmError, match="too small for a grid"):
        model(model.initial_carry(batch), _batch([rng.integers(0, 10, size=(4, 9))]))
    with pytest.raises(EtrmError, match="arch.seq_len must be a square side × side with side 1-30"):
        apply_overrides(RunConfig(), [*TINY, "arch.seq_len=80"])


def test_small_canvas_trains_the_corner_only():
    torch.manual_seed(0)
    model = build_model(apply_overrides(RunConfig(), [*TINY, "arch.seq_len=36"]).arch)
    batch = _batch([np.arange(12).reshape(3, 4) % 10])
    _, outputs = model(model.initial_carry(batch), batch)
    logits = outputs["logits"]
    logits.retain_grad()
    torch.nn.functional.cross_entropy(logits[0], batch["inputs"][0]).backward()
    grad = logits.grad.view(30, 30, 12)
    assert grad[:6, :6].abs().sum() > 0
    assert model.decoder.lm_head.weight.grad.abs().sum() > 0


def test_family_scores_average_pass_at_k_per_family():
    results = {
        "puzzles": {
            "gravity-test-0000": {"pass@k": {"1": 1.0, "2": 1.0}},
            "gravity-test-0001": {"pass@k": {"1": 0.5, "2": 1.0}},
            "border-test-0000": {"pass@k": {"1": 0.0, "2": 0.0}},
        }
    }
    assert family_scores(results) == {"gravity": (2, 0.75), "border": (1, 0.0)}
    assert family_scores(results, 2) == {"gravity": (2, 1.0), "border": (1, 0.0)}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--encoder", "transformer"], "--encoder 'transformer'"),
        (["--minutes", "0"], "--minutes 0"),
        (["--steps", "-1"], "--steps -1"),
    ],
)
def test_bad_options_fail_before_any_work(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["quickstart", "--out", str(tmp_path / "q"), *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_quickstart_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU runs this small model faster on one thread
    try:
        main(["quickstart", "--steps", "4", "--out", str(out), "--json"])
    finally:
        torch.set_num_threads(threads)
    summary = json.loads(capsys.readouterr().out)
    assert summary["step"] == 4 and summary["steps_per_s"] > 0

    synth = json.loads((out / "data" / ".." / "synth" / "synth.json").read_text())
    test_ids = sorted(t for t, info in synth["tasks"].items() if info["split"] == "test")
    rows = {r["family"]: r for r in summary["rows"]}
    assert set(rows) == {*FEWSHOT_FAMILIES, "all"}
    assert rows["all"]["puzzles"] == len(test_ids) == sum(rows[f]["puzzles"] for f in FEWSHOT_FAMILIES)

    run = Path(summary["run"])
    assert (run / f"step-{summary['step']}" / "model.safetensors").is_file()
    results = json.loads((run / "eval" / f"step-{summary['step']}" / "results.json").read_text())
    assert results["fewshot"] is True and sorted(results["puzzles"]) == test_ids
    # The printed table is results.json's scores, regrouped by family.
    for family in FEWSHOT_FAMILIES:
        scores = [p["pass@k"]["1"] for t, p in results["puzzles"].items() if t.startswith(family + "-")]
        assert rows[family]["pass@1"] == pytest.approx(sum(scores) / len(scores))
    assert rows["all"]["pass@1"] == pytest.approx(results["metrics"]["pass@1"])
    eval_rows = [
        r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "eval/pass@1" in r
    ]
    assert [r["step"] for r in eval_rows] == [summary["step"]]
    assert eval_rows[0]["eval/pass@1"] == pytest.approx(results["metrics"]["pass@1"])
    # Training never saw a test puzzle.
    train_ids = json.loads((out / "data" / "train" / "puzzles.json").read_text())
    assert not {p["id"] for p in train_ids} & set(test_ids)
    assert Path(summary["report"]).is_file()

    with pytest.raises(SystemExit) as exit_info:
        main(["quickstart", "--minutes", "0.2", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "already holds files" in capsys.readouterr().err


def test_recipe_gives_demo_encoders_the_lookup_and_the_baseline_not(tmp_path):
    from etrm.models.encoders import build_encoder
    from etrm.quickstart import fewshot_config

    for encoder, lookup in (("standard", True), ("hybrid_standard", True), ("puzzle_embedding", False)):
        cfg = fewshot_config(tmp_path, encoder, 1.0)
        assert cfg.arch.cell_lookup is lookup
        assert cfg.arch.encoder_type == encoder
        cfg.arch.num_puzzle_identifiers = 3
        build_encoder(cfg.arch)  # a valid model: the baseline has no demos to look up
    assert (
        fewshot_config(tmp_path, "standard", 1.0, extra=["arch.cell_lookup=false"]).arch.cell_lookup is False
    )


def test_a_step_count_replaces_the_time_budget(tmp_path):
    from etrm.quickstart import fewshot_config

    timed = fewshot_config(tmp_path, "standard", 3.0)
    assert (timed.train.max_minutes, timed.train.max_steps) == (3.0, 0)
    counted = fewshot_config(tmp_path, "standard", 3.0, steps=600)
    assert (counted.train.max_minutes, counted.train.max_steps) == (0.0, 600)


@pytest.mark.parametrize(("load", "loaded"), [(1.9, False), (2.0, False), (3.5, True)])
def test_quickstart_prints_steps_per_second_and_warns_on_a_loaded_machine(
    tmp_path, capsys, monkeypatch, load, loaded
):
    """Loaded = the 1-minute load average above the core count; the summary is faked, the output is real."""
    from etrm import quickstart

    monkeypatch.setattr(quickstart.os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setattr(quickstart.os, "cpu_count", lambda: 2)
    summary = {"rows": [], "run": "r", "report": "p", "data": "d", "step": 60, "steps_per_s": 60 / 40}
    monkeypatch.setattr(quickstart, "run_quickstart", lambda *a, **k: summary | quickstart.machine_load())
    main(["quickstart", "--steps", "60", "--out", str(tmp_path / "q")])
    captured = capsys.readouterr()
    assert "trained at 1.50 steps/s" in captured.out
    assert ("warning: the machine was loaded" in captured.err) is loaded
    if loaded:
        assert f"load average {load} on 2 cores" in captured.err and "--steps N" in captured.err
