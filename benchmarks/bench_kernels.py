"""Fused-kernel speed: Triton vs torch eager vs torch.compile vs Liger-Kernel vs SDPA, forward and forward+backward.

    python benchmarks/bench_kernels.py [--batch 128] [--dtype bf16] [--lk 2000,8000,18000] [--ops all|none|a,b]
                                       [--train-step SF2 [--data DIR] [--profile DIR]] [--no-record]

Shapes are the model's: rows = batch × 916 tokens at hidden 512 and 1,536 (add_rms_norm,
swiglu at TRM's inner size, rotary of q and k with 64-wide heads), and the set encoder's
cross-attention (16 queries, 8 heads of 64, Lk keys with a key mask). Each row gives the
median time, the effective bandwidth (the bytes the op must move at minimum, the same count
for every provider) or TFLOP/s, and that as a fraction of the device's measured peak (a large
copy_ for bandwidth, a large matmul for TFLOP/s). Rows are appended to benchmarks/results/bench_kernels.csv;
rows from a machine without CUDA are Triton-interpreter correctness checks, not timings.

`--train-step PRESET` also times one ACT step (forward + backward, no optimizer) of that preset's
model on one training batch of `--data DIR` (a built dataset; without it, 10 random demos of
3..30 a side), with ETRM_KERNELS=torch, =triton, the torch path under torch.compile (the issue's goal:
SF2, bf16, batch 128), and the Triton path under torch.compile (`train.compile=inductor`).
`--profile DIR` writes each path's top GPU kernels (torch.profiler, 3 steps) to DIR/profile_*.txt.

Without a GPU the script runs every Triton kernel in Triton's CPU interpreter at tiny shapes,
checks output and gradients against a float64 reference, and times nothing.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from results import append_rows, machine, utc_stamp  # benchmarks/results.py

if not torch.cuda.is_available():
    # Must precede the first import of the kernel modules: @triton.jit reads it then.
    os.environ["TRITON_INTERPRET"] = "1"

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from etrm.kernels import reference, triton_ops  # noqa: E402
from etrm.models.layers import RotaryEmbedding, swiglu_inner_size  # noqa: E402

NAME = "bench_kernels"  # rows in benchmarks/results/bench_kernels.csv
TOKENS = 916  # 900 grid cells + 16 context slots
EPS = 1e-5


@dataclass
class Case:
    """One op at one shape: its inputs, the providers that compute it, and the work it must do."""

    op: str
    size: str
    inputs: list[torch.Tensor]
    providers: dict[str, Callable[..., torch.Tensor]]
    bytes_fwd: int
    bytes_bwd: int
    flops_fwd: int = 0
    flops_bwd: int = 0
    notes: dict[str, str] = field(default_factory=dict)
    inputs_by_provider: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    grad_inputs: tuple[int, ...] | None = None  # inputs that get a gradient (None: all)


def liger_providers() -> dict[str, Callable]:
    """Liger-Kernel's peers of our ops, when it is installed (it is not a dependency)."""
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        from liger_kernel.transformers.fused_add_rms_norm import LigerFusedAddRMSNorm
        from liger_kernel.transformers.rope import liger_rotary_pos_emb
    except Exception:
        return {}
    norms: dict[int, torch.nn.Module] = {}

    def add_rms_norm(x, residual):
        norm = norms.setdefault(x.shape[-1], LigerFusedAddRMSNorm(x.shape[-1], eps=EPS).to(x.device, x.dtype))
        out = norm(x, residual)
        return out[0] if isinstance(out, tuple) else out

    def rotary_qk(cos, sin):
        # Liger wants heads before positions; the tensors are made in that layout for it.
        def rotate(q, k):
            return tuple(liger_rotary_pos_emb(q, k, cos[None], sin[None]))

        return rotate

    return {"add_rms_norm": add_rms_norm, "swiglu": LigerSiLUMulFunction.apply, "rotary": rotary_qk}


def compiled(fn: Callable) -> Callable:
    return torch.compile(fn, dynamic=False)


def norm_cases(batch: int, dtype: torch.dtype, device: str, liger: dict) -> list[Case]:
    cases = []
    for hidden in (512, 1536):
        x = torch.randn(batch * TOKENS, hidden, device=device, dtype=dtype)
        residual = torch.randn_like(x)
        n_bytes = x.numel() * x.element_size()
        providers = {
            "triton": lambda a, b: triton_ops.add_rms_norm(a, b, EPS),
            "torch": lambda a, b: reference.add_rms_norm(a, b, EPS),
            "torch.compile": compiled(lambda a, b: reference.add_rms_norm(a, b, EPS)),
        }
        if "add_rms_norm" in liger:
            providers["liger"] = liger["add_rms_norm"]
        # Forward reads x and residual and writes y; backward reads dy and y and writes dh, which is the
        # gradient of both inputs. Only x is a leaf here: a second leaf would add autograd's copy of dh
        # (two more passes, every provider), which the model, where both are activations, never makes.
        cases.append(
            Case(
                "add_rms_norm",
                f"{batch}×{TOKENS}×{hidden}",
                [x, residual],
                providers,
                3 * n_bytes,
                3 * n_bytes,
                grad_inputs=(0,),
            )
        )
    return cases


