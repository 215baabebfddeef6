"""Triton kernels (run in Triton's CPU interpreter) against a float64 evaluation of etrm.kernels.reference.

Tolerance rule (flash-attention's), in float32, float16 and bfloat16: the kernel's largest
error against float64 must be within twice the error of plain PyTorch (the reference run at
the same precision) plus about one unit in the last place of the output's scale.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from etrm.config import ENCODER_TYPES, ArchConfig
from etrm.errors import EtrmError
from etrm.kernels import reference

ULP_FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
KERNEL_MODULES = ("rms_norm", "swiglu", "rotary", "cross_attention")


@pytest.fixture(scope="module")
def ops():
    """etrm.kernels.triton_ops with interpreted kernels (re-imported if someone jitted them for a GPU first).

    Triton reads TRITON_INTERPRET when @triton.jit runs (at import) and the launchers read it per call
    to pick the interpreter's tiles, so it stays set for this module's tests and is restored after.
    """
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime.interpreter import InterpretedFunction

    modules = [importlib.import_module(f"etrm.kernels.{name}_triton") for name in KERNEL_MODULES]
    if not isinstance(modules[0]._add_rms_norm_fwd, InterpretedFunction):
        for module in modules:
            importlib.reload(module)
        importlib.reload(importlib.import_module("etrm.kernels.triton_ops"))
    yield importlib.import_module("etrm.kernels.triton_ops")
    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = previous


def run_with_grads(fn, tensors, grad_out, dtype):
    """fn(*tensors cast to dtype) and the gradient of <out, grad_out> w.r.t. every floating tensor."""
    leaves = [t.detach().to(dtype).requires_grad_() if t.is_floating_point() else t for t in tensors]
    out = fn(*leaves)
    out.backward(grad_out.to(dtype))
    return out.detach(), [t.grad for t in leaves if t.is_floating_point()]


def check_against_float64(triton_fn, torch_fn, tensors, dtype, seed=0):
    """Compare triton_fn and torch_fn (both at `dtype`) with torch_fn in float64; returns the triton results."""
    torch.manual_seed(seed)
    # The float64 reference starts from the same (rounded) inputs, so only the op's own error counts.
    tensors = [t.to(dtype) if t.is_floating_point() else t for t in tensors]
    shape_probe = torch_fn(*tensors)
    grad_out = torch.randn(shape_probe.shape, dtype=torch.float64).to(dtype).double()
    exact_out, exact_grads = run_with_grads(torch_fn, tensors, grad_out, torch.float64)
    torch_out, torch_grads = run_with_grads(torch_fn, tensors, grad_out, dtype)
    got_out, got_grads = run_with_grads(triton_fn, tensors, grad_out, dtype)
    assert got_out.dtype == dtype and got_out.shape == exact_out.shape
    for name, got, plain, exact in zip(
        ["output"] + [f"grad {i}" for i in range(len(exact_grads))],
        [got_out, *got_grads],
        [torch_out, *torch_grads],
        [exact_out, *exact_grads],
        strict=True,
    ):
        assert got.dtype == dtype and torch.isfinite(got).all(), name
        err = (got.double() - exact).abs().max().item()
        torch_err = (plain.double() - exact).abs().max().item()
        allowed = 2 * torch_err + ULP_FLOOR[dtype] * max(exact.abs().max().item(), 1.0)
        assert err <= allowed, (
            f"{name}: error {err:.3g} > allowed {allowed:.3g} (plain torch {torch_err:.3g})"
        )
    return got_out, got_grads


DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 96), (37, 53), (1, 1, 1023)])
def test_add_rms_norm(ops, shape, dtype):
    torch.manual_seed(1)
    x, residual = torch.randn(shape) * 3, torch.randn(shape)
    check_against_float64(
        lambda a, b: ops.add_rms_norm(a, b, 1e-5),
        lambda a, b: reference.add_rms_norm(a, b, 1e-5),
        [x, residual],
        dtype,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 29, 70), (5, 123), (1, 1, 1023)])
def test_swiglu_on_halves_of_one_projection(ops, shape, dtype):
    torch.manual_seed(2)
    gate_up = torch.randn(*shape[:-1], 2 * shape[-1]) * 3

    def halves(fn):
        return lambda both: fn(*both.chunk(2, dim=-1))

    check_against_float64(halves(ops.swiglu), halves(reference.swiglu), [gate_up], dtype)


def rope_tables(seq_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    from etrm.models.layers import RotaryEmbedding

    cos, sin = RotaryEmbedding(head_dim, max_positions=seq_len, base=10000.0)()
    return cos, sin


def tables_for(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 tables, float64 for the float64 reference (the reference does its math in the tables' dtype)."""
    return (cos.double(), sin.double()) if x.dtype == torch.float64 else (cos, sin)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "seq_len", "heads", "head_dim"), [(2, 7, 3, 32), (1, 19, 2, 64)])
