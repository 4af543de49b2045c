"""The re-parameterizable layers (ConvNormAct, RepVGGBlock, ACBlock) and vitops.reparameterize on whole models."""
import copy

import pytest
import torch
from torch import nn

import vitops
from vitops.layers import ACBlock, ConvNormAct, RepVGGBlock


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


class _ConvBn(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 1)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_untraceable_model_is_searched_child_by_child():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
            self.block = _ConvBn(4, 4)  # traceable on its own
            self.conv = nn.Conv2d(4, 4, 1)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.block(self.seq(x))
            if y.sum() > 0:  # fx can't trace this: the direct conv -> bn can't be proven a pair
                return self.bn(self.conv(y))
            return self.conv(y)

    model = randomize_bn(DataDependent()).eval()
    x = torch.randn(2, 3, 8, 8)
    fused, report = vitops.reparameterize(model)
    assert report.pair_search == "fx, except inside modules it could not trace (DataDependent: TraceError)"
    assert report.conv_bn_pairs == 2
    assert isinstance(fused.seq[1], nn.Identity) and isinstance(fused.block.bn, nn.Identity)
    assert isinstance(fused.bn, nn.BatchNorm2d)
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


@pytest.mark.parametrize("name,kwargs,untraced", [
    # timm's own fx leaf list makes the whole model traceable (its ConvMlp head is a registered leaf)
    ("vgg11_bn", dict(mlp_ratio=1 / 64), 0),
    # LiteMLA is a registered leaf that holds a conv -> BatchNorm of its own: traced on its own, in turn; the 4
    # LiteMLAs themselves don't trace, their children do
    ("efficientvit_b0", {}, 4),
])
def test_reparameterize_traces_as_timm_does(name, kwargs, untraced):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False, num_classes=10, **kwargs)).eval()
    x = torch.randn(2, 3, 64, 64)
    fused, report = vitops.reparameterize(model)
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert report.conv_bn_pairs == bns == report.bns_before and report.bns_after == 0
    assert report.pair_search.count(": TraceError") == untraced
    assert report.pair_search == "fx" or untraced
    with torch.no_grad():
        assert_same_output(model(x), fused(x))
