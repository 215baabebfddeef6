"""Typed run configuration: data, arch, train, logging; presets and dotted overrides.

Every experiment of the design is a named preset (`get_preset("SF2")`), adjusted
with dotted overrides (`apply_overrides(cfg, ["arch.hidden_size=64"])`); the
resolved copy saved in each run folder loads back with `load_config`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from etrm.data.encoding import CANVAS, VOCAB_SIZE
from etrm.errors import EtrmError

ENCODER_TYPES = ("standard", "hybrid_standard", "hybrid_variational", "lpn_var", "puzzle_embedding")
VARIATIONAL_SAMPLE = ("auto", "always", "never")


@dataclass
class DataConfig:
    path: str = "data/arc-agi-1"  # a folder written by `etrm data build`
    max_train_groups: int = 0  # train on the first N puzzle groups only (0 = all; overfit presets)
    max_demos: int = 10  # demo slots per episode (extra demos dropped, missing ones masked)
    translate: bool = False  # TRM's random-offset augmentation on the training side
    num_aug_train: int = 0  # augmentations drawn from in training (0 = all stored)


@dataclass
class ArchConfig:
    # TRM decoder (reference names where they exist)
    hidden_size: int = 512
    num_heads: int = 8
    expansion: float = 4.0
    L_layers: int = 2
    H_cycles: int = 3
    L_cycles: int = 4
    halt_max_steps: int = 16
    halt_exploration_prob: float = 0.1
    no_ACT_continue: bool = True
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    vocab_size: int = 12
    seq_len: int = 900
    puzzle_emb_len: int = 16  # prefix slots in front of the grid (TRM: 16)
    forward_dtype: str = "auto"  # auto = bfloat16 on CUDA, float32 elsewhere
    # Embed each cell's row and column counted from both ends of its grid (decoder and demo encoder);
    # off = TRM's function (positions through 1-D RoPE only). See etrm/models/grid_coords.py.
    grid_coords: bool = False
    # Each query cell also reads the demos directly: one cross-attention from the query's cells to
    # every demo cell state, added to the decoder's token embeddings (demo encoders only). See
    # etrm/models/encoder_parts.py (CellLookup).
    cell_lookup: bool = False
    # context provider
    encoder_type: str = "hybrid_standard"
    context_len: int = 16  # filled prefix slots (1..puzzle_emb_len); the rest stay zero
    encoder_num_layers: int = 4
    encoder_hidden_size: int = 0  # 0 = hidden_size
    encoder_num_heads: int = 0  # 0 = num_heads
    encoder_latent_dim: int = 0  # variational latent size; 0 = encoder hidden size
    encoder_reencode: bool = True
    kl_weight: float = 0.0
    # Variational encoders in training: auto = sample z = μ + σε when kl_weight > 0, use μ when it is 0
    # (KL 0 is deterministic, as the design's SF3/SF4 need); always | never force either. Eval uses μ.
    variational_sample: str = "auto"
    # puzzle_embedding baseline
    puzzle_emb_ndim: int = 0  # 0 = hidden_size
    num_puzzle_identifiers: int = 0  # filled from the dataset manifest


@dataclass
class TrainConfig:
    epochs: int = 1000
    max_steps: int = 0  # stop after N optimizer steps (0 = no limit)
    max_minutes: float = 0.0  # stop (and checkpoint) after this wall-clock time (0 = no limit)
    global_batch_size: int = 128
    optimizer: str = "adam_atan2"  # adam_atan2 | adamw
    lr: float = 1e-4
    lr_min_ratio: float = 1.0
    lr_warmup_steps: int = 2000
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    encoder_lr_scale: float = 1.0
    puzzle_emb_lr: float = 1e-2
    puzzle_emb_weight_decay: float = 0.1
    ema: bool = True
    ema_rate: float = 0.999
    spike_factor: float = 10.0
    eval_interval: int = 200  # epochs
    eval_num_aug: int = 8
    checkpoint_interval: int = 0  # epochs; 0 = at each evaluation
    keep_checkpoints: int = 3
    init_from: str = ""  # a TRM checkpoint for the decoder ("pretrained decoder")
    seed: int = 0
    # torch.compile the training step: off, or a torch.compile backend ("inductor" is its default; the
    # Triton kernels are custom ops it calls as they are and fuses the code around).
    compile: str = "off"


@dataclass
class LoggingConfig:
    project: str = "etrm"
    run_name: str = ""
    wandb: str = "offline"  # online | offline | disabled
    log_interval: int = 10  # optimizer steps


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    arch: ArchConfig = field(default_factory=ArchConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        """The one check of every value, run before anything is built: a bad value stops with one line
        naming the dotted key and its allowed range. Components then trust the config they are given."""
        for ok, key, allowed in _checks(self):
            if not ok:
                section, name = key.split(".")
                raise EtrmError(f"{key} must be {allowed}, got {getattr(getattr(self, section), name)!r}")


SECTIONS = ("data", "arch", "train", "logging")
OPTIMIZERS = ("adam_atan2", "adamw")
WANDB_MODES = ("online", "offline", "disabled")
SIZES = ("full", "cpu-smoke")
FORWARD_DTYPES = ("auto", "float32", "bfloat16")
FLOAT32_MAX = 3.4028234663852886e38  # values at or above it overflow to inf in float32
MAX_SEED = 2**63 - 1


# Learning rates above this overflow the optimizers' float32 state (AdamATan2 took 1e38 and died
# inside its step); no recipe uses more than 1e-2.
MAX_LR = 1.0


def _finite(value: float, low: float = 0.0, above: bool = False) -> bool:
    """low <= value (low < value when `above`) and finite in float32 (NaN fails every comparison)."""
    return (value > low if above else value >= low) and value < FLOAT32_MAX


def _checks(cfg: RunConfig) -> list[tuple[bool, str, str]]:
    """(holds, dotted key, allowed range) for every field; the first that fails is reported."""
    d, a, t, log = cfg.data, cfg.arch, cfg.train, cfg.logging
    heads = max(a.num_heads, 1)
    side = math.isqrt(max(a.seq_len, 0))
    encoder_width = a.encoder_hidden_size or a.hidden_size
    encoder_heads = a.encoder_num_heads or a.num_heads
    return [
        (d.path.strip() != "", "data.path", "a dataset folder"),
        (d.max_train_groups >= 0, "data.max_train_groups", "0 (all) or a number of puzzle groups"),
        (d.max_demos >= 1, "data.max_demos", "at least 1"),
        (d.num_aug_train >= 0, "data.num_aug_train", "0 (all stored) or a number of augmentations"),
        (a.hidden_size >= 1, "arch.hidden_size", "at least 1"),
        (a.num_heads >= 1, "arch.num_heads", "at least 1"),
        (a.hidden_size % heads == 0, "arch.num_heads", f"a divisor of hidden_size {a.hidden_size}"),
        (
            (a.hidden_size // heads) % 2 == 0,
            "arch.num_heads",
            "such that hidden_size / num_heads is even (RoPE)",
        ),
        (
            _finite(a.expansion, above=True) and round(a.expansion * a.hidden_size * 2 / 3) >= 1,
            "arch.expansion",
            "positive with expansion × hidden_size × 2/3 ≥ 1",
        ),
        (a.L_layers >= 1, "arch.L_layers", "at least 1"),
        (a.H_cycles >= 1, "arch.H_cycles", "at least 1"),
        (a.L_cycles >= 1, "arch.L_cycles", "at least 1"),
        (a.halt_max_steps >= 1, "arch.halt_max_steps", "at least 1"),
        (0.0 <= a.halt_exploration_prob <= 1.0, "arch.halt_exploration_prob", "between 0 and 1"),
        (_finite(a.rope_theta, above=True), "arch.rope_theta", "positive"),
        (_finite(a.rms_norm_eps, above=True), "arch.rms_norm_eps", "positive"),
        (
            a.vocab_size >= VOCAB_SIZE,
            "arch.vocab_size",
            f"at least {VOCAB_SIZE} (PAD, EOS, 10 colours)",
        ),
        (
            side * side == a.seq_len and 1 <= side <= CANVAS,
            "arch.seq_len",
            f"a square side × side with side 1-{CANVAS} (900 = full canvas)",
        ),
        (a.puzzle_emb_len >= 1, "arch.puzzle_emb_len", "at least 1"),
        (a.forward_dtype in FORWARD_DTYPES, "arch.forward_dtype", f"one of {', '.join(FORWARD_DTYPES)}"),
        (a.encoder_type in ENCODER_TYPES, "arch.encoder_type", f"one of {', '.join(ENCODER_TYPES)}"),
        (
            a.variational_sample in VARIATIONAL_SAMPLE,
            "arch.variational_sample",
            f"one of {', '.join(VARIATIONAL_SAMPLE)}",
        ),
        (
            not (a.cell_lookup and a.encoder_type == "puzzle_embedding"),
            "arch.cell_lookup",
            "false with encoder_type puzzle_embedding (it has no demos to read)",
        ),
        (1 <= a.context_len <= a.puzzle_emb_len, "arch.context_len", f"between 1 and {a.puzzle_emb_len}"),
        (a.encoder_num_layers >= 1, "arch.encoder_num_layers", "at least 1"),
        (a.encoder_hidden_size >= 0, "arch.encoder_hidden_size", "0 (= hidden_size) or positive"),
        (a.encoder_num_heads >= 0, "arch.encoder_num_heads", "0 (= num_heads) or positive"),
        (
            encoder_heads < 1 or encoder_width % encoder_heads == 0,
            "arch.encoder_hidden_size",
            f"a multiple of the encoder's heads ({encoder_heads})",
        ),
        (a.encoder_latent_dim >= 0, "arch.encoder_latent_dim", "0 (= encoder width) or positive"),
        (_finite(a.kl_weight), "arch.kl_weight", "0 or positive"),
        (a.puzzle_emb_ndim >= 0, "arch.puzzle_emb_ndim", "0 (= hidden_size) or positive"),
        (
            -(-(a.puzzle_emb_ndim or a.hidden_size) // max(a.hidden_size, 1)) <= a.puzzle_emb_len,
            "arch.puzzle_emb_ndim",
            f"at most puzzle_emb_len × hidden_size = {a.puzzle_emb_len * a.hidden_size}",
        ),
        (
            a.num_puzzle_identifiers >= 0,
            "arch.num_puzzle_identifiers",
            "0 or positive (set from the dataset)",
        ),
        (t.epochs >= 1, "train.epochs", "at least 1"),
        (t.max_steps >= 0, "train.max_steps", "0 (no limit) or a number of steps"),
        (_finite(t.max_minutes), "train.max_minutes", "0 (no limit) or a number of minutes"),
        (t.global_batch_size >= 1, "train.global_batch_size", "at least 1"),
        (t.optimizer in OPTIMIZERS, "train.optimizer", f"one of {', '.join(OPTIMIZERS)}"),
        (_finite(t.lr, above=True) and t.lr <= MAX_LR, "train.lr", f"positive and at most {MAX_LR:g}"),
        (0.0 <= t.lr_min_ratio <= 1.0, "train.lr_min_ratio", "between 0 and 1"),
        (t.lr_warmup_steps >= 0, "train.lr_warmup_steps", "0 or a number of steps"),
        (_finite(t.weight_decay), "train.weight_decay", "0 or positive"),
        (0.0 <= t.beta1 < 1.0, "train.beta1", "in [0, 1)"),
        (0.0 <= t.beta2 < 1.0, "train.beta2", "in [0, 1)"),
        (_finite(t.grad_clip), "train.grad_clip", "0 (off) or a positive norm"),
        (_finite(t.encoder_lr_scale), "train.encoder_lr_scale", "0 or positive"),
        (
            _finite(t.puzzle_emb_lr) and t.puzzle_emb_lr <= MAX_LR,
            "train.puzzle_emb_lr",
            f"between 0 and {MAX_LR:g}",
        ),
        (_finite(t.puzzle_emb_weight_decay), "train.puzzle_emb_weight_decay", "0 or positive"),
        (0.0 <= t.ema_rate < 1.0, "train.ema_rate", "in [0, 1)"),
        (
            t.spike_factor == 0 or _finite(t.spike_factor, 1.0, above=True),
            "train.spike_factor",
            "above 1 (or 0 to disable)",
        ),
        (t.eval_interval >= 0, "train.eval_interval", "0 (off) or a number of epochs"),
        (t.eval_num_aug >= 0, "train.eval_num_aug", "0 (all) or a number of augmentations"),
        (
            t.checkpoint_interval >= 0,
            "train.checkpoint_interval",
            "0 (at each evaluation) or a number of epochs",
        ),
        (t.keep_checkpoints >= 1, "train.keep_checkpoints", "at least 1"),
        (0 <= t.seed <= MAX_SEED, "train.seed", f"between 0 and {MAX_SEED}"),
        (t.compile.strip() != "", "train.compile", "off or a torch.compile backend (inductor)"),
        (log.project.strip() != "", "logging.project", "a W&B project name"),
        (log.wandb in WANDB_MODES, "logging.wandb", f"one of {', '.join(WANDB_MODES)}"),
        (log.log_interval >= 1, "logging.log_interval", "at least 1"),
    ]


def config_to_dict(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    return dataclasses.asdict(cfg)


def _field_types() -> dict[str, str]:
    """Every settable dotted key → its annotated type name ("int", "float", "bool", "str")."""
    owners = {"data": DataConfig, "arch": ArchConfig, "train": TrainConfig, "logging": LoggingConfig}
    return {f"{sec}.{f.name}": f.type for sec, cls in owners.items() for f in dataclasses.fields(cls)}


def _unknown_key(key: str, where: str) -> EtrmError:
    close = difflib.get_close_matches(key, list(_field_types()), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return EtrmError(f"{where}: unknown config key {key!r}{hint}")


def _coerce(key: str, type_name: str, value: Any, where: str) -> Any:
    """Convert text from --set (or a JSON value) to the field's type, or say exactly what is wrong."""
    wrong = EtrmError(f"{where}: {key} must be {type_name}, got {value!r}")
    if type_name == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise wrong
    if type_name == "int":
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                raise wrong from None
        raise wrong
    if type_name == "float":
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                raise wrong from None
        raise wrong
    if isinstance(value, str):
        return value
    raise wrong


