"""Training: presets are in etrm.config; `train(cfg, out_dir)` runs the loop (imported on first use,
so that `etrm --help` does not load torch)."""

from __future__ import annotations

from typing import Any

__all__ = ["train"]


def __getattr__(name: str) -> Any:
    if name == "train":
        from etrm.train.loop import train

        return train
    raise AttributeError(f"module 'etrm.train' has no attribute {name!r}")
