"""fuse_conv_bn (every backend against the reference and torch's fuse_conv_bn_weights), the re-parameterizable
layers, and vitops.reparameterize on whole models."""
import copy
import os

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

import vitops
from vitops import _backend, _extension
from vitops.layers import ACBlock, ConvNormAct, RepVGGBlock
from vitops.ops import fuse_conv_bn, reference
from tests.triton_aot import assert_compiles_for_sm90

CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
TRITON_CPU = _backend.TRITON_BLOCKER is None and os.environ.get("TRITON_INTERPRET") == "1"


def cpu_backends():
    backends = ["torch"]
    if _extension.has_compiled_kernel("fuse_conv_bn", "CPU"):
        backends.append("cpu")
    if TRITON_CPU:
        backends.append("triton")
    return backends


def channel_tensors(c, dtype=torch.float32, device="cpu", affine=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, lo=-1.0, hi=1.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo).to(dtype).to(device)

    return dict(
        bias=rand(c) if bias else None,
        running_mean=rand(c),
        running_var=rand(c, lo=0.05, hi=3.0),
        bn_weight=rand(c, lo=-2.0, hi=2.0) if affine else None,
        bn_bias=rand(c) if affine else None,
    )


def call(weight, t, eps=1e-5):
    return fuse_conv_bn(weight, t["bias"], t["running_mean"], t["running_var"], t["bn_weight"], t["bn_bias"], eps)


def torch_fused(weight, t, eps=1e-5):
    c = weight.shape[0]
    return fuse_conv_bn_weights(
        weight, t["bias"], t["running_mean"], t["running_var"], eps,
        t["bn_weight"] if t["bn_weight"] is not None else torch.ones(c, dtype=weight.dtype),
        t["bn_bias"] if t["bn_bias"] is not None else torch.zeros(c, dtype=weight.dtype),
    )  # fmt: skip


def randomize_bn(model, seed=0):
    """Non-trivial BatchNorm statistics and affine parameters, so folding mistakes show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 2 + 0.2)
                if m.affine:
                    m.weight.copy_(torch.randn(n, generator=g) * 0.5 + 1)
                    m.bias.copy_(torch.randn(n, generator=g) * 0.5)
    return model


def assert_same_output(a, b, *, rel=1e-5):
    """Equal to `rel` relative to the output's scale (max |a|)."""
    scale = a.abs().max().clamp_min(1e-12)
    err = (a - b).abs().max() / scale
    assert err <= rel, f"relative error {err.item():.3g} > {rel}"


def n_params(m):
    return sum(p.numel() for p in m.parameters())


# --- the op ----------------------------------------------------------------------------------------------------

WEIGHT_SHAPES = [(8, 4), (6, 3, 5), (16, 4, 3, 3), (4, 1, 3, 3), (12, 2, 1, 1), (5, 3, 5, 5), (4, 2, 3, 3, 3)]


