"""Triton kernels (run in Triton's CPU interpreter) against a float64 evaluation of etrm.kernels.reference.

The tolerance rule and the op checks are in tests/kernel_helpers.py; tests/test_kernels_cuda.py
runs the same checks at the model's real shapes on a GPU.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections import Counter

import pytest
import torch
from kernel_helpers import (  # tests/kernel_helpers.py
    DTYPES,
    KERNEL_ARCH,
    check_add_rms_norm,
    check_against_float64,
    check_apply_rotary_on_qkv_split,
    check_cross_attention,
    check_swiglu_on_halves_of_one_projection,
    key_mask_with_edge_rows,
    rope_tables,
    tables_for,
    tiny_episode,
    two_act_steps,
)

from etrm.config import ENCODER_TYPES
from etrm.errors import EtrmError
from etrm.kernels import reference

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
        # triton_ops (the registered custom ops) looks the launchers up on these modules per call.
        for module in modules:
            importlib.reload(module)
    yield importlib.import_module("etrm.kernels.triton_ops")
    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = previous


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 96), (37, 53), (1, 1, 1023)])
def test_add_rms_norm(ops, shape, dtype):
    check_add_rms_norm(ops, shape, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 29, 70), (5, 123), (1, 1, 1023)])
def test_swiglu_on_halves_of_one_projection(ops, shape, dtype):
    check_swiglu_on_halves_of_one_projection(ops, shape, dtype, "cpu")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("batch", "seq_len", "heads", "head_dim"), [(2, 7, 3, 32), (1, 19, 2, 64)])
def test_apply_rotary_on_qkv_split(ops, batch, seq_len, heads, head_dim, dtype):
    check_apply_rotary_on_qkv_split(ops, batch, seq_len, heads, head_dim, dtype, "cpu")


@pytest.mark.parametrize("tile", [(64, 4), (256, 8)])
def test_rotary_tiles_split_positions_and_heads_exactly(tile):
    """Tiles of 1–4 positions over 3 heads (masked to 4) give the default tile's result, bit for bit, both ways."""
    from etrm.kernels import rotary_triton

    torch.manual_seed(5)
    cos, sin = torch.randn(7, 32), torch.randn(7, 32)
    x = torch.randn(2, 7, 9, 32)[:, :, 3:6]  # strided, as k out of a fused qkv
    for backward in (False, True):
        expected = rotary_triton.rotary_launch(x, cos, sin, backward)
        assert torch.equal(rotary_triton.rotary_launch(x, cos, sin, backward, tile), expected)
        assert not torch.equal(rotary_triton.rotary_launch(x, cos, sin, not backward, tile), expected)


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("q_len", "k_len", "head_dim", "masked"),
    [(16, 1, 32, True), (5, 17, 64, False), (17, 300, 32, True), (16, 300, 64, True)],
)
def test_cross_attention(ops, q_len, k_len, head_dim, masked, dtype):
    check_cross_attention(ops, 3, 2, q_len, k_len, head_dim, masked, dtype, "cpu")


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
    assert "etrm_swiglu" in type(kernels.swiglu(gate, up).grad_fn).__name__
    monkeypatch.setenv("ETRM_KERNELS", "torch")
    assert type(kernels.swiglu(gate, up).grad_fn).__name__ == "MulBackward0"
    monkeypatch.setenv("ETRM_KERNELS", "auto")  # CPU tensors: auto means torch
    assert type(kernels.swiglu(gate, up).grad_fn).__name__ == "MulBackward0"
    monkeypatch.setenv("ETRM_KERNELS", "cuda")
    with pytest.raises(EtrmError, match="ETRM_KERNELS"):
        kernels.swiglu(gate, up)


@pytest.mark.parametrize("encoder_type", [*ENCODER_TYPES, "standard+cell_lookup+grid_coords"])
def test_tiny_etrm_with_triton_kernels_matches_torch_path(ops, encoder_type, monkeypatch, tiny_arch):
    """Forward and backward of every encoder type through the Triton kernels equal the torch path in float32.

    Every fused-op call the torch path makes must go to Triton instead (the hybrid encoders' set pool
    is where cross_attention runs; the cell lookup's biased attention is SDPA on both paths).
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
    encoder_type, _, extra = encoder_type.partition("+")
    overrides = {"cell_lookup": True, "grid_coords": True, "seq_len": 81} if extra else {}
    arch = tiny_arch(encoder_type, **KERNEL_ARCH, **overrides)
    torch_results, torch_grads = two_act_steps(arch, batch)
    monkeypatch.setenv("ETRM_KERNELS", "triton")
    triton_results, triton_grads = two_act_steps(arch, batch)

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
    float32_pointers = {"rstd_ptr", "cos_ptr", "sin_ptr", "lse_ptr", "dq_part_ptr"}

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
    for n_heads in (8, 24):  # the presets' hidden 512 and 1,536 at head size 64
        block_s, block_h, block_half, warps = rotary_triton.rotary_tile(n_heads, 32)
        for backward in (False, True):
            tiles = {"BACKWARD": backward, "BLOCK_S": block_s, "BLOCK_H": block_h, "BLOCK_HALF": block_half}
            built.append(build(rotary_triton._rotary, "bf16", tiles, warps))
    for dtype, data_type, head_dim in ((torch.bfloat16, "bf16", 64), (torch.float32, "fp32", 32)):
        q = torch.empty(1, 1, 16, head_dim, dtype=dtype)
        constants = cross_attention_triton._launch_options(q, key_mask=torch.ones(1, 1, dtype=torch.bool))
        launch = {"num_warps": constants.pop("num_warps"), "num_stages": constants.pop("num_stages")}
        for kernel in (
            cross_attention_triton._attn_fwd,
            cross_attention_triton._attn_bwd_dkdv,
            cross_attention_triton._attn_bwd_dq,
            cross_attention_triton._attn_bwd_fused,
        ):
            built.append(build(kernel, data_type, constants, **launch))
    return built


def test_kernels_compile_for_hopper():
    """The interpreter is lenient; the real compiler (to sm_90 cubin, in a fresh process) must accept every kernel."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert len(result.stdout.split()) == 16, result.stdout


