"""Attention benchmark: vitops.ops.attention_packed against PyTorch's SDPA backends and torch.compile of timm's
attention core, at ViT/DeiT shapes (head_dim 64).

`run(device, quick)` returns harness rows {"op", "case", "provider", "mode", "ms", "gbps", "tflops", "pct_sol",
"speedup_vs_sdpa_flash"}: speed-of-light is the larger of the FLOPs at the peak tensor rate and the minimal bytes
(qkv, out and lse forward; qkv, out, grad_out and lse in and grad_qkv out backward) at the copy bandwidth.
On CPU only a tiny forward case runs (vitops' "torch" backend against plain SDPA): the Triton and CUDA kernels
need a GPU, and the interpreter measures nothing useful.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import vitops
from benchmarks import harness
from vitops.ops import attention_packed

# (name, B, N, H, D): DeiT/ViT-S and ViT-B at 224 px (197 tokens), ViT-B at 384 px (577), ViT-B/32 (50).
CASES = [
    ("vit_s N=197 B=256", 256, 197, 6, 64),
    ("vit_b N=197 B=256", 256, 197, 12, 64),
    ("vit_b N=577 B=64", 64, 577, 12, 64),
    ("vit_b/32 N=50 B=1024", 1024, 50, 12, 64),
]
QUICK_CASES = CASES[1:2]


def _flops(b, n, h, d, mode):
    fwd = 4.0 * b * h * n * n * d
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def _bytes(b, n, h, d, mode, item):
    x = b * n * h * d * item  # one of q, k, v, out, grad_out
    lse = b * h * n * 4
    fwd = 4 * x + lse  # read qkv, write out and lse
    bwd = 3 * x + 2 * x + lse + 3 * x  # read qkv, out, grad_out, lse; write grad_qkv
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[mode]


def _sdpa_core(qkv, h):
    b, n, c3 = qkv.shape
    q, k, v = qkv.reshape(b, n, 3, h, c3 // (3 * h)).permute(2, 0, 3, 1, 4).unbind(0)
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c3 // 3)


def _timm_eager_core(qkv, h):
    """timm's Attention between qkv and proj with fused_attn off (what torch.compile gets to fuse)."""
    b, n, c3 = qkv.shape
    d = c3 // (3 * h)
    q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    attn = (q * d**-0.5) @ k.transpose(-2, -1)
    x = attn.softmax(dim=-1) @ v
    return x.transpose(1, 2).reshape(b, n, c3 // 3)


def _providers(device: str):
    """(name, fn(qkv, h) -> (B, N, H*D)) pairs that can run here."""
    out = []
    avail = vitops._backend.availability()["attention_packed"][device]
    for backend in ("cuda", "triton", "torch"):
        if avail[backend] is None:
            def fn(qkv, h, backend=backend):
                with vitops.use_backend(backend):
                    return attention_packed(qkv, h)

            out.append((f"vitops {backend}", fn))
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for label, kernel in [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                              ("cudnn", SDPBackend.CUDNN_ATTENTION), ("math", SDPBackend.MATH)]:  # fmt: skip
            def fn(qkv, h, kernel=kernel):
                with sdpa_kernel(kernel):
                    return _sdpa_core(qkv, h)

            out.append((f"sdpa {label}", fn))
        out.append(("torch.compile timm core", torch.compile(_timm_eager_core)))
    else:
        out.append(("sdpa", _sdpa_core))
    return out


def run(device: str, quick: bool) -> list[dict]:
    if device == "cuda" and not torch.cuda.is_available():
        return []
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cases = [("vit_s N=197 B=2", 2, 197, 6, 64)] if device == "cpu" else (QUICK_CASES if quick else CASES)
    modes = ("fwd",) if device == "cpu" else ("fwd", "fwd+bwd")
    rows = []
    for case, b, n, h, d in cases:
        qkv = torch.randn(b, n, 3 * h * d, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(b, n, h * d, device=device, dtype=dtype)
        for provider, fn in _providers(device):
            for mode in modes:
                if mode == "fwd":
                    def step(fn=fn):
                        with torch.no_grad():
                            return fn(qkv, h)
                else:
                    def step(fn=fn):
                        return torch.autograd.grad(fn(qkv, h), qkv, grad)
                try:
                    ms = harness.measure_ms(step, device, quick)
                except Exception as error:  # e.g. an SDPA backend that does not take these inputs
                    rows.append({"op": "attention", "case": case, "provider": provider, "mode": mode,
                                 "error": str(error).splitlines()[0][:160]})  # fmt: skip
                    continue
                rows.append(harness.row(
                    op="attention", case=case, provider=provider, mode=mode, ms=ms, device=device, quick=quick,
                    bytes_moved=_bytes(b, n, h, d, mode, qkv.element_size()), flops=_flops(b, n, h, d, mode),
                ))  # fmt: skip
    harness.add_speedups(rows, "sdpa flash" if device == "cuda" else "sdpa")
    return rows


if __name__ == "__main__":
    import json
    import sys

    dev = sys.argv[1] if len(sys.argv) > 1 else ("cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(run(dev, quick=True), indent=1))