def test_apply_rotary_on_qkv_split(ops, batch, seq_len, heads, head_dim, dtype):
    torch.manual_seed(3)
    cos, sin = rope_tables(seq_len, head_dim)
    qkv = torch.randn(batch, seq_len, 3 * heads, head_dim)

    def on_k(fn):
        return lambda both: fn(both.split(heads, dim=2)[1], *tables_for(both, cos, sin))

    check_against_float64(on_k(ops.apply_rotary), on_k(reference.apply_rotary), [qkv], dtype)


def test_apply_rotary_general_tables(ops):
    """Tables whose two halves differ (not RoPE's duplicated frequencies) exercise the adjoint's half swap."""
    torch.manual_seed(4)
    cos, sin = torch.randn(5, 32), torch.randn(5, 32)
    check_against_float64(
        lambda x: ops.apply_rotary(x, cos, sin),
        lambda x: reference.apply_rotary(x, *tables_for(x, cos, sin)),
        [torch.randn(3, 5, 2, 32)],
        torch.float32,
    )


def key_mask_with_edge_rows(k_len: int) -> torch.Tensor:
    """Batch row 0 random, row 1 fully masked, row 2 a single key."""
    mask = torch.rand(3, k_len) > 0.4
    mask[0, 0] = True
    mask[1] = False
    mask[2] = False
    mask[2, k_len // 2] = True
    return mask


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("q_len", "k_len", "head_dim", "masked"),
    [(16, 1, 32, True), (5, 17, 64, False), (17, 300, 32, True), (16, 300, 64, True)],
)
def test_cross_attention(ops, q_len, k_len, head_dim, masked, dtype):
    torch.manual_seed(5)
    heads = 2
    q = torch.randn(3, heads, q_len, head_dim)
    # k and v as the encoder makes them: [B, Lk, H, D] projections viewed head-major.
    k = (torch.randn(3, k_len, heads, head_dim) * 2).transpose(1, 2)
    v = torch.randn(3, k_len, heads, head_dim).transpose(1, 2)
    mask = key_mask_with_edge_rows(k_len) if masked else None
    out, (dq, dk, dv) = check_against_float64(
        lambda *t: ops.cross_attention(*t, mask),
        lambda *t: reference.cross_attention(*t, mask),
        [q, k, v],
        dtype,
    )
    if masked:
        assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
        assert (dk[~mask[:, None, :].expand(-1, heads, -1)] == 0).all()


def test_cross_attention_single_key_returns_its_value(ops):
    q, k, v = torch.randn(1, 1, 16, 32), torch.randn(1, 1, 9, 32), torch.randn(1, 1, 9, 32)
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, 4] = True
    out = ops.cross_attention(q, k, v, mask)
    torch.testing.assert_close(out, v[:, :, 4:5].expand_as(out), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("q", "k", "mask"),
    [
        (torch.randn(1, 2, 4, 32), torch.randn(1, 2, 8, 16), None),
        (torch.randn(1, 2, 4, 24), torch.randn(1, 2, 8, 24), None),
        (torch.randn(1, 2, 4, 32), torch.randn(1, 2, 8, 32), torch.ones(1, 7, dtype=torch.bool)),
        (torch.randn(1, 2, 4, 32), torch.randn(1, 2, 8, 32), torch.ones(1, 8)),
    ],
)
def test_cross_attention_rejects_bad_inputs(ops, q, k, mask):
    with pytest.raises(ValueError, match="cross_attention"):
        ops.cross_attention(q, k, k, mask)


