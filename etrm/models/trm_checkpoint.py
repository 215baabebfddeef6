"""Reading checkpoints written by the reference TRM trainer, and loading them into ETRM.

The reference saves `torch.save(model.state_dict())` of its torch.compile'd loss
head, so keys read `_orig_mod.model.inner.<name>` (`model.inner.<name>` when
compilation was off); EMA checkpoints have the same keys. `<name>` equals our
decoder's parameter name, except TRM's `puzzle_emb.weights`, which is the
puzzle-embedding context's `weights` table. Only plain tensors are read
(`weights_only=True`), so a checkpoint cannot run code.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from etrm.config import ArchConfig, RunConfig
from etrm.errors import EtrmError
from etrm.models.layers import swiglu_inner_size

INNER_PREFIX = "model.inner."
PUZZLE_TABLE = "puzzle_emb.weights"
TOKEN_EMBEDDING = "embed_tokens.embedding_weight"
# Reference arch keys that have no ArchConfig field and do not change the function computed.
_IGNORED_TRM_KEYS = {"name", "loss", "batch_size", "H_layers", "causal"}
# Reference arch keys copied into ArchConfig as they are.
_SHARED_TRM_KEYS = {
    "hidden_size",
    "num_heads",
    "expansion",
    "L_layers",
    "H_cycles",
    "L_cycles",
    "halt_max_steps",
    "halt_exploration_prob",
    "no_ACT_continue",
    "rope_theta",
    "rms_norm_eps",
    "vocab_size",
    "seq_len",
    "puzzle_emb_len",
    "puzzle_emb_ndim",
    "num_puzzle_identifiers",
    "forward_dtype",
}


@dataclass
class TrmCheckpoint:
    path: Path
    tensors: dict[str, torch.Tensor]  # keyed by the name inside `model.inner.`
    outside_keys: list[str]  # keys of the file that are not under `model.inner.`


@dataclass
class LoadReport:
    loaded: list[str] = field(default_factory=list)  # ETRM keys filled from the checkpoint
    missing: list[str] = field(default_factory=list)  # ETRM keys the checkpoint did not fill
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys with no place in the model
    dropped: list[str] = field(default_factory=list)  # checkpoint keys deliberately not loaded


def _latest_step_file(folder: Path) -> Path:
    steps = [(int(m.group(1)), p) for p in folder.iterdir() if (m := re.fullmatch(r"step_(\d+)", p.name))]
    if not steps:
        raise EtrmError(f"{folder}: a folder without TRM checkpoints (expected files named step_N)")
    return max(steps)[1]


def read_trm_checkpoint(path: str | Path) -> TrmCheckpoint:
    """The tensors of a reference TRM checkpoint (a file, or a folder of `step_N` files: the latest)."""
    path = Path(path)
    if path.is_dir():
        path = _latest_step_file(path)
    if not path.is_file():
        raise EtrmError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types for bad bytes; all mean "not loadable"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise EtrmError(
            f"{path}: not a readable PyTorch checkpoint (corrupt, truncated, or not saved as plain tensors): {reason}"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()
    ):
        raise EtrmError(f"{path}: not a state_dict (expected a mapping of parameter names to tensors)")
    tensors, outside = {}, []
    for key, value in state.items():
        name = key.removeprefix("_orig_mod.")
        if name.startswith(INNER_PREFIX):
            tensors[name[len(INNER_PREFIX) :]] = value
        else:
            outside.append(key)
    if TOKEN_EMBEDDING not in tensors:
        raise EtrmError(
            f"{path}: not a TRM checkpoint (no '_orig_mod.{INNER_PREFIX}{TOKEN_EMBEDDING}'; "
            f"it has {len(state)} keys, e.g. {', '.join(list(state)[:3]) or 'none'})"
        )
    return TrmCheckpoint(path, tensors, outside)


def trm_arch_from_json(path: str | Path) -> ArchConfig:
    """ArchConfig from a config file whose "arch" holds the reference's arch config (or ETRM's own).

    JSON, or YAML for a .yaml/.yml file: the `all_config.yaml` TRM's training writes beside its
    checkpoints (the whole run config; only its `arch` section is read).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise EtrmError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as e:
        raise EtrmError(f"config file {path} is not text: {e}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            config = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise EtrmError(f"config file {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    else:
        try:
            config = json.loads(text)
        except json.JSONDecodeError as e:
            raise EtrmError(f"config file {path} is not valid JSON: {e}") from None
    try:
        arch = config["arch"]
    except (KeyError, TypeError):
        raise EtrmError(f"config file {path} has no 'arch' object") from None
    if not isinstance(arch, dict):
        raise EtrmError(f"config file {path}: 'arch' must be an object")
    if arch.get("pos_encodings", "rope") != "rope" or arch.get("mlp_t", False):
        raise EtrmError(
            f"config file {path}: only TRM with pos_encodings='rope' and mlp_t=false is supported"
        )
    own_fields = set(ArchConfig.__dataclass_fields__)
    unknown = set(arch) - own_fields - _IGNORED_TRM_KEYS - {"pos_encodings", "mlp_t"}
    if unknown:
        raise EtrmError(f"config file {path}: unknown arch keys {', '.join(sorted(unknown))}")
    values = {k: v for k, v in arch.items() if k in own_fields}
    if values.get("puzzle_emb_ndim", 0) > 0 and "encoder_type" not in values:
        values["encoder_type"] = "puzzle_embedding"
    try:
        return ArchConfig(**values)
    except TypeError as e:
        raise EtrmError(f"config file {path}: {e}") from None


def infer_trm_arch(
    ckpt: TrmCheckpoint, config: ArchConfig | None = None
) -> tuple[ArchConfig, dict[str, str]]:
    """The arch of a TRM checkpoint: shapes give the sizes; the rest comes from `config` or the defaults.

    Returns (arch, source of each reported field: "checkpoint", "config" or "default").
    A config that disagrees with the checkpoint's shapes is an error.
    """
    t = ckpt.tensors
    vocab, hidden = t[TOKEN_EMBEDDING].shape
    layers = sorted({int(m.group(1)) for k in t if (m := re.match(r"L_level\.layers\.(\d+)\.", k))})
    if not layers or layers != list(range(len(layers))):
        raise EtrmError(f"{ckpt.path}: TRM checkpoint without a consecutive L_level.layers.N stack")
    down = t.get("L_level.layers.0.mlp.down_proj.weight")
    if down is None or down.ndim != 2:
        raise EtrmError(f"{ckpt.path}: TRM checkpoint without L_level.layers.0.mlp.down_proj.weight")
    inner = down.shape[1]
    table = t.get(PUZZLE_TABLE)
    found = {"hidden_size": hidden, "vocab_size": vocab, "L_layers": len(layers)}
    if table is not None:
        found |= {"num_puzzle_identifiers": table.shape[0], "puzzle_emb_ndim": table.shape[1]}
    base = config or ArchConfig()
    if config is not None:
        for name, value in found.items():
            wanted = getattr(config, name) or (hidden if name == "puzzle_emb_ndim" else 0)
            if wanted and wanted != value:
                raise EtrmError(
                    f"{ckpt.path}: the checkpoint has {name}={value} but the config says {wanted}"
                )
        if swiglu_inner_size(hidden, config.expansion) != inner:
            raise EtrmError(
                f"{ckpt.path}: the checkpoint's SwiGLU inner size is {inner} but expansion={config.expansion} "
                f"gives {swiglu_inner_size(hidden, config.expansion)}"
            )
        expansion = config.expansion
    else:
        expansion = (
            base.expansion if swiglu_inner_size(hidden, base.expansion) == inner else inner * 1.5 / hidden
        )
    # Without a puzzle table the model still gets one (all zero, reported missing): the blank id only.
    table_fields = {"num_puzzle_identifiers": base.num_puzzle_identifiers or 1, "puzzle_emb_ndim": hidden}
    arch = replace(base, **(table_fields | found), expansion=expansion, encoder_type="puzzle_embedding")
    arch.context_len = -(-arch.puzzle_emb_ndim // hidden)
    try:
        RunConfig(arch=arch).validate()
    except EtrmError as e:
        raise EtrmError(f"{ckpt.path}: {e}") from None
    given = "config" if config is not None else "default"
    sources = dict.fromkeys(found, "checkpoint") | {"expansion": "checkpoint"}
    for name in (
        "num_heads",
        "H_cycles",
        "L_cycles",
        "halt_max_steps",
        "seq_len",
        "rope_theta",
        "rms_norm_eps",
    ):
        sources[name] = given
    return arch, sources


def _etrm_key(trm_key: str, table_in_model: bool) -> str | None:
    """Our state_dict key for a TRM inner key; None when it is TRM's puzzle table and the model has none."""
    if trm_key == PUZZLE_TABLE:
        return "encoder.weights" if table_in_model else None
    return "decoder." + trm_key


def load_trm_weights(model: torch.nn.Module, ckpt: TrmCheckpoint) -> LoadReport:
    """Copy a TRM checkpoint into an ETRM model by key; shape mismatches are errors naming the key."""
    from etrm.models.puzzle_embedding import PuzzleEmbeddingContext

    table_in_model = isinstance(model.encoder, PuzzleEmbeddingContext)
    own = model.state_dict()
    report, incoming = LoadReport(), {}
    for trm_key, value in ckpt.tensors.items():
        key = _etrm_key(trm_key, table_in_model)
        if key is None:
            report.dropped.append(trm_key)
        elif key not in own:
            report.unexpected.append(trm_key)
        elif own[key].shape != value.shape:
            raise EtrmError(
                f"{ckpt.path}: {trm_key} has shape {list(value.shape)} in the checkpoint but {list(own[key].shape)} "
                f"in the model; the checkpoint is of another model size"
            )
        else:
            incoming[key] = value
    report.unexpected += ckpt.outside_keys
    model.load_state_dict(incoming, strict=False)
    report.loaded = sorted(incoming)
    report.missing = [k for k in own if k not in incoming]
    return report


def init_decoder_from_trm(model: torch.nn.Module, path: str | Path) -> LoadReport:
    """Start ETRM's decoder from a TRM checkpoint ("pretrained decoder").

    Every decoder tensor must come from the checkpoint; the encoder's keys are
    reported missing (they keep their init) and TRM's puzzle table is dropped,
    unless the model's context is itself the puzzle-embedding table.
    """
    report = load_trm_weights(model, read_trm_checkpoint(path))
    decoder_missing = [k for k in report.missing if k.startswith("decoder.")]
    if decoder_missing or report.unexpected:
        raise EtrmError(
            f"{path}: does not match ETRM's decoder (missing {', '.join(decoder_missing) or 'none'}; "
            f"unexpected {', '.join(report.unexpected) or 'none'})"
        )
    return report


def load_trm_model(path: str | Path, config: ArchConfig | None = None):
    """(ETRM with TRM's puzzle table, arch, arch sources, load report, checkpoint) for a TRM checkpoint."""
    from etrm.models.act import build_model

    ckpt = read_trm_checkpoint(path)
    arch, sources = infer_trm_arch(ckpt, config)
    model = build_model(arch)
    report = load_trm_weights(model, ckpt)
    return model, arch, sources, report, ckpt