if __name__ == "__main__":
    print("\n".join(compile_for_hopper()))


def custom_op_samples():
    """One call of every registered op (forward and backward ops), at small odd shapes."""
    x, r = torch.randn(3, 5, 24), torch.randn(3, 5, 24)
    cos, sin = (t.contiguous() for t in rope_tables(7, 16))
    q, k = torch.randn(2, 2, 5, 32), torch.randn(2, 2, 19, 32)
    mask = key_mask_with_edge_rows(19)[:2]
    return [
        ("add_rms_norm", (x.requires_grad_(), r.requires_grad_(), 1e-5)),
        ("swiglu", (torch.randn(4, 10, requires_grad=True), torch.randn(4, 10, requires_grad=True))),
        ("rotary", (torch.randn(2, 7, 3, 16, requires_grad=True), cos, sin, False)),
        (
            "cross_attention",
            (q.requires_grad_(), k.requires_grad_(), torch.randn_like(k).requires_grad_(), mask),
        ),
        (
            "cross_attention",
            (torch.randn(1, 2, 3, 32), torch.randn(1, 2, 4, 32), torch.randn(1, 2, 4, 32), None),
        ),
    ]


@pytest.mark.parametrize("index", range(5))
def test_custom_ops_pass_torch_library_opcheck(ops, index):
    """Fake (shape) implementations, schemas and autograd registrations agree with the real kernels."""
    name, args = custom_op_samples()[index]
    # test_schema is left out: its dispatch mode intercepts the tensor ops inside Triton's interpreter.
    checks = ("test_faketensor", "test_autograd_registration", "test_aot_dispatch_static")
    torch.library.opcheck(getattr(torch.ops.etrm, name).default, args, test_utils=checks)


def test_triton_path_compiles_without_graph_breaks(ops, monkeypatch):
    """torch.compile (fullgraph: any graph break fails) of blocks calling every op through dispatch
    gives the eager result and gradients; `aot_eager` runs Dynamo and AOTAutograd on the fake kernels."""
    from etrm.models.encoder_parts import CrossAttentionPool
    from etrm.models.layers import PostNormBlock, RotaryEmbedding

    monkeypatch.setenv("ETRM_KERNELS", "triton")
    torch.manual_seed(0)
    block, pool, rope = (
        PostNormBlock(32, 2, 2.0),
        CrossAttentionPool(32, 2, 2.0, 4, 1e-5),
        RotaryEmbedding(16, 7, 10000.0),
    )
    calls = Counter()
    for name in ("add_rms_norm", "swiglu", "apply_rotary", "cross_attention"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _f=original, _n=name: calls.update([_n]) or _f(*a))

    def loss(h, tokens, attend):
        return block(h, rope()).square().sum() + pool(tokens, attend).square().sum()

    h, tokens = torch.randn(2, 7, 32, requires_grad=True), torch.randn(2, 9, 32, requires_grad=True)
    attend = torch.rand(2, 9) > 0.3
    attend[:, 0] = True
    expected = loss(h, tokens, attend)
    expected_grads = torch.autograd.grad(expected, (h, tokens))
    eager_calls = sum(calls.values())
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(h, tokens, attend)
    got_grads = torch.autograd.grad(got, (h, tokens))
    assert set(calls) == {"add_rms_norm", "swiglu", "apply_rotary", "cross_attention"}
    assert sum(calls.values()) == 2 * eager_calls  # traced through the same ops, not the torch path
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


def test_dispatch_marks_its_choice_constant_as_torch_does():
    """dispatch sets assume_constant_result's mark by hand (importing Dynamo there would import Triton early)."""
    import torch._dynamo.decorators

    from etrm.kernels import dispatch

    def probe():
        return True

    torch._dynamo.decorators.assume_constant_result(probe)
    marks = {name for name in vars(probe) if name.startswith("_dynamo")}
    assert marks == {"_dynamo_marked_constant"}
    assert all(getattr(dispatch._use_triton, name) is getattr(probe, name) for name in marks)