def test_schema_matches_compiled_library():
    if _extension.LOAD_ERROR is not None:
        pytest.skip(f"vitops._C is {_extension.LOAD_ERROR}")
    registered = str(torch.ops.vitops.fuse_conv_bn.default._schema)
    assert registered == "vitops::" + _extension.SCHEMAS["fuse_conv_bn"]


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", WEIGHT_SHAPES)
@pytest.mark.parametrize("bias,affine", [(True, True), (False, True), (True, False), (False, False)])
def test_matches_torch_fuse_conv_bn_weights(backend, shape, bias, affine):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    t = channel_tensors(shape[0], bias=bias, affine=affine)
    with vitops.use_backend(backend):
        w, b = call(weight, t, eps=1e-3)
    want_w, want_b = torch_fused(weight, t, eps=1e-3)
    assert w.shape == weight.shape and b.shape == (shape[0],)
    assert w.dtype == b.dtype == torch.float32
    torch.testing.assert_close(w, want_w, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(b, want_b, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtypes_against_reference(backend, dtype):
    weight = torch.randn(16, 4, 3, 3, dtype=torch.float64).to(dtype)
    acc = reference.accumulate_dtype(dtype)
    t = channel_tensors(16, dtype=acc)
    with vitops.use_backend(backend):
        w, b = call(weight, t)
    want_w, want_b = reference.fuse_conv_bn(weight, *t.values(), 1e-5)
    assert w.dtype == b.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(w, want_w, rtol=tol, atol=tol)
    torch.testing.assert_close(b, want_b, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", cpu_backends())
def test_non_contiguous_weight_and_zero_channels(backend):
    weight = torch.randn(3, 3, 4, 8).permute(3, 2, 0, 1)  # (8, 4, 3, 3), not contiguous
    t = channel_tensors(8)
    with vitops.use_backend(backend):
        w, b = call(weight, t)
        w0, b0 = call(torch.empty(0, 4, 3, 3), channel_tensors(0))
    want_w, want_b = torch_fused(weight, t)
    torch.testing.assert_close(w, want_w, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(b, want_b, rtol=2e-6, atol=1e-6)
    assert w.is_contiguous()
    assert w0.shape == (0, 4, 3, 3) and b0.shape == (0,)


def test_per_channel_tensors_are_cast_to_the_compute_dtype():
    weight = torch.randn(8, 4, 3, 3)
    t = {k: v.double() for k, v in channel_tensors(8).items()}
    w, b = call(weight, t)
    want_w, want_b = torch_fused(weight.double(), t)
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, want_w.float(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(b, want_b.float(), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(running_var=torch.rand(7)), ValueError, "running_var must have shape \\(8,\\)"),
        (dict(bn_weight=torch.rand(8, 1)), ValueError, "bn_weight must have shape"),
        (dict(bias=torch.rand(16)), ValueError, "bias must have shape"),
        (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
        (dict(eps=-1e-5), ValueError, "eps must be"),
        (dict(eps=float("nan")), ValueError, "eps must be"),
        (dict(running_mean=torch.zeros(8, dtype=torch.int64)), TypeError, "running_mean must be a floating-point"),
        (dict(weight=torch.ones(8, 4, 3, 3, dtype=torch.int32)), TypeError, "weight must be a floating-point"),
        (dict(bn_bias=[0.0] * 8), TypeError, "bn_bias must be a Tensor or None"),
        (dict(weight=torch.randn(8)), ValueError, "weight must have shape \\(out_channels"),
    ],
)
def test_bad_arguments_name_the_argument(change, error, match):
    args = dict(weight=torch.randn(8, 4, 3, 3), eps=1e-5, **channel_tensors(8))
    args.update(change)
    with pytest.raises(error, match="vitops.fuse_conv_bn: " + match):
        fuse_conv_bn(**args)


def raw_ops():
    ops = []
    if _extension.has_compiled_kernel("fuse_conv_bn", "CPU"):
        ops.append(pytest.param(torch.ops.vitops.fuse_conv_bn, id="compiled"))
    if TRITON_CPU:
        ops.append(pytest.param(torch.ops.vitops.fuse_conv_bn_triton, id="triton"))
    return ops


@pytest.mark.parametrize("op", raw_ops())
@pytest.mark.parametrize(
    "name,value,match",
    [
        ("bn_weight", torch.rand(8, dtype=torch.float64), "bn_weight must be \\S+ for a \\S+ weight, got"),
        ("running_var", torch.rand(9), "running_var must have shape \\(8,\\)"),
        ("eps", 0.0, "eps must be a finite number > 0"),
    ],
)
def test_raw_op_checks_name_the_argument(op, name, value, match):
    args = dict(weight=torch.randn(8, 4, 3, 3), eps=1e-5, **channel_tensors(8))
    args[name] = value
    order = ("weight", "bias", "running_mean", "running_var", "bn_weight", "bn_bias", "eps")
    with pytest.raises(RuntimeError, match="vitops.fuse_conv_bn: " + match):
        op(*(args[k] for k in order))


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("bias,affine", [(True, True), (False, False)])
def test_gradcheck_float64(backend, bias, affine):
    weight = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    t = channel_tensors(4, dtype=torch.float64, bias=bias, affine=affine)
    names = [k for k, v in t.items() if v is not None]
    for k in names:
        t[k].requires_grad_(True)

    def f(weight, *values):
        full = dict(t)
        full.update(zip(names, values))
        return call(weight, full)

    with vitops.use_backend(backend):
        assert torch.autograd.gradcheck(f, (weight, *(t[k] for k in names)))
        if backend == "cpu":  # the backward is composed of differentiable torch ops
            assert torch.autograd.gradgradcheck(f, (weight, *(t[k] for k in names)))


def test_opcheck():
    ops = [torch.ops.vitops.fuse_conv_bn]
    if TRITON_CPU:
        ops.append(torch.ops.vitops.fuse_conv_bn_triton)
    for op in ops:
        for shape, bias, affine, grad in [((8, 4, 3, 3), True, True, True), ((6, 3, 5), False, False, False)]:
            t = channel_tensors(shape[0], bias=bias, affine=affine)
            weight = torch.randn(shape, requires_grad=grad)
            if grad:
                for v in t.values():
                    v.requires_grad_(True)
            torch.library.opcheck(op, (weight, *t.values(), 1e-5))


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def conv_bn(x, weight, bias, mean, var, gamma, beta):
        w, b = fuse_conv_bn(weight, bias, mean, var, gamma, beta, 1e-5)
        return torch.nn.functional.conv2d(x, w, b, padding=1)

    compiled = torch.compile(conv_bn, fullgraph=True, backend="inductor")
    x = torch.randn(2, 4, 8, 8)
    weight = torch.randn(8, 4, 3, 3, requires_grad=True)
    t = channel_tensors(8)
    out = compiled(x, weight, *t.values())
    torch.testing.assert_close(out, conv_bn(x, weight, *t.values()))
    out.sum().backward()
    assert weight.grad is not None and weight.grad.abs().sum() > 0


@pytest.mark.skipif(_backend.TRITON_BLOCKER is not None, reason="needs triton")
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp64"])
def test_triton_kernel_compiles_for_sm90(dtype):
    """The Triton kernel compiles for an H100 without a GPU (tests/triton_aot.py), and float32 uses IEEE-rounded
    sqrt and division."""
    acc = "fp64" if dtype == "fp64" else "fp32"
    assert_compiles_for_sm90(
        f"""
    from vitops.ops.triton.fuse_conv_bn import _fuse_conv_bn_kernel

    signature = dict(
        weight_ptr="*{dtype}", bias_ptr="constexpr", mean_ptr="*{acc}", var_ptr="*{acc}", gamma_ptr="*{acc}",
        beta_ptr="*{acc}", fused_weight_ptr="*{dtype}", fused_bias_ptr="*{dtype}", channels="i32",
        per_channel="i32", eps="fp32",
    )
    constants = dict(
        bias_ptr=None, HAS_BIAS=False, HAS_GAMMA=True, HAS_BETA=True, BLOCK_C=4, BLOCK_K=1024,
        ACC=tl.{"float64" if acc == "fp64" else "float32"}, IS_FP64={acc == "fp64"},
    )
    ptx = compile(_fuse_conv_bn_kernel, signature, constants)
    if "{acc}" == "fp32":
        assert "sqrt.rn.f32" in ptx and "div.rn.f32" in ptx
    else:
        assert "sqrt.rn.f64" in ptx
    """
    )


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_cuda_backends_against_reference(backend, dtype):
    acc = reference.accumulate_dtype(dtype)
    for shape in WEIGHT_SHAPES:
        weight = torch.randn(shape, device="cuda", dtype=dtype)
        t = channel_tensors(shape[0], dtype=acc, device="cuda")
        with vitops.use_backend(backend):
            w, b = call(weight, t)
        want_w, want_b = reference.fuse_conv_bn(weight, *t.values(), 1e-5)
        tol = 1e-3 if dtype == torch.float16 else 2e-6
        torch.testing.assert_close(w, want_w, rtol=tol, atol=tol)
        torch.testing.assert_close(b, want_b, rtol=tol, atol=tol)


@pytest.mark.cuda
@requires_cuda
def test_cuda_gradcheck_and_opcheck():
    weight = torch.randn(4, 2, 3, 3, dtype=torch.float64, device="cuda", requires_grad=True)
    t = {k: v.requires_grad_(True) for k, v in channel_tensors(4, dtype=torch.float64, device="cuda").items()}
    with vitops.use_backend("cuda"):
        assert torch.autograd.gradcheck(lambda w, *v: fuse_conv_bn(w, *v, 1e-5), (weight, *t.values()))
    torch.library.opcheck(torch.ops.vitops.fuse_conv_bn, (weight.float(), *(v.float() for v in t.values()), 1e-5))


# --- layers ----------------------------------------------------------------------------------------------------

LAYER_CASES = [
    # (in_chs, out_chs, kernel_size, stride, dilation, groups)
    pytest.param(8, 8, 1, 1, 1, 1, id="k1"),
    pytest.param(8, 8, 3, 1, 1, 1, id="k3"),
    pytest.param(8, 16, 5, 1, 1, 1, id="k5"),
    pytest.param(8, 8, 3, 2, 1, 1, id="k3-stride2"),
    pytest.param(8, 12, 3, 1, 2, 1, id="k3-dilation2"),
    pytest.param(8, 16, 3, 1, 1, 4, id="k3-groups4"),
    pytest.param(8, 8, 3, 1, 1, 8, id="k3-depthwise"),
    pytest.param(8, 8, 5, 2, 1, 8, id="k5-depthwise-stride2"),
]


def check_reparameterized(make, x, *, fewer_modules=True):
    block = randomize_bn(make(inference_mode=False)).eval()
    before = block(x)
    params, modules = n_params(block), len(list(block.modules()))
    unfused_state = copy.deepcopy(block.state_dict())
    block.reparameterize()
    after = block(x)
    assert_same_output(before, after)
    assert n_params(block) < params
    if fewer_modules:
        assert len(list(block.modules())) < modules
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())
    block.reparameterize()  # idempotent
    assert_same_output(before, block(x))

    # state_dict round trips: the fused form into an inference_mode block, the training form into a fresh one.
    deploy = make(inference_mode=True).eval()
    deploy.load_state_dict(block.state_dict(), strict=True)
    assert_same_output(before, deploy(x))
    fresh = make(inference_mode=False).eval()
    fresh.load_state_dict(unfused_state, strict=True)
    assert_same_output(before, fresh(x))
    return block


@pytest.mark.parametrize("cin,cout,k,stride,dilation,groups", LAYER_CASES)
def test_conv_norm_act(cin, cout, k, stride, dilation, groups):
    x = torch.randn(2, cin, 11, 11)
    block = check_reparameterized(
        lambda **kw: ConvNormAct(cin, cout, k, stride, dilation=dilation, groups=groups, **kw), x, fewer_modules=False
    )
    assert block.conv.bias is not None and isinstance(block.bn, nn.Identity)


@pytest.mark.parametrize("cin,cout,k,stride,dilation,groups", LAYER_CASES)
def test_repvgg_block(cin, cout, k, stride, dilation, groups):
    x = torch.randn(2, cin, 11, 11)
    block = check_reparameterized(
        lambda **kw: RepVGGBlock(cin, cout, k, stride, dilation=dilation, groups=groups, **kw), x
    )
    conv = block.reparam_conv
    assert conv.kernel_size == (k, k) and conv.stride == (stride, stride) and conv.groups == groups
    assert sorted(dict(block.named_children())) == ["act", "reparam_conv"]


def test_conv_norm_act_fuse_matches_torch_fuse_conv_bn_eval():
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    block = randomize_bn(ConvNormAct(8, 16, 3, groups=2, bias=True)).eval()
    want = fuse_conv_bn_eval(copy.deepcopy(block.conv), block.bn)
    block.fuse()
    torch.testing.assert_close(block.conv.weight, want.weight, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(block.conv.bias, want.bias, rtol=2e-6, atol=1e-6)


def test_repvgg_identity_branch_only_when_shapes_allow():
    assert RepVGGBlock(8, 8, 3).identity is not None
    assert RepVGGBlock(8, 16, 3).identity is None
    assert RepVGGBlock(8, 8, 3, stride=2).identity is None
    assert RepVGGBlock(8, 8, 3, use_identity=False).identity is None
    with pytest.raises(ValueError, match="RepVGGBlock: kernel_size must be an odd int"):
        RepVGGBlock(8, 8, 4)
    with pytest.raises(ValueError, match="RepVGGBlock: groups=3 must divide"):
        RepVGGBlock(8, 8, 3, groups=3)


@pytest.mark.parametrize("cin,cout,k,stride,dilation,groups", [c for c in LAYER_CASES if c.values[2] > 1])
def test_acblock(cin, cout, k, stride, dilation, groups):
    x = torch.randn(2, cin, 11, 11)
    check_reparameterized(lambda **kw: ACBlock(cin, cout, k, stride, dilation=dilation, groups=groups, **kw), x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_reparameterize_keeps_dtype_and_channels_last(dtype):
    model = nn.Sequential(RepVGGBlock(8, 8, 3), ACBlock(8, 8, 3), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    model = randomize_bn(model).to(dtype=dtype, memory_format=torch.channels_last).eval()
    x = torch.randn(2, 8, 12, 12, dtype=dtype).contiguous(memory_format=torch.channels_last)
    fused, _ = vitops.reparameterize(model)
    for m in fused.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.dtype == m.bias.dtype == dtype
            assert m.weight.is_contiguous(memory_format=torch.channels_last)
    assert_same_output(model(x).double(), fused(x).double(), rel=2e-2 if dtype == torch.bfloat16 else 1e-12)


def test_equivalent_kernel_is_differentiable():
    block = randomize_bn(RepVGGBlock(4, 4, 3)).eval()
    weight, bias = block.get_equivalent_kernel_bias()
    (weight.square().sum() + bias.square().sum()).backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --- vitops.reparameterize -------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """torchvision's layout: conv1/bn1 ... conv3/bn3 and a Sequential(conv, bn) downsample."""

    def __init__(self, cin, width, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=2, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class PreActBlock(nn.Module):
    """BatchNorm *before* conv, with names that look like pairs: nothing here may be folded."""

    def __init__(self, c):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv1(torch.relu(self.bn1(x)))


class Tapped(nn.Module):
    """The conv's output is used twice (before and after the BN): folding would change the result."""

    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(Bottleneck(8, 4, 16, 1), Bottleneck(16, 4, 16, 1))
        self.layer2 = nn.Sequential(Bottleneck(16, 8, 24, 2))
        self.pre = PreActBlock(24)
        self.tap = Tapped(24)
        self.rep = RepVGGBlock(24, 24, 3)
        self.ac = ACBlock(24, 16, 3, stride=2)
        self.cna = ConvNormAct(16, 16, 3, groups=16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        x = self.cna(self.ac(self.rep(self.tap(self.pre(x)))))
        return self.head(x.mean((2, 3)))


def test_reparameterize_model():
    model = randomize_bn(TinyResNet()).eval()
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    state = copy.deepcopy(model.state_dict())
    fused, report = vitops.reparameterize(model, example_input=x)
    assert fused is not model
    assert_same_output(before, fused(x))
    # The original is untouched.
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # stem 1 + 3 bottlenecks x 3 + 2 downsamples folded; the pre-activation and tapped BNs stay.
    assert report.conv_bn_pairs == 12 and report.pair_search == "fx"
    assert report.blocks == {"RepVGGBlock": 1, "ACBlock": 1, "ConvNormAct": 1}
    assert isinstance(fused.pre.bn1, nn.BatchNorm2d) and isinstance(fused.tap.bn, nn.BatchNorm2d)
    assert isinstance(fused.layer1[0].downsample[1], nn.Identity)
    assert report.bns_before == 12 + 2 + 3 + 3 + 1 and report.bns_after == 2
    assert report.convs_before - report.convs_after == 1 + 2  # RepVGG 2 convs -> 1, ACBlock 3 -> 1
    assert report.params_after < report.params_before == n_params(model)
    assert report.params_after == n_params(fused)
    assert report.flops_after < report.flops_before
    assert report.max_rel_error is not None and report.max_rel_error < 1e-5
    assert "conv->BN pairs folded: 12" in str(report)

    same, report2 = vitops.reparameterize(fused, inplace=True)
    assert same is fused and report2.conv_bn_pairs == 0 and report2.blocks == {} and report2.flops_before is None
    assert report.convs_folded == 3 and report.bns_folded == 19


def test_reparameterize_refuses_training_mode():
    model = TinyResNet().eval()
    model.layer1[1].bn2.train()
    with pytest.raises(RuntimeError, match="training mode .*'layer1.1.bn2'.*model.eval\\(\\)"):
        vitops.reparameterize(model)


def test_untraceable_model_falls_back_to_sequential_pairs():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.seq(x)
            if y.sum() > 0:  # fx can't trace this
                return self.bn(self.conv(y))
            return self.conv(y)

    model = randomize_bn(DataDependent()).eval()
    x = torch.randn(2, 3, 8, 8)
    fused, report = vitops.reparameterize(model)
    assert report.pair_search.startswith("sequential") and report.conv_bn_pairs == 1
    assert isinstance(fused.seq[1], nn.Identity) and isinstance(fused.bn, nn.BatchNorm2d)
    assert_same_output(model(x), fused(x))


def test_reparameterize_methods_that_need_arguments_are_not_called():
    class VAEish(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

        def reparameterize(self, mu, logvar):  # the VAE sampling trick, not a structural re-parameterization
            raise AssertionError("must not be called")

        def forward(self, x):
            return self.encoder(x)

    model = randomize_bn(VAEish()).eval()
    x = torch.randn(1, 3, 8, 8)
    fused, report = vitops.reparameterize(model)
    assert report.blocks == {} and report.conv_bn_pairs == 1
    assert_same_output(model(x), fused(x))


def test_batchnorm_without_running_stats_is_refused_by_name():
    block = RepVGGBlock(4, 4, 3)
    block.identity = nn.BatchNorm2d(4, track_running_stats=False)
    with pytest.raises(ValueError, match="RepVGGBlock: can't fold a BatchNorm without running statistics"):
        block.eval().reparameterize()


def test_reparameterize_timm_blocks():
    pytest.importorskip("timm")
    from timm.layers import ConvNormAct as TimmConvNormAct
    from timm.layers import StdConv2d
    from timm.models.byobnet import MobileOneBlock, RepVggBlock
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    model = nn.Sequential(
        TimmConvNormAct(3, 8, 3),
        RepVggBlock(8, 8, 3),
        MobileOneBlock(8, 16, 3, stride=2, num_conv_branches=2),
        nn.Sequential(StdConv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)),  # weight standardized: not foldable
        ResNet(BasicBlock, [1, 1, 1, 1], in_chans=16, channels=(8, 8, 16, 16), stem_width=8, num_classes=3),
    )
    model = randomize_bn(model).eval()
    x = torch.randn(2, 3, 64, 64)
    before = model(x)
    fused, report = vitops.reparameterize(model)
    assert_same_output(before, fused(x))
    assert report.blocks == {"RepVggBlock": 1, "MobileOneBlock": 1}
    # timm's ConvNormAct (a BatchNormAct2d), then timm's ResNet: stem conv1/bn1, 4 x (conv1/bn1, conv2/bn2) and
    # 4 downsample Sequential(conv, bn) (the stem is 64 channels wide, stage 1 only 8).
    assert report.conv_bn_pairs == 1 + 1 + 8 + 4
    assert isinstance(fused[0].bn, nn.Sequential)  # the BatchNormAct2d's dropout and activation remain
    assert report.bns_after == 1 and isinstance(fused[3][1], nn.BatchNorm2d)
    assert not any(m.training for m in fused.modules())  # timm's new reparam convs are put in eval mode too
    assert report.params_after < report.params_before