def test_elementwise_ops_reject_mismatched_shapes(ops):
    with pytest.raises(ValueError, match="add_rms_norm"):
        ops.add_rms_norm(torch.randn(2, 8), torch.randn(2, 9), 1e-5)
    with pytest.raises(ValueError, match="swiglu"):
        ops.swiglu(torch.randn(2, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="apply_rotary"):
        ops.apply_rotary(torch.randn(1, 4, 2, 32), torch.randn(5, 32), torch.randn(5, 32))


def test_dispatch_honours_etrm_kernels(ops, monkeypatch):
    from etrm import kernels

    gate, up = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8)
    monkeypatch.setenv("ETRM_KERNELS", "triton")
    assert type(kernels.swiglu(gate, up).grad_fn).__name__ == "SwiGLUFunctionBackward"
    monkeypatch.setenv("ETRM_KERNELS", "torch")
    assert type(kernels.swiglu(gate, up).grad_fn).__name__ == "MulBackward0"
    monkeypatch.setenv("ETRM_KERNELS", "auto")  # CPU tensors: auto means torch
    assert type(kernels.swiglu(gate, up).grad_fn).__name__ == "MulBackward0"
    monkeypatch.setenv("ETRM_KERNELS", "cuda")
    with pytest.raises(EtrmError, match="ETRM_KERNELS"):
        kernels.swiglu(gate, up)


def tiny_episode() -> dict:
    """One query with two small demos, as EpisodeSampler would batch it."""
    from etrm.data.encoding import encode_grid

    rng = np.random.default_rng(0)

    def tokens(height: int, width: int) -> torch.Tensor:
        return torch.from_numpy(encode_grid(rng.integers(0, 10, (height, width))).astype(np.int64))

    inputs = tokens(3, 4)[None]
    return {
        "inputs": inputs,
        "labels": torch.where(inputs == 0, -100, inputs),
        "demo_inputs": torch.stack([tokens(3, 3), tokens(2, 4)])[None],
        "demo_outputs": torch.stack([tokens(3, 3), tokens(4, 2)])[None],
        "demo_mask": torch.tensor([[True, True]]),
        "puzzle_identifiers": torch.tensor([1]),
    }