def _set(cfg: RunConfig, key: str, value: Any, where: str) -> None:
    types = _field_types()
    if key not in types:
        raise _unknown_key(key, where)
    section, name = key.split(".", 1)
    setattr(getattr(cfg, section), name, _coerce(key, types[key], value, where))


def apply_overrides(cfg: RunConfig, overrides: Iterable[str]) -> RunConfig:
    """Apply `section.key=value` strings to a copy of `cfg`, then validate the result."""
    cfg = dataclasses.replace(cfg, **{sec: dataclasses.replace(getattr(cfg, sec)) for sec in SECTIONS})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise EtrmError(f"--set {item!r}: expected KEY=VALUE, e.g. arch.hidden_size=64")
        _set(cfg, key.strip(), value.strip(), f"--set {item}")
    cfg.validate()
    return cfg


def config_from_dict(data: dict[str, Any], where: str, base: RunConfig | None = None) -> RunConfig:
    """Nested {section: {key: value}} → RunConfig; keys not given keep `base`'s (or default) values."""
    cfg = apply_overrides(base or RunConfig(), [])
    if not isinstance(data, dict):
        raise EtrmError(f"{where}: expected a JSON object with sections {', '.join(SECTIONS)}")
    for section, values in data.items():
        if section not in SECTIONS or not isinstance(values, dict):
            raise _unknown_key(str(section), where)
        for name, value in values.items():
            _set(cfg, f"{section}.{name}", value, where)
    cfg.validate()
    return cfg


