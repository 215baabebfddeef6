"""The one place that picks Triton kernels or the torch reference for each fused op.

`ETRM_KERNELS=auto|triton|torch` (default auto): auto uses Triton for CUDA tensors
when Triton imports, and the torch reference everywhere else. The model code calls
only the functions below.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

from etrm.errors import EtrmError
from etrm.kernels import reference

_MODES = ("auto", "triton", "torch")


def kernel_mode() -> str:
    mode = os.environ.get("ETRM_KERNELS", "auto").strip().lower()
    if mode not in _MODES:
        raise EtrmError(f"ETRM_KERNELS={mode!r} is not one of {', '.join(_MODES)}")
    return mode


@functools.cache
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except Exception:
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    return _use_triton(t.is_cuda)


def _use_triton(is_cuda: bool) -> bool:
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if not triton_available():
            raise EtrmError("ETRM_KERNELS=triton but triton does not import")
        if not is_cuda and not importlib.import_module("triton").knobs.runtime.interpret:
            raise EtrmError(
                "ETRM_KERNELS=triton needs CUDA tensors (or TRITON_INTERPRET=1 for Triton's CPU interpreter)"
            )
        return _load_triton_ops()
    return is_cuda and triton_available() and _load_triton_ops()


# Under torch.compile the choice is made once per compiled graph, as a constant, so the graph holds
# the chosen ops and nothing of this Python (env reads, imports) is traced. This is what
# torch.compiler.assume_constant_result does; calling it would import torch._dynamo, and with it
# Triton, here, before a test can switch on Triton's interpreter (a test checks the two agree).
_use_triton._dynamo_marked_constant = True

_ops = None  # etrm.kernels.triton_ops once a call has chosen Triton (imported then, not before)


def _load_triton_ops() -> bool:
    global _ops
    if _ops is None:
        _ops = importlib.import_module("etrm.kernels.triton_ops")
    return True


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, eps: float) -> torch.Tensor:
    if use_triton(x):
        return _ops.add_rms_norm(x, residual, eps)
    return reference.add_rms_norm(x, residual, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if use_triton(gate):
        return _ops.swiglu(gate, up)
    return reference.swiglu(gate, up)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if use_triton(x):
        return _ops.apply_rotary(x, cos, sin)
    return reference.apply_rotary(x, cos, sin)


def cross_attention(q, k, v, key_mask=None):
    if use_triton(q):
        return _ops.cross_attention(q, k, v, key_mask)
    return reference.cross_attention(q, k, v, key_mask)


def self_attention(q, k, v, attn_mask=None):
    return reference.self_attention(q, k, v, attn_mask)
