"""Run-folder checkpoints: `step-N/` with safetensors weights, the config and the trainer state.

A checkpoint folder is written under a temporary name and renamed when complete, so a run
killed mid-write leaves only a stray temp folder; the newest complete `step-N/` is what a
resume or `load_for_inference` reads. Trainer state loads with `weights_only=True`.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from etrm.config import RunConfig, config_to_dict, load_config
from etrm.errors import EtrmError
from etrm.io import atomic_dir

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
CONFIG_FILE = "config.json"
STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _tensors_for_file(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage; independent CPU copies are always accepted.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None,
    cfg: RunConfig,
    trainer_state: dict[str, Any],
    keep: int,
) -> Path:
    """Write `run_dir/step-N/` atomically, then drop all but the newest `keep` checkpoints."""
    from safetensors.torch import save_file

    final = run_dir / f"step-{step}"
    with atomic_dir(final, overwrite=True) as tmp:
        save_file(_tensors_for_file(model_state), str(tmp / MODEL_FILE))
        if ema_state is not None:
            save_file(_tensors_for_file(ema_state), str(tmp / EMA_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=1) + "\n")
        torch.save(trainer_state, tmp / STATE_FILE)
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_partial_checkpoints(run_dir: Path) -> None:
    """Delete temp folders left by a run killed while writing a checkpoint."""
    for stray in run_dir.glob(".step-*.tmp-*"):
        shutil.rmtree(stray, ignore_errors=True)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """`step-N/` folders holding every required file, oldest first."""
    found = []
    for d in Path(run_dir).iterdir() if Path(run_dir).is_dir() else []:
        m = _STEP_DIR.match(d.name)
        if m and all((d / f).is_file() for f in (MODEL_FILE, CONFIG_FILE, STATE_FILE)):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def resolve_checkpoint(path: str | Path) -> Path:
    """A `step-N/` folder as given, or the newest complete one inside a run folder."""
    path = Path(path)
    if not path.exists():
        raise EtrmError(f"checkpoint path {path} does not exist")
    if _STEP_DIR.match(path.name) and (path / MODEL_FILE).is_file():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise EtrmError(
            f"{path} holds no complete checkpoint (step-N/ with {MODEL_FILE}, {CONFIG_FILE}, {STATE_FILE})"
        )
    return found[-1]


def checkpoint_step(path: Path) -> int:
    return int(_STEP_DIR.match(path.name).group(1))


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise EtrmError(f"cannot read weights {path}: {e}") from None


def load_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means a corrupt or foreign file
        raise EtrmError(f"cannot read trainer state {path / STATE_FILE}: {e}") from None


def load_for_inference(path: str | Path, use_ema: bool = True):
    """(model in eval mode on CPU, RunConfig, step) from a run folder or a `step-N/` folder."""
    from etrm.models import build_model

    ckpt = resolve_checkpoint(path)
    cfg = load_config(ckpt / CONFIG_FILE)
    model = build_model(cfg.arch)
    weights_file = ckpt / EMA_FILE if use_ema and (ckpt / EMA_FILE).is_file() else ckpt / MODEL_FILE
    try:
        model.load_state_dict(load_weights(weights_file))
    except RuntimeError as e:
        raise EtrmError(f"{weights_file} does not match the model its config.json describes: {e}") from None
    model.eval()
    return model, cfg, checkpoint_step(ckpt)
