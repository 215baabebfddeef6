"""The Triton kernels compiled for a real GPU, at the model's shapes, against float64 (skipped without CUDA).

CI has no GPU, so these run where one is lent (`python -m pytest tests/test_kernels_cuda.py`);
tests/test_kernels_triton.py checks the same functions in Triton's interpreter on every run.
Shapes follow the model: rows of 916 tokens at hidden 512 and 1,536, rotary on 64-wide heads,
the set encoder's 16 context queries against up to 18,000 demo tokens with a key mask.
"""

from __future__ import annotations

import os

import pytest
import torch
from kernel_helpers import (  # tests/kernel_helpers.py
    DTYPES,
    KERNEL_ARCH,
    check_add_rms_norm,
    check_apply_rotary_on_qkv_split,
    check_cross_attention,
    check_swiglu_on_halves_of_one_projection,
    tiny_episode,
    two_act_steps,
)

from etrm.config import ENCODER_TYPES

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
    reason="needs a CUDA GPU (and compiled, not interpreted, Triton kernels)",
)
CUDA = "cuda"
TOKENS = 916


@pytest.fixture(scope="module")
def ops():
    return pytest.importorskip("etrm.kernels.triton_ops")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4 * TOKENS, 512), (2, TOKENS, 1536), (37, 53), (1, 1, 1023)])
def test_add_rms_norm(ops, shape, dtype):
    check_add_rms_norm(ops, shape, dtype, CUDA)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4 * TOKENS, 1536), (2, TOKENS, 4096), (5, 123)])
def test_swiglu_on_halves_of_one_projection(ops, shape, dtype):
    check_swiglu_on_halves_of_one_projection(ops, shape, dtype, CUDA)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "seq_len", "heads", "head_dim"), [(4, TOKENS, 8, 64), (2, 7, 3, 32)])
def test_apply_rotary_on_qkv_split(ops, batch, seq_len, heads, head_dim, dtype):
    check_apply_rotary_on_qkv_split(ops, batch, seq_len, heads, head_dim, dtype, CUDA)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("k_len", "head_dim"), [(1, 32), (17, 64), (300, 128), (2000, 64), (18000, 64), (18000, 128), (8191, 32)]
)
def test_cross_attention(ops, k_len, head_dim, dtype):
    check_cross_attention(ops, 5, 8, 16, k_len, head_dim, True, dtype, CUDA)


def test_dispatch_auto_uses_triton_on_cuda(monkeypatch):
    from etrm import kernels

    gate, up = torch.randn(4, 8, device=CUDA, requires_grad=True), torch.randn(4, 8, device=CUDA)
    monkeypatch.setenv("ETRM_KERNELS", "auto")
    assert "etrm_swiglu" in type(kernels.swiglu(gate, up).grad_fn).__name__
    monkeypatch.setenv("ETRM_KERNELS", "torch")
    assert type(kernels.swiglu(gate, up).grad_fn).__name__ == "MulBackward0"


def relative_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    return ((got.double() - exact.double()).norm() / exact.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_tiny_etrm_on_cuda_matches_torch_path(encoder_type, monkeypatch, tiny_arch):
    """Every encoder type, two ACT steps forward and backward on the GPU.

    float32: the Triton path equals the torch path to float32 rounding. bfloat16 autocast (what
    training uses on CUDA): measured against the float32 torch run, the Triton path's error is at
    most twice the torch path's own bfloat16 error (plus a small floor), for the losses, logits
    and every parameter's gradient.
    """
    batch = tiny_episode(batch_size=4)
    runs = {}
    for mode in ("torch", "triton"):
        monkeypatch.setenv("ETRM_KERNELS", mode)
        for forward_dtype in ("float32", "bfloat16"):
            arch = tiny_arch(encoder_type, **KERNEL_ARCH, forward_dtype=forward_dtype)
            runs[mode, forward_dtype] = two_act_steps(arch, batch, device=CUDA)

    (exact_results, exact_grads) = runs["torch", "float32"]
    (f32_results, f32_grads) = runs["triton", "float32"]
    for expected, got in zip(exact_results, f32_results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    for name, expected in exact_grads.items():
        assert relative_error(f32_grads[name], expected) <= 1e-4, name

    (torch_bf16, torch_bf16_grads), (triton_bf16, triton_bf16_grads) = (
        runs["torch", "bfloat16"],
        runs["triton", "bfloat16"],
    )
    for index, exact in enumerate(exact_results):
        got, plain = triton_bf16[index], torch_bf16[index]
        assert torch.isfinite(got).all()
        assert relative_error(got, exact) <= 2 * relative_error(plain, exact) + 1e-2, index
    assert triton_bf16_grads.keys() == exact_grads.keys()
    for name, exact in exact_grads.items():
        got, plain = triton_bf16_grads[name], torch_bf16_grads[name]
        assert torch.isfinite(got).all(), name
        assert relative_error(got, exact) <= 2 * relative_error(plain, exact) + 2e-2, name
