"""attention and attention_packed: every backend against the reference (FlashAttention's error rule), the packed
layout read in place, bad inputs, opcheck, torch.compile, and the timm drop-in layer and patch_model.

Under the Triton interpreter (no GPU) the shapes are a reduced subset; the full grid of the issue is marked cuda.
"""
import itertools

import pytest
import torch

import vitops
from tests.conftest import HAS_CUDA, device_backend_params
from vitops.layers import Attention
from vitops.ops import attention, attention_packed, reference

BACKENDS = device_backend_params("attention")
CUDA = [pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]

# (B, H, N, D) for the interpreter: N in {1, 17, 50, 197}, batch 1, few heads, D 32 and 64.
SMALL_CASES = [
    (1, 2, 1, 32), (1, 3, 17, 64), (1, 2, 50, 32), (1, 1, 197, 64), (3, 2, 67, 32), (1, 1, 257, 64), (1, 1, 40, 128)
]
# The grid, on a GPU.
FULL_CASES = list(itertools.product((1, 3), (3, 6, 12), (1, 17, 50, 197, 257, 577), (32, 64)))


def make_qkv(b, h, n, d, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3 * h * d, generator=g, dtype=torch.float32)
    return qkv.to(device=device, dtype=dtype).requires_grad_()


def out_and_grads(fn, qkv, num_heads, grad_out):
    """fn(qkv) -> (B, N, H*D); returns [out, dq, dk, dv] with the grads split out of the packed one."""
    out = fn(qkv, num_heads)
    (dqkv,) = torch.autograd.grad(out, qkv, grad_out.to(out.dtype))
    return [out, *dqkv.unflatten(-1, (3, -1)).unbind(-2)]


def packed_fn(backend):
    def fn(qkv, num_heads):
        with vitops.use_backend(backend):
            return attention_packed(qkv, num_heads)

    return fn


def unpacked_fn(backend):
    def fn(qkv, num_heads):
        q, k, v = reference.split_packed_qkv(qkv, num_heads)  # strided views, last dim contiguous
        with vitops.use_backend(backend):
            return attention(q, k, v).transpose(1, 2).flatten(2)

    return fn


def reference_fn(qkv, num_heads):
    return reference.attention_packed(qkv, num_heads)


def check_flash_rule(backend, case, dtype, device, packed):
    """FlashAttention's rule: the kernel's error against the reference upcast to float32 is at most twice the
    error of the same reference run in float16/bfloat16, for the output and all three gradients."""
    b, h, n, d = case
    qkv = make_qkv(b, h, n, d, dtype, device)
    grad_out = torch.randn(b, n, h * d, generator=torch.Generator().manual_seed(1)).to(device)
    got = out_and_grads(packed_fn(backend) if packed else unpacked_fn(backend), qkv, h, grad_out)
    low = out_and_grads(reference_fn, qkv, h, grad_out)
    qkv32 = qkv.detach().float().requires_grad_()
    want = out_and_grads(reference_fn, qkv32, h, grad_out)
    for name, g, lo, w in zip(("out", "dq", "dk", "dv"), got, low, want):
        assert g.dtype == dtype and g.shape == w.shape
        err = (g.float() - w).abs().max().item()
        ref_err = (lo.float() - w).abs().max().item()
        assert err <= 2 * ref_err + 1e-5, f"{name}: error {err:.3e} vs reference's {ref_err:.3e}"


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", SMALL_CASES, ids=lambda c: "B{}H{}N{}D{}".format(*c))
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "strided"])
def test_flash_rule_small(device, backend, dtype, case, packed):
    check_flash_rule(backend, case, dtype, device, packed)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "case", FULL_CASES + [(2, 4, 197, 128), (2, 3, 77, 40)], ids=lambda c: "B{}H{}N{}D{}".format(*c)
)
@pytest.mark.parametrize("packed", [True, False], ids=["packed", "strided"])
@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_flash_rule_full_grid(backend, dtype, case, packed):
    reason = vitops._backend.availability()["attention"]["cuda"][backend]
    if reason is not None:
        pytest.skip(reason)
    check_flash_rule(backend, case, dtype, "cuda", packed)


