"""Run-folder checkpoints: `step-N/` with safetensors weights, the config and the trainer state.

A checkpoint folder is written under a temporary name and renamed when complete, so a run
killed mid-write leaves only a stray temp folder; the newest complete `step-N/` is what a
resume or `load_for_inference` reads. Trainer state loads with `weights_only=True`.

`checkpoint.json` records a sha256 per file (and the dataset the run trained on); every read
checks the file against it, so flipped bytes are an error naming the file, never weights
silently loaded. Checkpoints from before it existed load with a warning that they are unverified.
"""

from __future__ import annotations

import functools
import hashlib
import io
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
META_FILE = "checkpoint.json"
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
    dataset: dict[str, Any] | None = None,
    protect: Path | None = None,
) -> Path:
    """Write `run_dir/step-N/` atomically with its checksums (and `dataset`, the manifest trained on),
    then drop all but the newest `keep` checkpoints, never `protect`."""
    from safetensors.torch import save_file

    final = run_dir / f"step-{step}"
    with atomic_dir(final, overwrite=True) as tmp:
        save_file(_tensors_for_file(model_state), str(tmp / MODEL_FILE))
        if ema_state is not None:
            save_file(_tensors_for_file(ema_state), str(tmp / EMA_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=1) + "\n")
        torch.save(trainer_state, tmp / STATE_FILE)
        sha256 = {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(tmp.iterdir())}
        meta = {"step": step, "sha256": sha256, "dataset": dataset}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    prune_checkpoints(run_dir, keep, protect)
    return final


def prune_checkpoints(run_dir: Path, keep: int, protect: Path | None = None) -> None:
    """Delete all but the newest `keep` complete checkpoints, except `protect`."""
    for old in complete_checkpoints(run_dir)[:-keep]:
        if protect is None or old.name != Path(protect).name:
            shutil.rmtree(old, ignore_errors=True)


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


def checkpoint_meta(ckpt: Path) -> dict[str, Any] | None:
    """A checkpoint's `checkpoint.json` (checksums, dataset), or None for one written before it existed."""
    path = ckpt / META_FILE
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EtrmError(f"{path}: cannot read ({e}); the checkpoint's checksums are lost") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict):
        raise EtrmError(f"{path}: not a checkpoint record (an object with 'sha256')")
    return meta


@functools.cache
def _warn_unverified(ckpt: Path) -> None:
    from etrm.console import err_console

    err_console.print(
        f"warning: {ckpt} has no {META_FILE} (an older etrm wrote it): its files are not verified",
        soft_wrap=True,
    )


def read_verified(path: Path) -> bytes:
    """The bytes of a checkpoint file, checked against the sha256 its `checkpoint.json` recorded."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise EtrmError(f"cannot read {path}: {e}") from None
    meta = checkpoint_meta(path.parent)
    if meta is None:
        _warn_unverified(path.parent)
        return data
    expected = meta["sha256"].get(path.name)
    if expected is None:
        raise EtrmError(f"{path}: not among the files {path.parent / META_FILE} records")
    if hashlib.sha256(data).hexdigest() != expected:
        raise EtrmError(
            f"{path}: corrupt (its sha256 differs from the one {META_FILE} recorded when it was saved)"
        )
    return data


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    data = read_verified(path)
    try:
        return load(data)
    except (SafetensorError, OSError) as e:
        raise EtrmError(f"cannot read weights {path}: {e}") from None


def load_trainer_state(path: Path) -> dict[str, Any]:
    data = read_verified(path / STATE_FILE)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means a corrupt or foreign file
        raise EtrmError(f"cannot read trainer state {path / STATE_FILE}: {e}") from None


def load_checkpoint_config(ckpt: Path) -> RunConfig:
    read_verified(ckpt / CONFIG_FILE)
    return load_config(ckpt / CONFIG_FILE)


def choose_weights(ckpt: Path, use_ema: bool = True) -> Path:
    """The EMA weights when asked for and the checkpoint has them, else the live ones.

    Which it has is what `checkpoint.json` records (a run with `train.ema=false` saves none): an
    EMA file recorded but gone is an incomplete checkpoint, never a reason to load other weights.
    """
    if not use_ema:
        return ckpt / MODEL_FILE
    meta = checkpoint_meta(ckpt)
    saved_ema = EMA_FILE in meta["sha256"] if meta is not None else (ckpt / EMA_FILE).is_file()
    if not saved_ema:
        return ckpt / MODEL_FILE
    if not (ckpt / EMA_FILE).is_file():
        raise EtrmError(
            f"{ckpt} lacks {EMA_FILE} although its {META_FILE} records it (use --no-ema for the raw weights)"
        )
    return ckpt / EMA_FILE


def describe_weights(path: Path) -> str:
    """'EMA weights of RUN/step-N' or 'raw weights of …': what an evaluation used."""
    kind = "EMA" if path.name == EMA_FILE else "raw (not EMA)"
    return f"{kind} weights of {path.parent} (step {checkpoint_step(path.parent)})"


def load_for_inference(path: str | Path, use_ema: bool = True):
    """(model in eval mode on CPU, RunConfig, step) from a run folder or a `step-N/` folder."""
    from etrm.models import build_model

    ckpt = resolve_checkpoint(path)
    cfg = load_checkpoint_config(ckpt)
    model = build_model(cfg.arch)
    weights_file = choose_weights(ckpt, use_ema)
    try:
        model.load_state_dict(load_weights(weights_file))
    except RuntimeError as e:
        raise EtrmError(f"{weights_file} does not match the model its config.json describes: {e}") from None
    model.eval()
    return model, cfg, checkpoint_step(ckpt)
