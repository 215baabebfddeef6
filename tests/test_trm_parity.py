"""Our TRM reproduces the reference TRM's outputs on the shared parity fixture (config A)."""

import json

import numpy as np
import pytest
import torch
from reference_files import TRM_CHECKPOINT, TRM_CONFIG, TRM_IO  # tests/reference_files.py

from etrm.cli import main
from etrm.diagnose.checkpoint import load_reference, reference_steps
from etrm.models.losses import ACTLossHead
from etrm.models.trm_checkpoint import load_trm_model, trm_arch_from_json


def assert_within_tolerance(ours, theirs, what):
    """The fixture README's rule: |a−b| ≤ 1e-4 + 1e-4·|b|."""
    a = ours.detach().double().numpy() if torch.is_tensor(ours) else np.asarray(ours, dtype=np.float64)
    b = np.asarray(theirs, dtype=np.float64)
    assert a.shape == b.shape, what
    excess = np.abs(a - b) - (1e-4 + 1e-4 * np.abs(b))
    assert excess.max() <= 0, f"{what}: max |a−b| {np.abs(a - b).max():.3g}"


@pytest.fixture(scope="module")
def parity_run():
    model, arch, _, report, _ = load_trm_model(TRM_CHECKPOINT, trm_arch_from_json(TRM_CONFIG))
    assert report.missing == [] and report.unexpected == []
    reference = load_reference(TRM_IO)
    runs = list(reference_steps(ACTLossHead(model.eval()), reference))
    return model, reference, runs


def test_input_embeddings_match(parity_run):
    model, ref, _ = parity_run
    inputs = torch.from_numpy(ref["inputs"]).long()
    context = model.encoder({"puzzle_identifiers": torch.from_numpy(ref["puzzle_identifiers"]).long()}).slots
    with torch.no_grad():
        x = model.decoder.input_embeddings(inputs, context, torch.float32)
    assert_within_tolerance(x[:, :20], ref["input_embeddings_first20"], "input embeddings")
    assert not x[:, 1:16].any()  # puzzle_emb_ndim = hidden: slots 1..15 stay exactly zero


def test_every_step_matches_the_reference(parity_run):
    _, ref, runs = parity_run
    steps = [r for r in runs if r[0] != "probe"]
    assert len(steps) == ref["logits"].shape[0] == 4
    for k, (_, carry, loss, metrics, outputs) in enumerate(steps):
        assert_within_tolerance(outputs["logits"], ref["logits"][k], f"logits step {k}")
        assert_within_tolerance(outputs["q_halt_logits"], ref["q_halt_logits"][k], f"q_halt step {k}")
        assert_within_tolerance(
            outputs["q_continue_logits"], ref["q_continue_logits"][k], f"q_continue step {k}"
        )
        assert_within_tolerance(carry.z_H[:, 0], ref["z_H_pos0"][k], f"z_H step {k}")
        assert_within_tolerance(carry.z_L[:, 0], ref["z_L_pos0"][k], f"z_L step {k}")
        assert carry.halted.numpy().tolist() == ref["halted"][k].tolist()
        assert carry.steps.numpy().tolist() == ref["steps"][k].tolist()
        assert bool(carry.halted.all()) == bool(ref["all_finish"][k])
        assert_within_tolerance(loss, ref["loss"][k], f"loss step {k}")
        for name in (
            "count",
            "accuracy",
            "exact_accuracy",
            "q_halt_accuracy",
            "steps",
            "lm_loss",
            "q_halt_loss",
        ):
            assert_within_tolerance(metrics[name], ref[f"metric_{name}"][k], f"metric {name} step {k}")


def test_mixed_halt_probe_matches_the_reference(parity_run):
    _, ref, runs = parity_run
    label, carry, _, _, outputs = runs[-1]
    assert label == "probe"
    assert_within_tolerance(outputs["logits"], ref["probe_logits"], "probe logits")
    assert_within_tolerance(outputs["q_halt_logits"], ref["probe_q_halt_logits"], "probe q_halt")
    assert_within_tolerance(outputs["q_continue_logits"], ref["probe_q_continue_logits"], "probe q_continue")
    assert carry.halted.tolist() == ref["probe_halted_out"].tolist()
    assert carry.steps.tolist() == ref["probe_steps_out"].tolist() == [1, 3, 1, 3]
    assert np.array_equal(carry.current_data["inputs"].numpy(), ref["probe_current_inputs"])
    assert (
        carry.current_data["puzzle_identifiers"].tolist() == ref["probe_current_puzzle_identifiers"].tolist()
    )


def run_cli(capsys, *args):
    try:
        main(["diagnose", "checkpoint", *map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr()


def test_cli_reproduces_the_fixture(capsys):
    code, out = run_cli(capsys, TRM_CHECKPOINT, "--config", TRM_CONFIG, "--reference", TRM_IO, "--json")
    assert code == 0, out.err
    report = json.loads(out.out)
    assert report["missing"] == [] and report["unexpected"] == []
    assert report["arch"]["hidden_size"] == 64 and report["arch_sources"]["num_heads"] == "config"
    assert [row["step"] for row in report["reference"]["steps"]] == ["0", "1", "2", "3", "probe"]
    assert all(row["pass"] and row["logits_abs"] < 1e-4 for row in report["reference"]["steps"])


def test_cli_fails_above_tolerance(capsys, tmp_path):
    """A reference whose step-1 logits are off by 1e-3 (two steps kept, to stay quick) must fail with exit 1."""
    reference = load_reference(TRM_IO)
    reference["logits"] = reference["logits"][:2].copy()
    reference["logits"][1, 2, 5, 3] += 1e-3
    shifted = tmp_path / "shifted.npz"
    np.savez(shifted, **reference)
    code, out = run_cli(capsys, TRM_CHECKPOINT, "--config", TRM_CONFIG, "--reference", shifted, "--json")
    assert code == 1
    rows = json.loads(out.out)["reference"]["steps"]
    assert [row["pass"] for row in rows] == [True, False, True]
    assert rows[1]["logits_abs"] == pytest.approx(1e-3, rel=0.01)


def test_cli_rejects_bad_reference_files_clearly(capsys, tmp_path):
    code, out = run_cli(capsys, TRM_CHECKPOINT, "--reference", TRM_CONFIG)
    assert code == 2 and "not an .npz file" in out.err
    np.savez(tmp_path / "partial.npz", inputs=np.zeros((1, 900), np.int32))
    code, out = run_cli(capsys, TRM_CHECKPOINT, "--reference", tmp_path / "partial.npz")
    assert code == 2 and "missing arrays labels" in out.err
    assert "Traceback" not in out.err