@pytest.mark.parametrize("device,backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_float32_and_float64_are_precise(device, backend, dtype):
    b, h, n, d = 2, 2, 19, 24  # head_dim not a power of two: padded and masked
    qkv = make_qkv(b, h, n, d, dtype, device)
    grad_out = torch.randn(b, n, h * d, generator=torch.Generator().manual_seed(1)).to(device)
    got = out_and_grads(packed_fn(backend), qkv, h, grad_out)
    want = out_and_grads(reference_fn, qkv.detach().double().requires_grad_(), h, grad_out)
    tol = 2e-5 if dtype == torch.float32 else 1e-10
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.double(), w, rtol=tol, atol=tol)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_packed_and_unpacked_agree(device, backend):
    b, h, n, d = 2, 3, 23, 32
    qkv = make_qkv(b, h, n, d, torch.float16, device)
    grad_out = torch.randn(b, n, h * d, generator=torch.Generator().manual_seed(1)).to(device)
    packed = out_and_grads(packed_fn(backend), qkv, h, grad_out)
    unpacked = out_and_grads(unpacked_fn(backend), qkv, h, grad_out)
    for p, u in zip(packed, unpacked):
        torch.testing.assert_close(p, u, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_cross_attention_and_contiguous_inputs(device, backend):
    """Nq != Nk, separate contiguous tensors, an explicit scale."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 9, 16, generator=g).to(device).requires_grad_()
    k = torch.randn(2, 2, 21, 16, generator=g).to(device).requires_grad_()
    v = torch.randn(2, 2, 21, 16, generator=g).to(device).requires_grad_()
    with vitops.use_backend(backend):
        out = attention(q, k, v, scale=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    want_grads = torch.autograd.grad(want.sum(), (q, k, v))
    for a, w in zip(grads, want_grads):
        torch.testing.assert_close(a, w, rtol=1e-4, atol=1e-5)


def test_triton_reads_the_packed_layout_in_place(monkeypatch):
    """The launchers get views into the caller's qkv (and write into the packed output/grad): no copies."""
    triton_ops = pytest.importorskip("vitops.ops.triton.attention")
    if vitops._backend.availability()["attention"]["cpu"]["triton"] is not None:
        pytest.skip("Triton can't run here")
    seen = {}
    forward_into, backward_into = triton_ops.forward_into, triton_ops.backward_into

    def spy_forward(q, k, v, out, lse, scale):
        seen["fwd"] = [t.data_ptr() for t in (q, k, v, out)]
        return forward_into(q, k, v, out, lse, scale)

    def spy_backward(grad_out, q, k, v, out, lse, dq, dk, dv, scale):
        seen["bwd"] = [t.data_ptr() for t in (q, k, v, dq, dk, dv)]
        return backward_into(grad_out, q, k, v, out, lse, dq, dk, dv, scale)

    monkeypatch.setattr(triton_ops, "forward_into", spy_forward)
    monkeypatch.setattr(triton_ops, "backward_into", spy_backward)
    h, d = 2, 16
    qkv = make_qkv(1, h, 5, d, torch.float16, "cpu")
    with vitops.use_backend("triton"):
        out = attention_packed(qkv, h)
    (dqkv,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
    item, base = qkv.element_size(), qkv.data_ptr()
    assert seen["fwd"] == [base, base + h * d * item, base + 2 * h * d * item, out.data_ptr()]
    dbase = dqkv.data_ptr()
    assert seen["bwd"][:3] == seen["fwd"][:3]
    assert seen["bwd"][3:] == [dbase, dbase + h * d * item, dbase + 2 * h * d * item]


def test_bad_inputs_say_what_is_wrong():
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="not 3 \\* num_heads \\* head_dim"):
        attention_packed(torch.randn(1, 5, 3 * 2 * 8 + 3), 2)
    with pytest.raises(ValueError, match="num_heads must be a positive int"):
        attention_packed(torch.randn(1, 5, 48), 0)
    with pytest.raises(TypeError, match="q is torch.float32 but k is torch.float16"):
        attention(q, q.half(), q)
    with pytest.raises(ValueError, match="q is on cpu but v is on meta"):
        attention(q, q, q.to("meta"))
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        attention(q, q.transpose(-1, -2).contiguous().transpose(-1, -2), q)
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        attention_packed(torch.randn(1, 48, 5).transpose(1, 2), 2)
    big = torch.randn(1, 1, 3, 512)
    with pytest.raises(ValueError, match="head_dim must be in \\[1, 256\\], got 512"):
        attention(big, big, big)
    with pytest.raises(ValueError, match="head_dim must be in \\[1, 256\\], got 300"):
        attention_packed(torch.randn(1, 3, 900), 1)
    with pytest.raises(ValueError, match="expected q \\(B, H, Nq, D\\)"):
        attention(q, q, torch.randn(1, 2, 6, 8))
    with pytest.raises(ValueError, match="must be 4-D"):
        attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="must be float16, bfloat16, float32 or float64"):
        attention(q.int(), q.int(), q.int())
    # The ops themselves check too, whichever backend runs them.
    with pytest.raises(ValueError, match="not 3 \\* num_heads \\* head_dim"):
        torch.ops.vitops.attention_packed(torch.randn(1, 5, 50), 2, None)
    for device, backend in [p.values for p in BACKENDS if not p.marks]:
        with vitops.use_backend(backend), pytest.raises(ValueError, match="head_dim must be in"):
            torch.ops.vitops.attention(big.to(device), big.to(device), big.to(device), None)