def load_config(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """Read a config JSON (a run folder's config.json, or a partial one laid over `base`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise EtrmError(f"config file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EtrmError(f"config file {path} is not valid JSON: {e}") from None
    except RecursionError:
        raise EtrmError(f"config file {path}: JSON nested too deeply to be a config") from None
    return config_from_dict(data, str(path), base)


# ----------------------------------------------------------------------------- presets

# Where a preset's value comes from: the experiment design's table, the reference TRM's ARC recipe
# (SamsungSAILMontreal/TinyRecursiveModels, cfg_pretrain.yaml), the public ETRM's recorded runs, or
# a choice of ours where both are silent. `etrm presets --json` lists them per value.
DESIGN, TRM, ETRM, OURS = "design", "reference TRM", "public ETRM", "our choice"
Setting = tuple[str, Any, str]  # (dotted key, value, source)


@dataclass(frozen=True)
class PresetInfo:
    name: str
    description: str
    phase: str  # overfit | semi-final | final | pretrain | baseline | smoke
    settings: tuple[Setting, ...]
    base: str = ""  # a preset whose settings come first (these override them)

    def resolved_settings(self) -> dict[str, tuple[Any, str]]:
        """Every value this preset sets, with its source: the base preset's, then its own."""
        inherited = PRESETS[self.base].resolved_settings() if self.base else {}
        return inherited | {key: (value, source) for key, value, source in self.settings}

    def build(self) -> RunConfig:
        items = self.resolved_settings().items()
        return apply_overrides(RunConfig(), [f"{key}={value}" for key, (value, _) in items])


# The ARC-size TRM decoder and its optimizer (the design keeps TRM's decoder as it is).
_TRM_DECODER: tuple[Setting, ...] = (
    ("arch.hidden_size", 512, TRM),
    ("arch.num_heads", 8, TRM),
    ("arch.expansion", 4, TRM),
    ("arch.L_layers", 2, TRM),
    ("arch.H_cycles", 3, TRM),
    ("arch.L_cycles", 4, TRM),
    ("arch.halt_max_steps", 16, TRM),
    ("train.lr", 1e-4, TRM),
    ("train.weight_decay", 0.1, TRM),
    ("train.beta1", 0.9, TRM),
    ("train.beta2", 0.95, TRM),
    ("train.ema_rate", 0.999, TRM),
)

# Shrinks any preset to a size that runs a few steps per second on one CPU, keeping its encoder
# type, exploration, KL weight and re-encoding; `get_preset(name, size="cpu-smoke")` applies it.
CPU_SMOKE_SIZE = [
    "arch.hidden_size=32",
    "arch.num_heads=2",
    "arch.expansion=2",
    "arch.H_cycles=2",
    "arch.L_cycles=1",
    "arch.halt_max_steps=3",
    "arch.encoder_num_layers=1",
    "data.max_demos=3",
    "train.global_batch_size=4",
    "train.lr=1e-3",
    "train.lr_warmup_steps=2",
    "train.epochs=2",
    "train.eval_interval=1",
    "train.eval_num_aug=1",
    "logging.log_interval=1",
]

# Run names derive from the encoder and the exploration, as in the design's appendix (SF2_hybrid_std_explore0.7).
_SHORT_ENCODER = {
    "standard": "standard",
    "hybrid_standard": "hybrid_std",
    "hybrid_variational": "hybrid_var",
    "lpn_var": "lpn_var",
}


def _encoder_run(
    name: str,
    project: str,
    encoder: str,
    layers: int,
    explore: float,
    batch: int,
    batch_source: str,
    kl: float,
) -> tuple[Setting, ...]:
    """What the overfit and semi-final experiments vary (the design's table), and their run name."""
    return (
        *_TRM_DECODER,
        ("arch.context_len", 16, DESIGN),
        ("arch.encoder_type", encoder, DESIGN),
        ("arch.encoder_num_layers", layers, DESIGN),
        ("arch.halt_exploration_prob", explore, DESIGN),
        ("arch.kl_weight", kl, DESIGN),
        ("arch.encoder_reencode", True, OURS),
        ("data.max_demos", 10, DESIGN),
        ("train.global_batch_size", batch, batch_source),
        ("train.grad_clip", 1.0, OURS),
        ("train.encoder_lr_scale", 1.0, OURS),
        ("logging.project", project, DESIGN),
        ("logging.run_name", f"{name}_{_SHORT_ENCODER[encoder]}_explore{explore}", DESIGN),
    )


def _overfit(name: str, encoder: str, layers: int, explore: float, kl: float = 0.0) -> tuple[Setting, ...]:
    # The public ETRM's E2 runs used batch 128 (and a pretrained decoder); E1 keeps our earlier 64.
    batch, batch_source = (128, ETRM) if name.startswith("E2") else (64, OURS)
    return (
        *_encoder_run(name, "etrm-overfit", encoder, layers, explore, batch, batch_source, kl),
        ("data.max_train_groups", 32, DESIGN),
        ("train.epochs", 3000, OURS),
        ("train.eval_interval", 500, OURS),
        ("train.eval_num_aug", 8, OURS),
        ("train.lr_warmup_steps", 200, OURS),
        ("train.lr_min_ratio", 1.0, OURS),
    )


def _semi_final(
    name: str, encoder: str, layers: int, explore: float, batch: int, kl: float = 0.0
) -> tuple[Setting, ...]:
    return (
        *_encoder_run(name, "etrm-semi-final", encoder, layers, explore, batch, DESIGN, kl),
        ("train.epochs", 1000, DESIGN),
        ("train.eval_interval", 200, DESIGN),
        # The design's protocol: every stored augmentation voted at each evaluation point.
        ("train.eval_num_aug", 0, DESIGN),
        ("train.lr_warmup_steps", 500, OURS),
        # The design anneals with cosine (its risk section) without a floor: ours is a tenth of the LR.
        ("train.lr_min_ratio", 0.1, OURS),
    )


# TRM's own ARC recipe: puzzle-id table trained by sign-SGD at lr 1e-2, batch 768, no clipping, constant LR.
_TRM_RECIPE: tuple[Setting, ...] = (
    *_TRM_DECODER,
    ("arch.encoder_type", "puzzle_embedding", TRM),
    ("arch.halt_exploration_prob", 0.1, TRM),
    ("train.global_batch_size", 768, TRM),
    ("train.epochs", 100000, TRM),
    ("train.eval_interval", 10000, TRM),
    ("train.lr_warmup_steps", 2000, TRM),
    ("train.lr_min_ratio", 1.0, TRM),
    ("train.puzzle_emb_lr", 1e-2, TRM),
    ("train.puzzle_emb_weight_decay", 0.1, TRM),
    ("train.grad_clip", 0, TRM),
)

PRESETS: dict[str, PresetInfo] = {
    p.name: p
    for p in [
        PresetInfo(
            "E1a",
            "overfit 32 groups: standard encoder, explore 0.5",
            "overfit",
            _overfit("E1a", "standard", 2, 0.5),
        ),
        PresetInfo(
            "E1b",
            "overfit 32 groups: standard encoder, explore 0.3",
            "overfit",
            _overfit("E1b", "standard", 2, 0.3),
        ),
        PresetInfo(
            "E1d",
            "overfit 32 groups: standard encoder, explore 0.7",
            "overfit",
            _overfit("E1d", "standard", 2, 0.7),
        ),
        PresetInfo(
            "E2a",
            "overfit 32 groups: hybrid variational encoder",
            "overfit",
            _overfit("E2a", "hybrid_variational", 4, 0.5, kl=1e-4),
        ),
        PresetInfo(
            "E2b",
            "overfit 32 groups: LPN variational encoder",
            "overfit",
            _overfit("E2b", "lpn_var", 6, 0.5, kl=1e-4),
        ),
        PresetInfo(
            "E2c",
            "overfit 32 groups: hybrid standard encoder",
            "overfit",
            _overfit("E2c", "hybrid_standard", 4, 0.5),
        ),
        PresetInfo(
            "SF1",
            "semi-final: hybrid standard, explore 0.5",
            "semi-final",
            _semi_final("SF1", "hybrid_standard", 4, 0.5, 128),
        ),
        PresetInfo(
            "SF2",
            "semi-final: hybrid standard, explore 0.7",
            "semi-final",
            _semi_final("SF2", "hybrid_standard", 4, 0.7, 128),
        ),
        PresetInfo(
            "SF3",
            "semi-final: hybrid variational (KL 0: deterministic), explore 0.5",
            "semi-final",
            _semi_final("SF3", "hybrid_variational", 4, 0.5, 128),
        ),
        PresetInfo(
            "SF4",
            "semi-final: hybrid variational (KL 0: deterministic), explore 0.7",
            "semi-final",
            _semi_final("SF4", "hybrid_variational", 4, 0.7, 128),
        ),
        PresetInfo(
            "SF5",
            "semi-final: standard encoder, explore 0.5",
            "semi-final",
            _semi_final("SF5", "standard", 2, 0.5, 256),
        ),
        PresetInfo(
            "SF6",
            "semi-final: standard encoder, explore 0.7",
            "semi-final",
            _semi_final("SF6", "standard", 2, 0.7, 256),
        ),
        PresetInfo(
            "final",
            "final run: 50k epochs, checkpoint every 5k (set the winning encoder)",
            "final",
            (
                *_semi_final("final", "hybrid_standard", 4, 0.5, 128),
                ("train.epochs", 50000, DESIGN),
                ("train.eval_interval", 5000, DESIGN),
                ("train.checkpoint_interval", 5000, DESIGN),
                ("logging.project", "etrm-final", OURS),
                ("logging.run_name", "final", OURS),
            ),
        ),
        PresetInfo(
            "trm",
            "pretrain the decoder: TRM's recipe on the few-shot build's training puzzles only (leak-free)",
            "pretrain",
            (
                *_TRM_RECIPE,
                ("data.path", "data/arc-agi-1", DESIGN),
                ("logging.project", "etrm-pretrain", OURS),
                ("logging.run_name", "trm-decoder", OURS),
            ),
        ),
        PresetInfo(
            "trm-split",
            "TRM puzzle-embedding baseline on TRM's own split (needs `etrm data build --split trm`; NOT few-shot)",
            "baseline",
            (
                *_TRM_RECIPE,
                ("data.path", "data/arc-agi-1-trm", TRM),
                ("logging.project", "etrm-baseline", OURS),
                ("logging.run_name", "trm-split", OURS),
            ),
        ),
        PresetInfo(
            "cpu-smoke",
            "SF1 at a size that trains on one CPU in seconds (decoder from scratch)",
            "smoke",
            (
                *(tuple(item.split("=", 1)) + (OURS,) for item in CPU_SMOKE_SIZE),
                ("train.init_from", "none", OURS),
                ("logging.project", "etrm", OURS),
                ("logging.run_name", "cpu-smoke", OURS),
            ),
            base="SF1",
        ),
    ]
}


def preset_sources(name: str) -> dict[str, dict[str, Any]]:
    """Every value preset `name` sets, as resolved, with its source: {"key": {"value", "source"}}."""
    cfg = config_to_dict(PRESETS[name].build())
    return {
        key: {"value": cfg[key.split(".")[0]][key.split(".")[1]], "source": source}
        for key, (_, source) in PRESETS[name].resolved_settings().items()
    }


def get_preset(name: str, size: str = "full") -> RunConfig:
    """A fresh RunConfig for preset `name`; size="cpu-smoke" shrinks it for a quick local run."""
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1, cutoff=0.3)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise EtrmError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)}){hint}")
    if size not in SIZES:
        raise EtrmError(f"unknown size {size!r} (sizes: {', '.join(SIZES)})")
    cfg = PRESETS[name].build()
    if size == "cpu-smoke":
        cfg = apply_overrides(cfg, CPU_SMOKE_SIZE)
    cfg.logging.run_name = cfg.logging.run_name or name
    return cfg
