"""The Triton implementations that `etrm.kernels.dispatch` selects, as PyTorch custom ops (`torch.ops.etrm.*`).

Each op's forward and backward is a registered custom op with a fake (shape-only) implementation
and an autograd formula. That is what lets `torch.compile` trace a model that uses them without
a graph break: the compiler fuses the code around the ops and calls the kernels as they are.
Arguments are checked in the wrappers below, before any op runs, so errors name the op.

The op bodies look the kernel launchers up on their modules at call time, so reloading a kernel
module (the tests do, to switch Triton's interpreter on) takes effect without re-registering.
"""

# No `from __future__ import annotations` and no `X | None`: torch.library reads the annotations as types.
# ruff: noqa: UP045
from typing import Optional

import torch
from torch import Tensor

from etrm.kernels import cross_attention_triton as _attn
from etrm.kernels import rms_norm_triton as _rms
from etrm.kernels import rotary_triton as _rot
from etrm.kernels import swiglu_triton as _swi

__all__ = ["add_rms_norm", "apply_rotary", "cross_attention", "swiglu"]


# ---------------------------------------------------------------- add_rms_norm
@torch.library.custom_op("etrm::add_rms_norm", mutates_args=())
def _add_rms_norm(x: Tensor, residual: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    return _rms.add_rms_norm_forward(x, residual, eps)


@_add_rms_norm.register_fake
def _(x, residual, eps):
    return x.new_empty(x.shape), x.new_empty(x.numel() // x.shape[-1], dtype=torch.float32)


@torch.library.custom_op("etrm::add_rms_norm_backward", mutates_args=())
def _add_rms_norm_backward(dy: Tensor, y: Tensor, rstd: Tensor) -> Tensor:
    return _rms.add_rms_norm_backward(dy, y, rstd)


@_add_rms_norm_backward.register_fake
def _(dy, y, rstd):
    return y.new_empty(y.shape)


def _add_rms_norm_setup(ctx, inputs, output):
    ctx.save_for_backward(*output)
    ctx.residual_dtype = inputs[1].dtype


def _add_rms_norm_grad(ctx, dy, _drstd):
    y, rstd = ctx.saved_tensors
    dh = _add_rms_norm_backward(dy, y, rstd)
    return dh, dh.to(ctx.residual_dtype), None


_add_rms_norm.register_autograd(_add_rms_norm_grad, setup_context=_add_rms_norm_setup)


def add_rms_norm(x: Tensor, residual: Tensor, eps: float) -> Tensor:
    if x.shape != residual.shape:
        raise ValueError(
            f"add_rms_norm: x {tuple(x.shape)} and residual {tuple(residual.shape)} differ in shape"
        )
    return _add_rms_norm(x, residual, eps)[0]


# ---------------------------------------------------------------- swiglu
@torch.library.custom_op("etrm::swiglu", mutates_args=())
def _swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return _swi.swiglu_forward(gate, up)


@_swiglu.register_fake
def _(gate, up):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("etrm::swiglu_backward", mutates_args=())
def _swiglu_backward(dy: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return _swi.swiglu_backward(dy, gate, up)


@_swiglu_backward.register_fake
def _(dy, gate, up):
    return gate.new_empty(gate.shape), up.new_empty(up.shape)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_grad(ctx, dy):
    return _swiglu_backward(dy, *ctx.saved_tensors)


_swiglu.register_autograd(_swiglu_grad, setup_context=_swiglu_setup)


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} differ in shape")
    return _swiglu(gate, up)


# ---------------------------------------------------------------- rotary
@torch.library.custom_op("etrm::rotary", mutates_args=())
def _rotary(x: Tensor, cos: Tensor, sin: Tensor, backward: bool) -> Tensor:
    """x rotated (or, with backward, a gradient through the transposed rotation); cos/sin get no gradient."""
    return _rot.rotary_launch(x, cos, sin, backward)


@_rotary.register_fake
def _(x, cos, sin, backward):
    return x.new_empty(x.shape)


def _rotary_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[2])


def _rotary_grad(ctx, dout):
    cos, sin = ctx.saved_tensors
    return _rotary(dout, cos, sin, True), None, None, None


_rotary.register_autograd(_rotary_grad, setup_context=_rotary_setup)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    _rot.check_shapes(x, cos, sin)
    return _rotary(x, cos, sin, False)


# ---------------------------------------------------------------- cross_attention
@torch.library.custom_op("etrm::cross_attention", mutates_args=())
def _cross_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    return _attn.cross_attention_forward(*_attn.unit_last_stride(q, k, v), key_mask)


@_cross_attention.register_fake
def _(q, k, v, key_mask):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("etrm::cross_attention_backward", mutates_args=())
def _cross_attention_backward(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_mask: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    return _attn.cross_attention_backward(dout, *_attn.unit_last_stride(q, k, v), key_mask, out, lse)


@_cross_attention_backward.register_fake
def _(dout, q, k, v, key_mask, out, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _cross_attention_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], inputs[3], *output)
    ctx.has_mask = inputs[3] is not None


def _cross_attention_grad(ctx, dout, _dlse):
    q, k, v, key_mask, out, lse = ctx.saved_tensors
    dq, dk, dv = _cross_attention_backward(dout, q, k, v, key_mask if ctx.has_mask else None, out, lse)
    return dq, dk, dv, None


_cross_attention.register_autograd(_cross_attention_grad, setup_context=_cross_attention_setup)


def cross_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None) -> Tensor:
    _attn.check_shapes(q, k, v, key_mask)
    return _cross_attention(q, k, v, key_mask)[0]