def opcheck_samples(device, dtype):
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, 5, 3 * 2 * 16, generator=g).to(device=device, dtype=dtype)
    q, k, v = reference.split_packed_qkv(qkv, 2)
    return qkv, q, k, v


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_opcheck(device, backend):
    ops = torch.ops.vitops
    with vitops.use_backend(backend):
        for dtype in (torch.float32, torch.float16):
            qkv, q, k, v = opcheck_samples(device, dtype)
            torch.library.opcheck(ops.attention, (q.requires_grad_(), k, v, None))
            torch.library.opcheck(ops.attention_packed, (qkv.requires_grad_(), 2, 0.5))
            qkv, q, k, v = opcheck_samples(device, dtype)
            out, lse = ops.attention(q, k, v, None)
            torch.library.opcheck(ops.attention_backward, (torch.ones_like(out), q, k, v, out, lse, None))
            out, lse = ops.attention_packed(qkv, 2, None)
            torch.library.opcheck(ops.attention_packed_backward, (torch.ones_like(out), qkv, out, lse, 2, None))


def attention_block(qkv, proj):
    return attention_packed(qkv, 2) @ proj


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_compile_fullgraph(device):
    """The compiled op (CPU: the reference; CUDA: the best backend) inside torch.compile(fullgraph=True)."""
    qkv = make_qkv(2, 2, 7, 16, torch.float32, device)
    proj = torch.randn(32, 8, device=device, requires_grad=True)

    def block(qkv, proj):
        out, _ = torch.ops.vitops.attention_packed(qkv, 2, None)
        return out @ proj

    fn = block if device == "cpu" else attention_block
    compiled = torch.compile(fn, fullgraph=True)
    out = compiled(qkv, proj)
    grads = torch.autograd.grad(out.sum(), (qkv, proj))
    want = fn(qkv, proj)
    want_grads = torch.autograd.grad(want.sum(), (qkv, proj))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_compile_fullgraph_each_backend(device, backend):
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter does not run inside compiled graphs")
    qkv = make_qkv(1, 2, 7, 16, torch.float32, device)
    proj = torch.randn(32, 8, device=device, requires_grad=True)
    with vitops.use_backend(backend):
        compiled = torch.compile(attention_block, fullgraph=True, backend="aot_eager")
        out = compiled(qkv, proj)
        out.sum().backward()
    torch.testing.assert_close(out, reference_fn(qkv, 2) @ proj, rtol=1e-5, atol=1e-5)
    assert qkv.grad is not None and qkv.grad.shape == qkv.shape