def two_act_steps(encoder_type: str, batch: dict) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Losses and logits of two ACT steps of a freshly seeded tiny ETRM, and every parameter's gradient."""
    from etrm.models import build_model
    from etrm.models.losses import ACTLossHead

    torch.manual_seed(0)
    arch = ArchConfig(
        hidden_size=32,
        num_heads=2,
        expansion=2.0,
        L_layers=1,
        H_cycles=1,
        L_cycles=1,
        halt_max_steps=2,
        halt_exploration_prob=0.0,
        puzzle_emb_len=4,
        context_len=2,
        encoder_type=encoder_type,
        encoder_num_layers=1,
        encoder_hidden_size=32,
        encoder_num_heads=2,
        encoder_latent_dim=8,
        num_puzzle_identifiers=3,
    )
    head = ACTLossHead(build_model(arch)).train()
    carry = head.initial_carry(batch)
    results = []
    for _ in range(2):
        carry, loss, _, outputs, _ = head(carry, batch)
        loss.backward()
        results += [loss.detach(), outputs["logits"].detach()]
    return results, {name: p.grad for name, p in head.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("encoder_type", ENCODER_TYPES)
def test_tiny_etrm_with_triton_kernels_matches_torch_path(ops, encoder_type, monkeypatch):
    """Forward and backward of every encoder type through the Triton kernels equal the torch path in float32.

    Every fused-op call the torch path makes must go to Triton instead (the hybrid encoders' set pool
    is where cross_attention runs).
    """
    from etrm.kernels import dispatch

    calls = {"torch": Counter(), "triton": Counter()}

    def counted(mode: str, name: str, fn):
        def wrapper(*args):
            calls[mode][name] += 1
            return fn(*args)

        return wrapper

    for name in ("add_rms_norm", "swiglu", "apply_rotary", "cross_attention"):
        monkeypatch.setattr(dispatch.reference, name, counted("torch", name, getattr(reference, name)))
        monkeypatch.setattr(ops, name, counted("triton", name, getattr(ops, name)))
    batch = tiny_episode()
    monkeypatch.setenv("ETRM_KERNELS", "torch")
    torch_results, torch_grads = two_act_steps(encoder_type, batch)
    monkeypatch.setenv("ETRM_KERNELS", "triton")
    triton_results, triton_grads = two_act_steps(encoder_type, batch)

    assert (
        calls["triton"] == calls["torch"]
        and calls["triton"]["add_rms_norm"] > 0
        and calls["triton"]["swiglu"] > 0
    )
    for expected, got in zip(torch_results, triton_results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert triton_grads.keys() == torch_grads.keys() and len(torch_grads) > 0
    for name, expected in torch_grads.items():
        scale = expected.abs().max().item()
        assert (triton_grads[name] - expected).abs().max().item() <= 1e-4 * scale + 1e-7, name


def compile_for_hopper() -> list[str]:
    """Compile every kernel variant, with the tiles its launcher picks on a GPU, to sm_90 machine code.

    Needs no GPU (Triton ships ptxas); catches what the interpreter accepts but the compiler rejects.
    Must run in a process where TRITON_INTERPRET is unset.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from etrm.kernels import cross_attention_triton, rms_norm_triton, rotary_triton, swiglu_triton
    from etrm.kernels.triton_utils import row_tile

    float_args = {"eps", "scale", "scale_log2"}
    float32_pointers = {"rstd_ptr", "cos_ptr", "sin_ptr", "lse_ptr", "delta_ptr"}

    def build(kernel, data_type: str, constants: dict, num_warps: int, num_stages: int = 3) -> str:
        signature = {}
        for arg in kernel.arg_names:
            if arg in constants:
                signature[arg] = "constexpr"
            elif arg == "mask_ptr":
                signature[arg] = "*u8"
            elif arg.endswith("_ptr"):
                signature[arg] = "*fp32" if arg in float32_pointers else f"*{data_type}"
            else:
                signature[arg] = "fp32" if arg in float_args else "i32"
        options = {"num_warps": num_warps, "num_stages": num_stages}
        compiled = triton.compile(
            ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32), options=options
        )
        assert compiled.asm["cubin"], kernel.__name__
        return f"{kernel.__name__}[{data_type}]"

    built = []
    block_m, block_n, warps = row_tile(512)
    built.append(
        build(rms_norm_triton._add_rms_norm_fwd, "bf16", {"BLOCK_M": block_m, "BLOCK_N": block_n}, warps)
    )
    built.append(
        build(rms_norm_triton._add_rms_norm_bwd, "bf16", {"BLOCK_M": block_m, "BLOCK_N": block_n}, warps)
    )
    block_m, block_n, warps = row_tile(1024)
    built.append(build(swiglu_triton._swiglu_fwd, "bf16", {"BLOCK_M": block_m, "BLOCK_N": block_n}, warps))
    built.append(build(swiglu_triton._swiglu_bwd, "bf16", {"BLOCK_M": block_m, "BLOCK_N": block_n}, warps))
    block_m, block_half, warps = row_tile(32)
    for backward in (False, True):
        tiles = {"BACKWARD": backward, "BLOCK_M": block_m, "BLOCK_HALF": block_half}
        built.append(build(rotary_triton._rotary, "bf16", tiles, warps))
    for dtype, data_type, head_dim in ((torch.bfloat16, "bf16", 64), (torch.float32, "fp32", 32)):
        q = torch.empty(1, 1, 16, head_dim, dtype=dtype)
        constants = cross_attention_triton._launch_options(q, key_mask=torch.ones(1, 1, dtype=torch.bool))
        launch = {"num_warps": constants.pop("num_warps"), "num_stages": constants.pop("num_stages")}
        for kernel in (
            cross_attention_triton._attn_fwd,
            cross_attention_triton._attn_bwd_dkdv,
            cross_attention_triton._attn_bwd_dq,
        ):
            built.append(build(kernel, data_type, constants, **launch))
    return built


def test_kernels_compile_for_hopper():
    """The interpreter is lenient; the real compiler (to sm_90 cubin, in a fresh process) must accept every kernel."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(result.stdout.split()) == 12, result.stdout


if __name__ == "__main__":
    print("\n".join(compile_for_hopper()))
