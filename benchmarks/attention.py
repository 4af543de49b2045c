"""Attention: vitops.ops.attention_packed (timm's Attention between its qkv and proj Linears: packed (B, N, 3*H*D)
in, (B, N, H*D) out) against PyTorch's SDPA backends and torch.compile of timm's attention math, head_dim 64.

GPU (bf16): ViT-S/B/L (6, 12, 16 heads) at 224 px (N=197, B=256) and 384 px (N=577, B=64), fwd and fwd+bwd. Each
vitops backend is its own provider (the first GPU run decides the default); each SDPA backend is forced with
torch.nn.attention.sdpa_kernel, and one that can't take these inputs is skipped with its reason. The SDPA
providers include the layout copies their (B, H, N, D) convention costs, as timm's Attention pays them. (A forced
vitops backend whose kernel does not take an input hands it to the next backend silently: every case here is
bf16 with head_dim 64, which the CUDA and Triton kernels both take.)
CPU (fp32): one small ViT-S case; vitops has no CPU attention kernel, so it runs its PyTorch fallback there.

FLOPs: 4*B*H*N^2*D forward (two matrix products), 2.5x that backward (FlashAttention's count, recomputing S).
Minimal bytes: forward reads qkv and writes out and the fp32 log-sum-exp; backward reads qkv, out, grad_out and
the log-sum-exp and writes grad_qkv.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import vitops
from benchmarks.harness import BASELINE, Case, Context, Provider, Table, measure, vitops_providers
from vitops.ops import attention_packed

MODES = ("fwd", "fwd+bwd")
HEAD_DIM = 64
HEADS = {"ViT-S": 6, "ViT-B": 12, "ViT-L": 16}
COMPILED = "compile(timm math)"
SDPA_BACKENDS = ("flash", "efficient", "cudnn")  # SDPA's names for torch.nn.attention.SDPBackend members


def _case(model: str, n: int, b: int, dtype: torch.dtype) -> Case:
    h, d = HEADS[model], HEAD_DIM
    fwd_flops = 4.0 * b * h * n * n * d
    x = b * n * h * d * dtype.itemsize  # one of q, k, v, out, grad_out
    lse = b * h * n * 4
    fwd_bytes = 4 * x + lse
    bwd_bytes = 3 * x + 2 * x + lse + 3 * x
    return Case("attention_packed", f"{model} N={n} B={b}", MODES, dtype,
                flops={"fwd": fwd_flops, "fwd+bwd": 3.5 * fwd_flops},
                bytes={"fwd": fwd_bytes, "fwd+bwd": fwd_bytes + bwd_bytes},
                spec={"batch": b, "tokens": n, "heads": h, "head_dim": d})  # fmt: skip


def cases(device: str, quick: bool) -> list[Case]:
    if device == "cpu":
        return [_case("ViT-S", 197, 8, torch.float32)]
    if quick:
        return [_case("ViT-B", 197, 256, torch.bfloat16)]
    return [_case(model, n, b, torch.bfloat16) for n, b in ((197, 256), (577, 64)) for model in HEADS]


def _split_heads(qkv: torch.Tensor, h: int):
    b, n, c3 = qkv.shape
    return qkv.reshape(b, n, 3, h, c3 // (3 * h)).permute(2, 0, 3, 1, 4).unbind(0)


def sdpa_core(qkv: torch.Tensor, h: int) -> torch.Tensor:
    """timm's Attention with fused_attn on, between qkv and proj."""
    q, k, v = _split_heads(qkv, h)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)


def timm_math_core(qkv: torch.Tensor, h: int) -> torch.Tensor:
    """timm's Attention with fused_attn off, between qkv and proj: what torch.compile gets to fuse."""
    q, k, v = _split_heads(qkv, h)
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    out = attn.softmax(dim=-1) @ v
    return out.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)