# --- the timm drop-in ---------------------------------------------------------------------------------------


def test_layer_loads_timm_weights_and_matches():
    timm_layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    for kwargs in ({"qkv_bias": True}, {"qk_norm": True, "norm_layer": torch.nn.LayerNorm}, {"scale_norm": True,
                   "norm_layer": torch.nn.LayerNorm}):
        theirs = timm_layers.Attention(48, num_heads=3, **kwargs).eval()
        ours = Attention(48, num_heads=3, **kwargs).eval()
        assert ours.state_dict().keys() == theirs.state_dict().keys()
        assert [n for n, _ in ours.named_children()] == [n for n, _ in theirs.named_children()]
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(2, 11, 48)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)


def test_layer_gradients_match_timm():
    timm_layers = pytest.importorskip("timm.layers")
    theirs = timm_layers.Attention(32, num_heads=2, qkv_bias=True)
    ours = Attention(32, num_heads=2, qkv_bias=True)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 9, 32)
    ours(x).square().sum().backward()
    theirs(x).square().sum().backward()
    for (name, p), (_, t) in zip(ours.named_parameters(), theirs.named_parameters()):
        torch.testing.assert_close(p.grad, t.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_layer_attn_drop_in_training_takes_sdpa_with_dropout(monkeypatch):
    timm_layers = pytest.importorskip("timm.layers")
    theirs = timm_layers.Attention(32, num_heads=2, attn_drop=0.5).train()
    ours = Attention(32, num_heads=2, attn_drop=0.5).train()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 9, 32)
    calls = []
    spy = lambda *a, **k: calls.append(a) or attention_packed(*a, **k)  # noqa: E731
    monkeypatch.setattr("vitops.layers.attention.attention_packed", spy)
    torch.manual_seed(5)
    got = ours(x)
    torch.manual_seed(5)
    torch.testing.assert_close(got, theirs(x))
    assert calls == []  # dropout never reaches the vitops kernels
    torch.manual_seed(6)
    assert not torch.allclose(ours(x), got)  # the dropout is live
    ours.eval()
    ours(x)
    assert len(calls) == 1  # eval mode runs the kernels


def test_layer_rejects_too_large_head_dim():
    with pytest.raises(ValueError, match="head_dim 512"):
        Attention(1024, num_heads=2)


def test_patch_vit_small_and_revert():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_small_patch16_224", pretrained=False, drop_path_rate=0.1).eval()
    keys = list(model.state_dict().keys())
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        want = model(x)
    report = vitops.patch_model(model)
    assert report.counts() == {"Attention": 12, "DropPath": 11 * 2}
    assert all(isinstance(b.attn, Attention) for b in model.blocks)
    assert isinstance(model.blocks[1].drop_path1, vitops.layers.DropPath)
    assert model.blocks[0].attn.qkv is not None and list(model.state_dict().keys()) == keys
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    attn_cls = type(model.blocks[0].attn)
    report.revert()
    assert attn_cls is Attention and type(model.blocks[0].attn) is timm.layers.Attention
    assert type(model.blocks[1].drop_path1) is timm.layers.DropPath