def swiglu_cases(batch: int, dtype: torch.dtype, device: str, liger: dict) -> list[Case]:
    cases = []
    for hidden in (512, 1536):
        inner = swiglu_inner_size(hidden, 4.0)
        gate = torch.randn(batch * TOKENS, inner, device=device, dtype=dtype)
        up = torch.randn_like(gate)
        n_bytes = gate.numel() * gate.element_size()
        providers = {
            "triton": triton_ops.swiglu,
            "torch": reference.swiglu,
            "torch.compile": compiled(reference.swiglu),
        }
        if "swiglu" in liger:
            providers["liger"] = liger["swiglu"]
        # Forward reads gate, up and writes y; backward reads dy, gate, up and writes dgate, dup.
        cases.append(
            Case("swiglu", f"{batch}×{TOKENS}×{inner}", [gate, up], providers, 3 * n_bytes, 5 * n_bytes)
        )
    return cases


def rotate_q_and_k(rotary: Callable, cos: torch.Tensor, sin: torch.Tensor) -> Callable:
    """Both rotated tensors are returned (and both get a gradient), so no provider does extra work."""
    return lambda q, k: (rotary(q, cos, sin), rotary(k, cos, sin))


def rotary_cases(batch: int, dtype: torch.dtype, device: str, liger: dict) -> list[Case]:
    """Rotating q and k of one attention layer, as the model does."""
    cases = []
    head_dim = 64
    for hidden in (512, 1536):
        heads = hidden // head_dim
        cos, sin = (t.to(device) for t in RotaryEmbedding(head_dim, TOKENS, 10000.0)())
        q = torch.randn(batch, TOKENS, heads, head_dim, device=device, dtype=dtype)
        k = torch.randn_like(q)
        n_bytes = 2 * q.numel() * q.element_size()
        providers = {
            "triton": rotate_q_and_k(triton_ops.apply_rotary, cos, sin),
            "torch": rotate_q_and_k(reference.apply_rotary, cos, sin),
            "torch.compile": compiled(rotate_q_and_k(reference.apply_rotary, cos, sin)),
        }
        case = Case(
            "rotary q,k", f"{batch}×{TOKENS}×{heads}×{head_dim}", [q, k], providers, 2 * n_bytes, 2 * n_bytes
        )
        if "rotary" in liger:
            q_heads_first, k_heads_first = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous()
            providers["liger"] = liger["rotary"](cos, sin)
            case.notes["liger"] = "inputs [B,H,S,D]"
            case.inputs_by_provider["liger"] = [q_heads_first, k_heads_first]
        cases.append(case)
    return cases


def attention_providers(key_mask: torch.Tensor) -> dict[str, Callable]:
    def eager(q, k, v):
        return reference.cross_attention(q, k, v, key_mask)

    def sdpa(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])

    return {
        "triton": lambda q, k, v: triton_ops.cross_attention(q, k, v, key_mask),
        "torch": eager,
        "torch.compile": compiled(eager),
        "sdpa+mask": sdpa,
    }


