"""Shared by the kernel tests: the float64 comparison rule, each op's check (run by
tests/test_kernels_triton.py in Triton's interpreter and by tests/test_kernels_cuda.py on a GPU, at
shapes of their own), edge-case masks, a tiny ETRM episode.

Tolerance rule (flash-attention's), in float32, float16 and bfloat16: the kernel's largest
error against float64 must be within twice the error of plain PyTorch (the reference run at
the same precision, on the same device) plus about one unit in the last place of the largest value the op computes.
Everything here works on whatever device the tensors are on (CPU under Triton's interpreter, or CUDA).
"""

from __future__ import annotations

import numpy as np
import torch

from etrm.config import ArchConfig
from etrm.kernels import reference

ULP_FLOOR = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


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
    grad_out = torch.randn(shape_probe.shape, dtype=torch.float64).to(dtype).double().to(shape_probe.device)
    exact_out, exact_grads = run_with_grads(torch_fn, tensors, grad_out, torch.float64)
    torch_out, torch_grads = run_with_grads(torch_fn, tensors, grad_out, dtype)
    got_out, got_grads = run_with_grads(triton_fn, tensors, grad_out, dtype)
    assert got_out.dtype == dtype and got_out.shape == exact_out.shape
    # One unit in the last place of the largest quantity the op computes: an exactly-zero result
    # (dq with a single key) is still a difference of terms of that size.
    scale = max(max(t.abs().max().item() for t in [exact_out, *exact_grads]), 1.0)
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
        allowed = 2 * torch_err + ULP_FLOOR[dtype] * scale
        assert err <= allowed, (
            f"{name}: error {err:.3g} > allowed {allowed:.3g} (plain torch {torch_err:.3g})"
        )
    return got_out, got_grads


def check_add_rms_norm(ops, shape: tuple[int, ...], dtype: torch.dtype, device: str) -> None:
    torch.manual_seed(1)
    x, residual = torch.randn(shape, device=device) * 3, torch.randn(shape, device=device)
    check_against_float64(
        lambda a, b: ops.add_rms_norm(a, b, 1e-5),
        lambda a, b: reference.add_rms_norm(a, b, 1e-5),
        [x, residual],
        dtype,
    )


def check_swiglu_on_halves_of_one_projection(
    ops, shape: tuple[int, ...], dtype: torch.dtype, device: str
) -> None:
    torch.manual_seed(2)
    gate_up = torch.randn(*shape[:-1], 2 * shape[-1], device=device) * 3

    def halves(fn):
        return lambda both: fn(*both.chunk(2, dim=-1))

    check_against_float64(halves(ops.swiglu), halves(reference.swiglu), [gate_up], dtype)


def check_apply_rotary_on_qkv_split(
    ops, batch: int, seq_len: int, heads: int, head_dim: int, dtype: torch.dtype, device: str
) -> None:
    torch.manual_seed(3)
    cos, sin = rope_tables(seq_len, head_dim)
    qkv = torch.randn(batch, seq_len, 3 * heads, head_dim, device=device)

    def on_k(fn):
        return lambda both: fn(both.split(heads, dim=2)[1], *tables_for(both, cos, sin))

    check_against_float64(on_k(ops.apply_rotary), on_k(reference.apply_rotary), [qkv], dtype)


def check_cross_attention(
    ops,
    batch: int,
    heads: int,
    q_len: int,
    k_len: int,
    head_dim: int,
    masked: bool,
    dtype: torch.dtype,
    device: str,
) -> None:
    """Masked: row 1 has no key (zeros and zero gradients, never NaN), masked keys get no gradient."""
    torch.manual_seed(5)
    q = torch.randn(batch, heads, q_len, head_dim, device=device)
    # k and v as the encoder makes them: [B, Lk, H, D] projections viewed head-major.
    k = (torch.randn(batch, k_len, heads, head_dim, device=device) * 2).transpose(1, 2)
    v = torch.randn(batch, k_len, heads, head_dim, device=device).transpose(1, 2)
    mask = key_mask_with_edge_rows(k_len, batch).to(device) if masked else None
    out, (dq, dk, dv) = check_against_float64(
        lambda *t: ops.cross_attention(*t, mask),
        lambda *t: reference.cross_attention(*t, mask),
        [q, k, v],
        dtype,
    )
    if masked:
        assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all() and (dv[1] == 0).all()
        assert (dk[~mask[:, None, :].expand(-1, heads, -1)] == 0).all()


def rope_tables(seq_len: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    from etrm.models.layers import RotaryEmbedding

    cos, sin = RotaryEmbedding(head_dim, max_positions=seq_len, base=10000.0)()
    return cos, sin


def tables_for(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 tables, float64 for the float64 reference (the reference does its math in the tables' dtype)."""
    cos, sin = cos.to(x.device), sin.to(x.device)
    return (cos.double(), sin.double()) if x.dtype == torch.float64 else (cos, sin)


def key_mask_with_edge_rows(k_len: int, batch: int = 3) -> torch.Tensor:
    """Batch row 0 random, row 1 fully masked, row 2 a single key, any further rows random."""
    mask = torch.rand(batch, k_len) > 0.4
    mask[0, 0] = True
    mask[1] = False
    mask[2] = False
    mask[2, k_len // 2] = True
    return mask


def tiny_episode(batch_size: int = 1) -> dict:
    """Queries with two small demos each, as EpisodeSampler would batch them."""
    from etrm.data.encoding import encode_grid

    rng = np.random.default_rng(0)

    def tokens(height: int, width: int) -> torch.Tensor:
        return torch.from_numpy(encode_grid(rng.integers(0, 10, (height, width))).astype(np.int64))

    inputs = torch.stack([tokens(3, 4) for _ in range(batch_size)])
    return {
        "inputs": inputs,
        "labels": torch.where(inputs == 0, -100, inputs),
        "demo_inputs": torch.stack([torch.stack([tokens(3, 3), tokens(2, 4)]) for _ in range(batch_size)]),
        "demo_outputs": torch.stack([torch.stack([tokens(3, 3), tokens(4, 2)]) for _ in range(batch_size)]),
        "demo_mask": torch.ones(batch_size, 2, dtype=torch.bool),
        "puzzle_identifiers": torch.ones(batch_size, dtype=torch.int64),
    }


# On top of the shared `tiny_arch` (tests/conftest.py): head and tile sizes the kernels take
# (head_dim 16) and every puzzle-embedding id the tiny episode uses; then short, non-random halting.
KERNEL_ARCH = dict(num_heads=2, encoder_hidden_size=32, encoder_num_layers=1, num_puzzle_identifiers=3)
KERNEL_ARCH.update(H_cycles=1, halt_max_steps=2, halt_exploration_prob=0.0, puzzle_emb_len=4, context_len=2)


def two_act_steps(
    arch: ArchConfig, batch: dict, device: str = "cpu"
) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """Losses and logits of two ACT steps of a freshly seeded model of `arch`, and every parameter's gradient."""
    from etrm.models import build_model
    from etrm.models.losses import ACTLossHead

    torch.manual_seed(0)
    head = ACTLossHead(build_model(arch)).to(device).train()
    batch = {k: v.to(device) for k, v in batch.items()}
    carry = head.initial_carry(batch)
    results = []
    for _ in range(2):
        carry, loss, _, outputs, _ = head(carry, batch)
        loss.backward()
        results += [loss.detach().float(), outputs["logits"].detach().float()]
    return results, {name: p.grad for name, p in head.named_parameters() if p.grad is not None}
