"""Typed run configuration: data, arch, train, logging.

Presets, dotted overrides (`--set arch.hidden_size=64`) and the resolved
copy saved in each run folder are built on these dataclasses (etrm/train owns
the preset table; every other package only reads these fields).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ENCODER_TYPES = ("standard", "hybrid_standard", "hybrid_variational", "lpn_var", "puzzle_embedding")


@dataclass
class DataConfig:
    path: str = "data/arc-agi-1"  # a folder written by `etrm data build`
    max_demos: int = 10  # demo slots per episode (extra demos dropped, missing ones masked)
    translate: bool = False  # TRM's random-offset augmentation on the training side
    num_aug_train: int = 0  # augmentations drawn from in training (0 = all stored)
    num_workers: int = 0


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
    # context provider
    encoder_type: str = "hybrid_standard"
    context_len: int = 16  # filled prefix slots (1..puzzle_emb_len); the rest stay zero
    encoder_num_layers: int = 4
    encoder_hidden_size: int = 0  # 0 = hidden_size
    encoder_num_heads: int = 0  # 0 = num_heads
    encoder_latent_dim: int = 0  # variational latent size; 0 = encoder hidden size
    encoder_reencode: bool = True
    kl_weight: float = 0.0
    # puzzle_embedding baseline
    puzzle_emb_ndim: int = 0  # 0 = hidden_size
    num_puzzle_identifiers: int = 0  # filled from the dataset manifest


@dataclass
class TrainConfig:
    epochs: int = 1000
    max_steps: int = 0  # stop after N optimizer steps (0 = no limit)
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