def attention_cases(batch: int, dtype: torch.dtype, device: str, k_lens: list[int]) -> list[Case]:
    heads, head_dim, q_len = 8, 64, 16
    cases = []
    for k_len in k_lens:
        q = torch.randn(batch, heads, q_len, head_dim, device=device, dtype=dtype)
        k = torch.randn(batch, heads, k_len, head_dim, device=device, dtype=dtype)
        v = torch.randn_like(k)
        # Demo sets of varying size: each sample attends to a random prefix of at least a quarter of the keys.
        lengths = torch.randint(k_len // 4, k_len + 1, (batch,), device=device)
        key_mask = torch.arange(k_len, device=device)[None, :] < lengths[:, None]
        providers = attention_providers(key_mask)
        kv_bytes = 2 * k.numel() * k.element_size()
        flops = 4 * batch * heads * q_len * k_len * head_dim
        # Forward streams K and V once; backward streams them twice (dK/dV pass, dQ pass) and writes dK, dV.
        cases.append(
            Case(
                "cross_attention",
                f"B{batch} H{heads} Lq{q_len} Lk{k_len} D{head_dim}",
                [q, k, v],
                providers,
                kv_bytes,
                3 * kv_bytes,
                flops_fwd=flops,
                flops_bwd=int(2.5 * flops),
            )
        )
    return cases


def synthetic_episodes(batch: int, max_demos: int, device: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random grids of ARC-like sizes (3..30 a side) in the EpisodeSampler batch layout, all demo slots used."""
    import numpy as np

    from etrm.data.encoding import encode_grid

    rng = np.random.default_rng(seed)

    def tokens(count: int) -> torch.Tensor:
        grids = [rng.integers(0, 10, tuple(rng.integers(3, 31, size=2))) for _ in range(count)]
        return torch.from_numpy(np.stack([encode_grid(g) for g in grids]).astype(np.int64))

    inputs = tokens(batch)
    return {
        key: value.to(device)
        for key, value in {
            "inputs": inputs,
            "labels": torch.where(inputs == 0, -100, inputs),
            "demo_inputs": tokens(batch * max_demos).view(batch, max_demos, -1),
            "demo_outputs": tokens(batch * max_demos).view(batch, max_demos, -1),
            "demo_mask": torch.ones(batch, max_demos, dtype=torch.bool),
            "puzzle_identifiers": torch.zeros(batch, dtype=torch.int64),
        }.items()
    }


def report(row: dict) -> dict:
    """Print a row as soon as it is measured (a run cut short by a time limit still shows what it had)."""
    print(" | ".join(str(row[c]) for c in ("op", "size", "provider", "pass", "ms", "value")), flush=True)
    return row


def arc_episodes(data: str, batch: int, max_demos: int, device: str) -> tuple[dict[str, torch.Tensor], str]:
    """One training batch of a built dataset (e.g. ARC-AGI-1), as the training loop would draw it."""
    from etrm.data.dataset import open_dataset
    from etrm.data.episodes import EpisodeSampler

    dataset = open_dataset(data)
    sampler = EpisodeSampler(
        dataset.split("train"), batch_size=batch, mode="train", max_demos=max_demos, seed=0
    )
    episodes = {k: v.to(device) for k, v in next(iter(sampler)).items()}
    demos = episodes["demo_mask"].sum().item() / batch
    return episodes, f"{demos:.1f} demos/episode from {data}"


def profile_step(step: Callable, path: Path, steps: int = 3) -> None:
    """Where one provider's step spends GPU time: the top kernels by self CUDA time, to `path` and stdout.

    CPU time per step is printed too: at these sizes a path can be bound by its launches.
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else lambda: None
    step()
    sync()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=70)
    path.write_text(table)
    print(f"--- profile ({steps} steps) -> {path}", flush=True)
    print("\n".join(table.splitlines()[:18]), flush=True)


def run_train_step(
    preset: str, batch_size: int, device: str, data: str | None = None, profile_dir: str | None = None
) -> list[dict]:
    """One ACT step, forward + backward, of the preset's model: torch and Triton paths, eager and compiled."""
    import torch._dynamo
    from triton.testing import do_bench

    from etrm.config import get_preset
    from etrm.models import build_model
    from etrm.models.losses import ACTLossHead

    cfg = get_preset(preset)
    arch = cfg.arch
    if data:
        batch, source = arc_episodes(data, batch_size, cfg.data.max_demos, device)
    else:
        batch, source = synthetic_episodes(batch_size, 10, device), "10 random demos of 3..30 a side"
    torch.manual_seed(0)
    head = ACTLossHead(build_model(arch)).to(device).train()
    params = list(head.parameters())
    size = f"{preset} batch {batch_size}, hidden {arch.hidden_size}, {source}"
    rows = []
    previous_mode = os.environ.get("ETRM_KERNELS")
    for provider, mode, step_fn in (
        ("torch", "torch", head),
        ("triton", "triton", head),
        ("torch.compile", "torch", torch.compile(head)),
        ("triton + torch.compile", "triton", torch.compile(head)),  # what train.compile=inductor runs on CUDA
    ):
        os.environ["ETRM_KERNELS"] = mode
        torch._dynamo.reset()  # the kernel choice is a trace-time constant: no graph may carry over

        def step(step_fn=step_fn):
            _, loss, *_ = step_fn(head.initial_carry(batch), batch)
            loss.backward()

        try:
            ms = do_bench(step, grad_to_none=params, quantiles=[0.5])
        except Exception as exc:  # e.g. a graph torch.compile cannot handle: reported, not fatal
            rows.append(
                report(
                    {
                        "op": "train step",
                        "size": size,
                        "provider": provider,
                        "pass": "fwd+bwd",
                        "ms": "-",
                        "value": f"failed: {type(exc).__name__}: {str(exc)[:120]}",
                    }
                )
            )
            continue
        value = f"{batch_size / ms * 1e3:.1f} samples/s"
        if profile_dir:
            name = provider.replace(" ", "").replace("+", "_").replace(".", "_")
            profile_step(step, Path(profile_dir) / f"profile_{name}.txt")
        rows.append(
            report(
                {
                    "op": "train step",
                    "size": size,
                    "provider": provider,
                    "pass": "fwd+bwd",
                    "ms": f"{ms:.2f}",
                    "value": value,
                }
            )
        )
    if previous_mode is None:
        os.environ.pop("ETRM_KERNELS")
    else:
        os.environ["ETRM_KERNELS"] = previous_mode
    return rows


def measured_peaks(device: str) -> tuple[float, float]:
    """(copy bandwidth in GB/s counting read + write, bf16 matmul TFLOP/s) measured on this device."""
    from triton.testing import do_bench

    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = do_bench(lambda: dst.copy_(src), quantiles=[0.5])
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    matmul_ms = do_bench(lambda: a @ a, quantiles=[0.5])
    return 2 * src.numel() / copy_ms / 1e6, 2 * 8192**3 / matmul_ms / 1e9


def time_case(case: Case, provider: str, backward: bool) -> float:
    from triton.testing import do_bench

    fn = case.providers[provider]
    inputs = case.inputs_by_provider.get(provider, case.inputs)
    if not backward:
        with torch.no_grad():
            return do_bench(lambda: fn(*inputs), quantiles=[0.5])
    wanted = range(len(inputs)) if case.grad_inputs is None else case.grad_inputs
    leaves = [t.detach().requires_grad_(i in wanted) for i, t in enumerate(inputs)]
    outputs = fn(*leaves)
    grads = [torch.randn_like(out) for out in (outputs if isinstance(outputs, tuple) else (outputs,))]

    def step():
        result = fn(*leaves)
        torch.autograd.backward(result if isinstance(result, tuple) else (result,), grads)

    return do_bench(step, grad_to_none=[t for t in leaves if t.requires_grad], quantiles=[0.5])


OPS = ("add_rms_norm", "swiglu", "rotary", "cross_attention")


def run_gpu(args, dtype: torch.dtype) -> list[dict]:
    device = "cuda"
    if not args.ops:
        return []
    bandwidth_peak, flops_peak = measured_peaks(device)
    console = Console(width=200)  # the table stays readable in a log
    console.print(f"measured peaks: copy {bandwidth_peak:.0f} GB/s, bf16 matmul {flops_peak:.0f} TFLOP/s")
    liger = liger_providers()
    if not liger:
        console.print("liger-kernel not importable: no Liger column")
    makers = {
        "add_rms_norm": lambda: norm_cases(args.batch, dtype, device, liger),
        "swiglu": lambda: swiglu_cases(args.batch, dtype, device, liger),
        "rotary": lambda: rotary_cases(args.batch, dtype, device, liger),
        "cross_attention": lambda: attention_cases(args.attn_batch, dtype, device, args.lk),
    }
    cases = [case for op in args.ops for case in makers[op]()]
    rows = []
    for case in cases:
        for provider in case.providers:
            for backward in (False, True):
                try:
                    ms = time_case(case, provider, backward)
                except Exception as exc:  # a peer that cannot run this shape is reported, not fatal
                    rows.append(
                        report(result_row(case, provider, backward, None, f"failed: {type(exc).__name__}"))
                    )
                    continue
                n_bytes = case.bytes_fwd + (case.bytes_bwd if backward else 0)
                flops = case.flops_fwd + (case.flops_bwd if backward else 0)
                gbps = n_bytes / ms / 1e6
                throughput = f"{gbps:.0f} GB/s"
                fraction = f"{gbps / bandwidth_peak:.0%} of copy"
                if flops:
                    throughput += f", {flops / ms / 1e9:.1f} TFLOP/s"
                rows.append(report(result_row(case, provider, backward, ms, f"{throughput} ({fraction})")))
        torch.cuda.empty_cache()
    return rows


def result_row(case: Case, provider: str, backward: bool, ms: float | None, value: str) -> dict:
    note = case.notes.get(provider)
    return {
        "op": case.op,
        "size": case.size,
        "provider": provider + (f" ({note})" if note else ""),
        "pass": "fwd+bwd" if backward else "fwd",
        "ms": "-" if ms is None else f"{ms:.3f}",
        "value": value,
    }


def run_cpu_check() -> list[dict]:
    """Interpreter check at tiny shapes: the largest error of the Triton op and of torch float32 vs float64."""
    torch.manual_seed(0)
    cos, sin = RotaryEmbedding(32, 7, 10000.0)()
    key_mask = torch.rand(2, 37) > 0.3
    key_mask[1] = False

    def rotary(impl, x):
        table_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return impl.apply_rotary(x, cos.to(table_dtype), sin.to(table_dtype))

    checks = [
        (
            "add_rms_norm",
            "37×53",
            [torch.randn(37, 53), torch.randn(37, 53)],
            lambda impl, x, r: impl.add_rms_norm(x, r, EPS),
        ),
        ("swiglu", "29×70", [torch.randn(29, 70), torch.randn(29, 70)], lambda impl, g, u: impl.swiglu(g, u)),
        ("rotary", "2×7×3×32", [torch.randn(2, 7, 3, 32)], rotary),
        (
            "cross_attention",
            "B2 H2 Lq16 Lk37 D32 (one sample fully masked)",
            [torch.randn(2, 2, 16, 32), torch.randn(2, 2, 37, 32), torch.randn(2, 2, 37, 32)],
            lambda impl, q, k, v: impl.cross_attention(q, k, v, key_mask),
        ),
    ]
    rows = []
    for op, size, inputs, call in checks:
        results = {}
        for label, impl, dtype in (
            ("triton", triton_ops, torch.float32),
            ("torch", reference, torch.float32),
            ("float64", reference, torch.float64),
        ):
            leaves = [t.detach().to(dtype).requires_grad_() for t in inputs]
            out = call(impl, *leaves)
            out.backward(torch.ones_like(out))
            results[label] = [out.detach(), *(t.grad for t in leaves)]
        errors = {}
        for label in ("triton", "torch"):
            pairs = zip(results[label], results["float64"], strict=True)
            errors[label] = max((got.double() - exact).abs().max().item() for got, exact in pairs)
            value = f"max abs err vs float64 {errors[label]:.1e}"
            rows.append(
                {"op": op, "size": size, "provider": label, "pass": "fwd+bwd", "ms": "-", "value": value}
            )
        if errors["triton"] > 2 * errors["torch"] + 2e-6:
            raise SystemExit(
                f"{op}: Triton error {errors['triton']:.1e} exceeds twice torch's {errors['torch']:.1e}"
            )
    return rows


def parse_ops(text: str) -> list[str]:
    if text == "all":
        return list(OPS)
    if text == "none":
        return []
    ops = [op.strip() for op in text.split(",") if op.strip()]
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(OPS)}")
    return ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="decoder batch (rows = batch × 916)")
    parser.add_argument("--attn-batch", type=int, default=128, help="set-encoder batch for cross-attention")
    parser.add_argument("--lk", type=lambda s: [int(x) for x in s.split(",")], default=[2000, 8000, 18000])
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument(
        "--ops",
        type=parse_ops,
        default=list(OPS),
        help=f"ops to time: all, none, or a comma list of {', '.join(OPS)}",
    )
    parser.add_argument(
        "--train-step", metavar="PRESET", help="also time one ACT step of this preset (e.g. SF2)"
    )
    parser.add_argument(
        "--data", help="dataset folder whose training episodes feed --train-step (default: random grids)"
    )
    parser.add_argument(
        "--profile", metavar="DIR", help="with --train-step: write each path's top GPU kernels here"
    )
    parser.add_argument(
        "--no-record", action="store_true", help="print only; do not append to benchmarks/results/"
    )
    args = parser.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]

    console = Console(width=200)  # the table stays readable in a log
    if torch.cuda.is_available():
        rows = run_gpu(args, dtype)
        if args.train_step:
            rows += run_train_step(args.train_step, args.batch, "cuda", args.data, args.profile)
        title = f"bench_kernels on {machine()} ({args.dtype})"
    else:
        rows = run_cpu_check()
        title = "bench_kernels: no GPU — correctness check in Triton's interpreter, nothing timed"
    table = Table(title=title)
    for column in ("op", "size", "provider", "pass", "ms", "value"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(row[c] for c in ("op", "size", "provider", "pass", "ms", "value")))
    console.print(table)
    if not torch.cuda.is_available():
        console.print("No CUDA device: timed nothing meaningful; GPU figures remain unmeasured.")
    if not args.no_record:
        stamp, description = utc_stamp(), machine()
        for row in rows:
            row.update(date=stamp, machine=description)
        append_rows(
            NAME,
            ["date", "machine", "op", "size", "provider", "pass", "ms", "value"],
            rows,
        )


if __name__ == "__main__":
    main()