def _vitops_call(backend: str):
    def call(qkv, h):
        with vitops.use_backend(backend):
            return attention_packed(qkv, h)

    return call


def _sdpa_call(backend: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = getattr(SDPBackend, {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                                  "cudnn": "CUDNN_ATTENTION"}[backend])  # fmt: skip

    def call(qkv, h):
        with sdpa_kernel(kernel):
            return sdpa_core(qkv, h)

    return call


def _providers(device: str) -> tuple[str, list[Provider], dict[str, object]]:
    """(baseline, providers, name -> fn(qkv, heads)); torch.compile's entry is compiled afresh per case."""
    vitops_backends = vitops_providers("attention_packed", device, "vitops.ops.attention_packed")
    providers = [p for _, p in vitops_backends]
    fns = {p.name: _vitops_call(backend) for backend, p in vitops_backends}
    if device == "cpu":
        providers.append(Provider("sdpa", BASELINE, "timm's Attention with fused_attn: F.scaled_dot_product_attention "
                                  "(torch picks the CPU kernel), with its layout copies"))  # fmt: skip
        fns["sdpa"] = sdpa_core
        providers.append(Provider("timm math", BASELINE, "timm's Attention with fused_attn off, eager"))
        fns["timm math"] = timm_math_core
        return "sdpa", providers, fns
    for backend in SDPA_BACKENDS:
        name = f"sdpa {backend}"
        providers.append(Provider(name, BASELINE, f"F.scaled_dot_product_attention forced to its {backend} "
                                  "backend (sdpa_kernel), with the layout copies timm's Attention pays"))  # fmt: skip
        fns[name] = _sdpa_call(backend)
    providers.append(Provider(COMPILED, BASELINE, "torch.compile of timm's Attention math (fused_attn off), static "
                              "shapes"))  # fmt: skip
    fns[COMPILED] = None
    return "sdpa flash", providers, fns


def run(ctx: Context) -> list[Table]:
    baseline, providers, fns = _providers(ctx.device)
    table = Table("attention_packed", baseline, "fwd+bwd", providers,
                  about=f"softmax(q k^T / sqrt(D)) v from packed qkv, head_dim {HEAD_DIM}")  # fmt: skip
    for case in cases(ctx.device, ctx.quick):
        _time_case(ctx, table, case, fns)
    return [table.finish()]


def _time_case(ctx: Context, table: Table, case: Case, fns: dict) -> None:
    s = case.spec
    heads = s["heads"]
    qkv = torch.randn(s["batch"], s["tokens"], 3 * heads * s["head_dim"], device=ctx.device, dtype=case.dtype,
                      requires_grad=True)  # fmt: skip
    grad = torch.randn(s["batch"], s["tokens"], heads * s["head_dim"], device=ctx.device, dtype=case.dtype)
    torch._dynamo.reset()  # compile afresh for this case's static shapes
    runnable = {}
    for name, fn in fns.items():
        if name == COMPILED:
            fn = torch.compile(timm_math_core, dynamic=False)
        try:  # also compiles and autotunes outside the timing
            torch.autograd.grad(fn(qkv, heads), qkv, grad)
        except Exception as error:  # noqa: BLE001  (an SDPA backend or kernel that can't take these inputs is skipped)
            table.skip(name, str(error).strip().splitlines()[0][:200], case.name)
            continue
        runnable[name] = fn
    for mode in MODES:
        ctx.step("attention", f"{case.name}, {mode}")
        if mode == "fwd":
            calls = {name: (lambda fn=fn: _no_grad(fn, qkv, heads)) for name, fn in runnable.items()}
        else:
            calls = {name: (lambda fn=fn: torch.autograd.grad(fn(qkv, heads), qkv, grad))
                     for name, fn in runnable.items()}  # fmt: skip
        table.add(ctx, case, mode, measure(calls, ctx.device, ctx.quick))


def _no_grad(fn, qkv, heads):
    with torch.no_grad():
        return fn(qkv, heads)
