"""Flash-style cross-attention for the set encoder: few queries (the context slots) over many keys.

q [B, H, Lq, D]; k, v [B, H, Lk, D]; key_mask [B, Lk] (True = attend). Forward streams the
keys with an online softmax in base 2 (scale·log2(e) folded into the scores) and saves only
the per-row log-sum-exp. Backward recomputes the probabilities. When all query rows fit one
block (the encoder's 16 context slots), one pass over the keys gives dK, dV and per-chunk dQ
terms that are summed after (K and V read once). Otherwise one pass over key blocks gives dK
and dV (looping over the query blocks) and one pass over query blocks gives dQ. No atomics:
results are deterministic. A query row whose keys
are all masked has l = 0: its output, and every gradient through it, is exactly zero.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from etrm.kernels.triton_utils import interpreting

# Finite stand-in for −inf as the running max: exp2(score − max) stays 0 for masked keys and
# the rescale factor exp2(old − new) is never exp2(−inf + inf) = NaN on a fully masked row.
_MAX_FLOOR = tl.constexpr(-1.0e30)


@triton.jit
def _load_rows(base, rows, row_stride, row_ok, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """A [rows, HEAD_DIM] tile, zero where row_ok is False; float32 when the interpreter must avoid bf16 math."""
    ptrs = base + rows[:, None] * row_stride + tl.arange(0, HEAD_DIM)[None, :]
    tile = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _attended_keys(mask_row_ptr, offs_k, k_len, HAS_MASK: tl.constexpr):
    """Keys in range and, with a mask, marked True for this sample."""
    ok = offs_k < k_len
    if HAS_MASK:
        ok = ok & (tl.load(mask_row_ptr + offs_k, mask=ok, other=0) != 0)
    return ok


@triton.jit
def _attn_fwd(
    q_ptr, k_ptr, v_ptr, mask_ptr, o_ptr, lse_ptr,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, so_b, so_h, so_l, s_mask_b,
    n_heads, q_len, k_len, scale_log2,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < q_len
    q = _load_rows(q_ptr + b * sq_b + h * sq_h, offs_q, sq_l, q_ok, HEAD_DIM, UPCAST)
    k_base, v_base, mask_row = (
        k_ptr + b * sk_b + h * sk_h,
        v_ptr + b * sv_b + h * sv_h,
        mask_ptr + b * s_mask_b,
    )

    row_max = tl.full([BLOCK_Q], _MAX_FLOOR, tl.float32)
    row_sum = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
    for start in range(0, k_len, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_ok = _attended_keys(mask_row, offs_k, k_len, HAS_MASK)
        k = _load_rows(k_base, offs_k, sk_l, k_ok, HEAD_DIM, UPCAST)
        v = _load_rows(v_base, offs_k, sv_l, k_ok, HEAD_DIM, UPCAST)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        scores = tl.where(k_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        p = tl.exp2(scores - new_max[:, None])
        rescale = tl.exp2(row_max - new_max)
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        row_max = new_max

    has_keys = row_sum > 0
    safe_sum = tl.where(has_keys, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    out_ptrs = o_ptr + b * so_b + h * so_h + offs_q[:, None] * so_l + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(out_ptrs, out.to(o_ptr.dtype.element_ty), mask=q_ok[:, None])
    tl.store(lse_ptr + bh * q_len + offs_q, tl.where(has_keys, row_max + tl.log2(safe_sum), 0.0), mask=q_ok)


@triton.jit
def _attn_bwd_dkdv(
    q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, o_ptr, lse_ptr, dk_ptr, dv_ptr,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sdo_b, sdo_h, sdo_l, so_b, so_h, so_l, s_mask_b,
    n_heads, q_len, k_len, scale_log2, scale,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = _attended_keys(mask_ptr + b * s_mask_b, offs_k, k_len, HAS_MASK)
    k = _load_rows(k_ptr + b * sk_b + h * sk_h, offs_k, sk_l, k_ok, HEAD_DIM, UPCAST)
    v = _load_rows(v_ptr + b * sv_b + h * sv_h, offs_k, sv_l, k_ok, HEAD_DIM, UPCAST)

    dk = tl.zeros([BLOCK_K, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_K, HEAD_DIM], tl.float32)
    for start in range(0, q_len, BLOCK_Q):
        offs_q = start + tl.arange(0, BLOCK_Q)
        q_ok = offs_q < q_len
        q, do, lse, delta = _query_rows(
            q_ptr, do_ptr, o_ptr, lse_ptr, b, h, bh, offs_q, q_ok, q_len,
            sq_b, sq_h, sq_l, sdo_b, sdo_h, sdo_l, so_b, so_h, so_l, HEAD_DIM, UPCAST,
        )  # fmt: skip
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
        p_t = tl.where(k_ok[:, None] & q_ok[None, :], tl.exp2(scores_t - lse[None, :]), 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)

    # dK and dV are contiguous [B, H, Lk, D]; rows past Lk are not stored, masked keys get zeros.
    offsets = bh * k_len * HEAD_DIM + offs_k[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    in_range = (offs_k < k_len)[:, None]
    tl.store(dk_ptr + offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=in_range)
    tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _query_rows(
    q_ptr, do_ptr, o_ptr, lse_ptr, b, h, bh, offs_q, q_ok, q_len,
    sq_b, sq_h, sq_l, sdo_b, sdo_h, sdo_l, so_b, so_h, so_l, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """What the backward needs of a block of query rows: q, dO, log2-sum-exp and delta = rowsum(dO·O).

    delta is computed here from the forward's output rather than by separate torch ops: the query
    rows are few, and every launch saved counts at the encoder's sizes.
    """
    q = _load_rows(q_ptr + b * sq_b + h * sq_h, offs_q, sq_l, q_ok, HEAD_DIM, UPCAST)
    do = _load_rows(do_ptr + b * sdo_b + h * sdo_h, offs_q, sdo_l, q_ok, HEAD_DIM, UPCAST)
    o = _load_rows(o_ptr + b * so_b + h * so_h, offs_q, so_l, q_ok, HEAD_DIM, True)
    lse = tl.load(lse_ptr + bh * q_len + offs_q, mask=q_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o, axis=1)
    return q, do, lse, delta


@triton.jit
def _attn_bwd_dq(
    q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, o_ptr, lse_ptr, dq_ptr,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sdo_b, sdo_h, sdo_l, so_b, so_h, so_l, s_mask_b,
    n_heads, q_len, k_len, scale_log2, scale,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads
    offs_q = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < q_len
    q, do, lse, delta = _query_rows(
        q_ptr, do_ptr, o_ptr, lse_ptr, b, h, bh, offs_q, q_ok, q_len,
        sq_b, sq_h, sq_l, sdo_b, sdo_h, sdo_l, so_b, so_h, so_l, HEAD_DIM, UPCAST,
    )  # fmt: skip
    k_base, v_base, mask_row = (
        k_ptr + b * sk_b + h * sk_h,
        v_ptr + b * sv_b + h * sv_h,
        mask_ptr + b * s_mask_b,
    )

    dq = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
    for start in range(0, k_len, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_ok = _attended_keys(mask_row, offs_k, k_len, HAS_MASK)
        k = _load_rows(k_base, offs_k, sk_l, k_ok, HEAD_DIM, UPCAST)
        v = _load_rows(v_base, offs_k, sv_l, k_ok, HEAD_DIM, UPCAST)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        p = tl.where(q_ok[:, None] & k_ok[None, :], tl.exp2(scores - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)

    dq_ptrs = dq_ptr + bh * q_len * HEAD_DIM + offs_q[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.store(dq_ptrs, (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_ok[:, None])


@triton.jit
def _attn_bwd_fused(
    q_ptr, k_ptr, v_ptr, mask_ptr, do_ptr, o_ptr, lse_ptr, dk_ptr, dv_ptr, dq_part_ptr,
    sq_b, sq_h, sq_l, sk_b, sk_h, sk_l, sv_b, sv_h, sv_l, sdo_b, sdo_h, sdo_l, so_b, so_h, so_l, s_mask_b,
    n_heads, q_len, k_len, scale_log2, scale, keys_per_program, n_chunks,
    HAS_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):  # fmt: skip
    """All query rows (q_len ≤ BLOCK_Q) against one chunk of keys: dK, dV of the chunk and its share of dQ.

    K and V are read once for the whole backward; the chunk's dQ term goes to a float32 buffer
    [B·H, n_chunks, Lq, D] that the launcher sums (a few chunks per head: small next to K and V),
    or, with one chunk per head, straight to dQ in its own dtype.
    """
    bh = tl.program_id(1).to(tl.int64)
    chunk = tl.program_id(0)
    b, h = bh // n_heads, bh % n_heads
    offs_q = tl.arange(0, BLOCK_Q)
    q_ok = offs_q < q_len
    q, do, lse, delta = _query_rows(
        q_ptr, do_ptr, o_ptr, lse_ptr, b, h, bh, offs_q, q_ok, q_len,
        sq_b, sq_h, sq_l, sdo_b, sdo_h, sdo_l, so_b, so_h, so_l, HEAD_DIM, UPCAST,
    )  # fmt: skip
    k_base, v_base, mask_row = (
        k_ptr + b * sk_b + h * sk_h,
        v_ptr + b * sv_b + h * sv_h,
        mask_ptr + b * s_mask_b,
    )

    dq = tl.zeros([BLOCK_Q, HEAD_DIM], tl.float32)
    chunk_start = chunk * keys_per_program
    chunk_end = tl.minimum(chunk_start + keys_per_program, k_len)
    for start in range(chunk_start, chunk_end, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        k_ok = _attended_keys(mask_row, offs_k, chunk_end, HAS_MASK)
        k = _load_rows(k_base, offs_k, sk_l, k_ok, HEAD_DIM, UPCAST)
        v = _load_rows(v_base, offs_k, sv_l, k_ok, HEAD_DIM, UPCAST)
        scores_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * scale_log2
        p_t = tl.where(k_ok[:, None] & q_ok[None, :], tl.exp2(scores_t - lse[None, :]), 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
        dq += tl.dot(tl.trans(ds_t).to(k.dtype), k, input_precision=DOT_PRECISION)
        offsets = bh * k_len * HEAD_DIM + offs_k[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
        in_range = (offs_k < chunk_end)[:, None]
        tl.store(dk_ptr + offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=in_range)
        tl.store(dv_ptr + offsets, dv.to(dv_ptr.dtype.element_ty), mask=in_range)

    part = dq_part_ptr + ((bh * n_chunks + chunk) * q_len + offs_q[:, None]) * HEAD_DIM
    dq = (dq * scale).to(dq_part_ptr.dtype.element_ty)
    tl.store(part + tl.arange(0, HEAD_DIM)[None, :], dq, mask=q_ok[:, None])


def _config(head_dim: int, dtype: torch.dtype) -> dict:
    """One pinned tile per head size and dtype (no autotuning: the interpreter cannot, and Lq is always small).

    On sm_90 these tiles compile without register spills (checked with cuobjdump); the
    interpreter gets wide key blocks because its cost is per program, not per register.
    """
    if head_dim not in (16, 32, 64, 128):
        raise ValueError(f"cross_attention: head_dim {head_dim} is not one of 16, 32, 64, 128")
    if interpreting():
        block_k = 128
    else:
        block_k = 32 if head_dim == 128 and dtype == torch.float32 else 64
    return {"BLOCK_Q": 16, "BLOCK_K": block_k, "HEAD_DIM": head_dim, "num_warps": 4, "num_stages": 2}


def _key_chunks(heads_total: int, k_len: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """(keys per program, programs per head) for the fused backward: enough programs to fill the GPU.

    About four programs per multiprocessor over all heads; each chunk a whole number of key blocks.
    The interpreter gets up to three chunks so that the dQ reduction over chunks is exercised.
    """
    blocks = triton.cdiv(k_len, block_k)
    if interpreting():
        wanted = 3
    else:
        wanted = triton.cdiv(4 * torch.cuda.get_device_properties(device).multi_processor_count, heads_total)
    per_program = triton.cdiv(blocks, max(1, min(wanted, blocks))) * block_k
    return per_program, triton.cdiv(k_len, per_program)


def unit_last_stride(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The kernels index rows by stride and columns by position: each tensor with a unit last stride."""
    return tuple(t if t.stride(-1) == 1 else t.contiguous() for t in tensors)


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _mask_args(key_mask: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The key mask as bytes (zero-copy for a contiguous bool tensor); q stands in when there is none."""
    if key_mask is None:
        return q, 0
    mask = key_mask.contiguous().view(torch.uint8)
    return mask, mask.stride(0)


def _launch_options(q: torch.Tensor, key_mask: torch.Tensor | None) -> dict:
    """Compile-time switches and tiles shared by the three kernels."""
    dtype = q.dtype
    return {
        "HAS_MASK": key_mask is not None,
        # float32 inputs get full-precision dots, as torch's matmul (no TF32); half types keep the default.
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else None,
        # Triton's interpreter stores bf16 as raw bits and cannot multiply them.
        "UPCAST": interpreting() and dtype == torch.bfloat16,
        **_config(q.shape[-1], dtype),
    }


def check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None) -> None:
    if (
        q.dim() != 4
        or k.shape != v.shape
        or k.dim() != 4
        or q.shape[:2] != k.shape[:2]
        or q.shape[3] != k.shape[3]
    ):
        raise ValueError(
            f"cross_attention: need q [B,H,Lq,D] and k, v [B,H,Lk,D]; got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"cross_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (k.shape[0], k.shape[2])):
        raise ValueError(
            f"cross_attention: key_mask must be bool [{k.shape[0]}, {k.shape[2]}], "
            f"got {key_mask.dtype} {tuple(key_mask.shape)}"
        )


def cross_attention_forward(q, k, v, key_mask):
    """Returns (out like q, log2-sum-exp [B, H, Lq] float32). q, k, v need a unit last stride."""
    batch, n_heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty((batch, n_heads, q_len), dtype=torch.float32, device=q.device)
    options = _launch_options(q, key_mask)
    mask, mask_stride = _mask_args(key_mask, q)
    grid = (triton.cdiv(q_len, options["BLOCK_Q"]), batch * n_heads)
    _attn_fwd[grid](
        q,
        k,
        v,
        mask,
        out,
        lse,
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(out),
        mask_stride,
        n_heads,
        q_len,
        k_len,
        head_dim**-0.5 * math.log2(math.e),
        **options,
    )
    return out, lse


def cross_attention_backward(dout, q, k, v, key_mask, out, lse):
    (dout,) = unit_last_stride(dout)
    batch, n_heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    options = _launch_options(q, key_mask)
    mask, mask_stride = _mask_args(key_mask, q)
    common = (
        *_strides(q),
        *_strides(k),
        *_strides(v),
        *_strides(dout),
        *_strides(out),
        mask_stride,
        n_heads,
        q_len,
        k_len,
        head_dim**-0.5 * math.log2(math.e),
        head_dim**-0.5,
    )
    if q_len <= options["BLOCK_Q"]:
        # One pass over the keys: dK, dV and per-chunk dQ terms (dQ itself when there is one chunk).
        keys_per_program, n_chunks = _key_chunks(batch * n_heads, k_len, options["BLOCK_K"], q.device)
        if n_chunks == 1:
            dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            dq_parts = dq
        else:
            dq_parts = torch.empty(
                (batch * n_heads, n_chunks, q_len, head_dim), dtype=torch.float32, device=q.device
            )
        _attn_bwd_fused[(n_chunks, batch * n_heads)](
            q, k, v, mask, dout, out, lse, dk, dv, dq_parts, *common, keys_per_program, n_chunks, **options
        )
        if n_chunks > 1:
            dq = dq_parts.sum(1).view(q.shape).to(q.dtype)
        return dq, dk, dv
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _attn_bwd_dkdv[(triton.cdiv(k_len, options["BLOCK_K"]), batch * n_heads)](
        q, k, v, mask, dout, out, lse, dk, dv, *common, **options
    )
    _attn_bwd_dq[(triton.cdiv(q_len, options["BLOCK_Q"]), batch * n_heads)](
        q, k, v, mask, dout, out, lse, dq, *common, **options
    )
    return dq, dk, dv