def test_patched_tiny_vit_trains_on_each_backend():
    """A small timm ViT (17 tokens), patched, runs forward and backward on every backend available here and
    matches the unpatched model."""
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    want_grads = torch.autograd.grad(want.square().sum(), list(model.parameters()))
    vitops.patch_model(model)
    for backend in ("torch", "triton"):
        if vitops._backend.availability()["attention_packed"]["cpu"][backend] is not None:
            continue
        with vitops.use_backend(backend):
            got = model(x)
            grads = torch.autograd.grad(got.square().sum(), list(model.parameters()))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        for g, w in zip(grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-4)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "n,d,dtype,misaligned",
    [(300, 64, torch.float16, False), (40, 160, torch.bfloat16, False), (33, 72, torch.float16, False),
     (33, 64, torch.float32, False), (50, 64, torch.bfloat16, True)],
)  # fmt: skip
def test_forced_cuda_backend_inside_and_outside_its_kernel_range(n, d, dtype, misaligned):
    """Forcing the "cuda" backend is right for any input: what the compiled kernel does not take (a head_dim it
    was not built for, float32, rows not 16-byte aligned) runs on the op's next backend."""
    qkv = make_qkv(2, 2, n, d, dtype, "cuda")
    if misaligned:  # a storage offset of one element: no 16-byte copies
        qkv = torch.empty(qkv.numel() + 1, dtype=dtype, device="cuda")[1:].view(qkv.shape).copy_(qkv)
        qkv = qkv.detach().requires_grad_()
    with vitops.use_backend("cuda"):
        out, _ = torch.ops.vitops.attention_packed(qkv, 2, None)
        (grad,) = torch.autograd.grad(out, qkv, torch.ones_like(out))
    qkv64 = qkv.detach().double().requires_grad_()
    want = reference_fn(qkv64, 2)
    (want_grad,) = torch.autograd.grad(want, qkv64, torch.ones_like(want))
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad.double(), want_grad, rtol=5e-2, atol=5e-2)


def test_patched_vit_compiles_fullgraph():
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    want = model(x)
    vitops.patch_model(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), want, rtol=1e-4, atol=1e-4)


def test_cuda_kernel_runs_only_when_forced(monkeypatch):
    """Until it has run on a GPU, the compiled CUDA kernel is never the default: Triton is, where it can run."""
    from vitops import _backend

    table = {b: None if b in ("cuda", "triton", "torch") else "no" for b in _backend.BACKENDS}
    monkeypatch.setitem(_backend._REASONS["attention"], "cuda", table)
    monkeypatch.setattr(_backend, "ENV_BACKEND", None)
    assert _backend.backend_for("attention", "cuda") == "triton"
    with vitops.use_backend("cuda"):
        assert _backend.backend_for("attention", "cuda") == "cuda"


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_patched_vit_small_on_gpu_matches_timm(backend):
    timm = pytest.importorskip("timm")
    reason = vitops._backend.availability()["attention_packed"]["cuda"][backend]
    if reason is not None:
        pytest.skip(reason)
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).cuda().eval()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        want = model(x).float()
        report = vitops.patch_model(model)
        with vitops.use_backend(backend):
            got = model(x).float()
    assert report.counts()["Attention"] == 12
    assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item()


@pytest.mark.parametrize("device,backend", BACKENDS)
def test_expanded_and_transposed_upstream_gradients(device, backend):
    """`out.sum().backward()` hands the backward an expanded (stride 0) gradient, a transpose a strided one."""
    qkv = make_qkv(2, 2, 9, 16, torch.float32, device)
    q, k, v = reference.split_packed_qkv(qkv, 2)
    with vitops.use_backend(backend):
        (packed_grad,) = torch.autograd.grad(attention_packed(qkv, 2).sum(), qkv)
        (strided_grad,) = torch.autograd.grad(attention(q, k, v).transpose(-1, -2).sum(0).square().sum(), qkv)
    (want_packed,) = torch.autograd.grad(reference_fn(qkv, 2).sum(), qkv)
    (want_strided,) = torch.autograd.grad(reference.attention(q, k, v).transpose(-1, -2).sum(0).square().sum(), qkv)
    torch.testing.assert_close(packed_grad, want_packed, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(strided_grad, want_strided, rtol=1e-4, atol=1e-5)
