"""Fused ops (Triton on CUDA, torch reference elsewhere); see dispatch.py."""

from etrm.kernels.dispatch import (
    add_rms_norm,
    apply_rotary,
    cross_attention,
    kernel_mode,
    self_attention,
    swiglu,
)

__all__ = ["add_rms_norm", "apply_rotary", "cross_attention", "kernel_mode", "self_attention", "swiglu"]
