"""`etrm diagnose checkpoint`: what a reference TRM checkpoint holds, and whether ours reproduces its outputs.

With `--reference IO.npz` (the parity fixture's format) it replays the reference
evaluation protocol: K calls of the ACT wrapper on one batch from an all-halted
carry, then the mixed-halt probe (the carry after step `probe_after_step` with
halted flags `probe_halted_in`, called on the probe batch), and compares every
step's logits and Q values within |a−b| ≤ atol + rtol·|b|; halted flags, step
counters and the probe's carried data must match exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer

from etrm.errors import EtrmError

STEP_KEYS = (
    "inputs",
    "labels",
    "puzzle_identifiers",
    "logits",
    "q_halt_logits",
    "q_continue_logits",
    "halted",
    "steps",
)
PROBE_KEYS = (
    "probe_after_step",
    "probe_halted_in",
    "probe_inputs",
    "probe_labels",
    "probe_puzzle_identifiers",
    "probe_logits",
    "probe_q_halt_logits",
    "probe_q_continue_logits",
    "probe_halted_out",
    "probe_steps_out",
    "probe_current_inputs",
    "probe_current_puzzle_identifiers",
)
DISPLAY_COLUMNS = (
    "step",
    "logits abs / rel",
    "q_halt abs / rel",
    "q_continue abs / rel",
    "loss abs",
    "exact",
    "pass",
)


def load_reference(path: str | Path) -> dict[str, Any]:
    """The arrays of a parity fixture (.npz without pickles), checked for the keys the protocol needs."""
    import numpy as np

    path = Path(path)
    if path.is_file():
        with path.open("rb") as f:
            if f.read(2) != b"PK":  # an .npz is a zip archive
                raise EtrmError(f"--reference {path}: not an .npz file")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise EtrmError(f"--reference {path}: no such file") from None
    except Exception as e:  # np.load raises several types for a file that is not an npz
        raise EtrmError(f"--reference {path}: not a readable .npz file ({e})") from None
    missing = [k for k in STEP_KEYS + PROBE_KEYS if k not in arrays]
    if missing:
        raise EtrmError(f"--reference {path}: missing arrays {', '.join(missing)}")
    return arrays


def _batch(reference: dict[str, Any], prefix: str = "") -> dict:
    import torch

    return {
        k: torch.from_numpy(reference[prefix + k]).long() for k in ("inputs", "labels", "puzzle_identifiers")
    }


def reference_steps(head, reference: dict[str, Any]) -> Iterator[tuple[str, Any, Any, dict, dict]]:
    """Run the fixture's protocol through an ACTLossHead; yields (label, carry, loss, metrics, outputs).

    Labels are the step indices "0".."K-1", then "probe".
    """
    import torch

    batch = _batch(reference)
    probe_after = int(reference["probe_after_step"])
    with torch.inference_mode():
        carry = head.initial_carry(batch)
        for step in range(reference["logits"].shape[0]):
            carry, loss, metrics, outputs, _ = head(carry, batch)
            if step == probe_after:
                probe_from = carry
            yield str(step), carry, loss, metrics, outputs
        probe_carry = dataclasses.replace(
            probe_from, halted=torch.from_numpy(reference["probe_halted_in"]).bool()
        )
        carry, loss, metrics, outputs, _ = head(probe_carry, _batch(reference, "probe_"))
        yield "probe", carry, loss, metrics, outputs


def _close(ours, theirs, atol: float, rtol: float) -> tuple[float, float, bool]:
    """(max |a−b|, max |a−b| / max(|b|, atol), all within atol + rtol·|b|)."""
    import numpy as np

    a = ours.detach().double().cpu().numpy()
    b = np.asarray(theirs, dtype=np.float64)
    if a.shape != b.shape:
        raise EtrmError(
            f"--reference: an array of shape {list(b.shape)} where the model gives {list(a.shape)}"
        )
    err = np.abs(a - b)
    return (
        float(err.max()),
        float((err / np.maximum(np.abs(b), atol)).max()),
        bool((err <= atol + rtol * np.abs(b)).all()),
    )


def compare_with_reference(
    model, reference: dict[str, Any], atol: float = 1e-4, rtol: float = 1e-4
) -> list[dict]:
    """One row per step (and the probe): max abs/rel differences and exact-match checks."""
    import numpy as np

    from etrm.console import make_progress
    from etrm.models.losses import ACTLossHead

    def same(ours, theirs) -> bool:
        return np.array_equal(ours.cpu().numpy(), np.asarray(theirs))

    head = ACTLossHead(model.eval())
    rows = []
    with make_progress(transient=True) as progress:
        task = progress.add_task("reference steps", total=reference["logits"].shape[0] + 1, info="")
        for label, carry, loss, _, outputs in reference_steps(head, reference):
            probe = label == "probe"
            ref = {
                k: reference[("probe_" if probe else "") + k]
                for k in ("logits", "q_halt_logits", "q_continue_logits")
            }
            if not probe:
                ref = {k: v[int(label)] for k, v in ref.items()}
            row: dict[str, Any] = {"step": label}
            passed = True
            for name, key in (
                ("logits", "logits"),
                ("q_halt", "q_halt_logits"),
                ("q_continue", "q_continue_logits"),
            ):
                row[f"{name}_abs"], row[f"{name}_rel"], ok = _close(outputs[key], ref[key], atol, rtol)
                passed &= ok
            if "loss" in reference and not probe:
                row["loss_abs"], _, ok = _close(loss, reference["loss"][int(label)], atol, rtol)
                passed &= ok
            halted_ref = reference["probe_halted_out"] if probe else reference["halted"][int(label)]
            steps_ref = reference["probe_steps_out"] if probe else reference["steps"][int(label)]
            row["halted"] = same(carry.halted, halted_ref)
            row["steps"] = same(carry.steps, steps_ref)
            passed &= row["halted"] and row["steps"]
            if probe:
                row["carried_data"] = same(
                    carry.current_data["inputs"], reference["probe_current_inputs"]
                ) and same(
                    carry.current_data["puzzle_identifiers"], reference["probe_current_puzzle_identifiers"]
                )
                passed &= row["carried_data"]
            row["pass"] = bool(passed)
            rows.append(row)
            progress.advance(task)
    return rows


def _display_row(row: dict[str, Any]) -> dict[str, str]:
    """A compact table row: differences as 'abs / rel', the exact checks folded into one cell."""
    differing = [name for name in ("halted", "steps", "carried_data") if row.get(name) is False]
    out = {"step": row["step"], "loss abs": f"{row['loss_abs']:.1e}" if "loss_abs" in row else ""}
    for name in ("logits", "q_halt", "q_continue"):
        out[f"{name} abs / rel"] = f"{row[name + '_abs']:.1e} / {row[name + '_rel']:.1e}"
    out["exact"] = "differs: " + ", ".join(differing) if differing else "ok"
    out["pass"] = "yes" if row["pass"] else "NO"
    return out


def checkpoint_command(
    path: Path = typer.Argument(
        ..., help="A reference TRM checkpoint (a step_N file, or its folder: the latest)."
    ),
    config: Path = typer.Option(
        None,
        "--config",
        help="JSON or YAML (TRM's all_config.yaml) with an 'arch' section: heads, cycles, steps.",
    ),
    reference: Path = typer.Option(
        None, "--reference", help="Parity fixture .npz to replay and compare against."
    ),
    atol: float = typer.Option(1e-4, "--atol", help="Absolute tolerance."),
    rtol: float = typer.Option(1e-4, "--rtol", help="Relative tolerance."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
) -> None:
    """Inspect a reference TRM checkpoint: inferred arch, parameter count, missing/unexpected keys.

    With --reference, replay the fixture's step protocol (incl. the mixed-halt probe) and print
    per-step max abs/rel differences; exits 1 when any step is above tolerance.
    """
    import torch

    from etrm.console import console, emit, print_json
    from etrm.models.trm_checkpoint import load_trm_model, trm_arch_from_json

    arch_config = trm_arch_from_json(config) if config is not None else None
    fixture = load_reference(reference) if reference is not None else None
    model, arch, sources, report, ckpt = load_trm_model(path, arch_config)
    decoder_params = sum(p.numel() for p in model.decoder.parameters())
    summary = {
        "checkpoint": str(ckpt.path),
        "trained_dtype": str(ckpt.tensors.get("H_init", torch.empty(0)).dtype).removeprefix("torch."),
        "arch": {name: getattr(arch, name) for name in sources},
        "arch_sources": sources,
        "decoder_parameters": decoder_params,
        "puzzle_table_parameters": model.encoder.weights.numel(),
        "missing": report.missing,
        "unexpected": report.unexpected,
    }
    rows = compare_with_reference(model, fixture, atol, rtol) if fixture is not None else None
    if as_json:
        print_json(
            summary if rows is None else summary | {"reference": {"atol": atol, "rtol": rtol, "steps": rows}}
        )
    else:
        facts = [
            {"field": "checkpoint", "value": summary["checkpoint"], "source": ""},
            {"field": "trained dtype", "value": summary["trained_dtype"], "source": "checkpoint"},
            *({"field": k, "value": v, "source": sources[k]} for k, v in summary["arch"].items()),
            {"field": "decoder parameters", "value": f"{decoder_params:,}", "source": "checkpoint"},
            {
                "field": "puzzle table entries",
                "value": f"{summary['puzzle_table_parameters']:,}",
                "source": "checkpoint",
            },
            {"field": "missing keys", "value": ", ".join(report.missing) or "none", "source": ""},
            {"field": "unexpected keys", "value": ", ".join(report.unexpected) or "none", "source": ""},
        ]
        emit(facts, ["field", "value", "source"], as_json=False, title="TRM checkpoint")
        if rows is not None:
            title = f"Parity with {reference.name} (|a−b| ≤ {atol:g} + {rtol:g}·|b|)"
            emit([_display_row(r) for r in rows], DISPLAY_COLUMNS, as_json=False, title=title)
            verdict = "all steps within tolerance" if all(r["pass"] for r in rows) else "ABOVE TOLERANCE"
            console.print(verdict, style="green" if all(r["pass"] for r in rows) else "bold red")
    if rows is not None and not all(r["pass"] for r in rows):
        raise typer.Exit(1)
