"""timm conformance: what timm 1.0's own model tests check (tests/test_models.py: forward, backward, default cfgs,
torchscript, features_only with each feature_cls, forward_intermediates, fx), run on the vitops zoo, with each
result compared with timm's model of the same name holding the same weights.

Cost: the API checks run on every zoo model on the meta device (no arithmetic), the shape checks of timm's
default-cfg test too (those of the larger models marked slow). The checks that compute run on one small member of
each family at 32-pixel inputs (transformers with 3 blocks) and, marked slow, on the members whose code differs
(COMPUTED). Where vitops deliberately differs from timm, the test says so.
"""
import inspect
import io
import math

import pytest
import torch
from conftest import perturb_

import vitops

timm = pytest.importorskip("timm")
from timm.layers import get_channel_dim, get_spatial_dim  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

ALL = vitops.list_models()
TRANSFORMERS = [n for n in ALL if n.startswith(("vit_", "deit_"))]  # timm's NON_STD_FILTERS
# The computing checks run on one small member of each family (FAST) and, marked slow, on the members whose code
# differs from those: a Bottleneck ResNet, and ResNet-D (deep stem, avg_down). The other members (more blocks,
# other widths, patch or image sizes) run the same code.
FAST = ["resnet18", "repvgg_a0", "vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"]
COMPUTED = FAST + ["resnet50", "resnet50d"]
FEATURE_CLASSES = ["list", "dict", "hook", "getter", "fx"]
SIZE = 32  # input pixels of the computing checks


def fast_or_slow(names, fast=FAST):
    return [n if n in fast else pytest.param(n, marks=pytest.mark.slow) for n in names]


def small(name, **kwargs):
    """Model kwargs that keep a transformer cheap (3 blocks, SIZE-pixel images); CNNs as they are."""
    return dict(dict(depth=3, img_size=SIZE), **kwargs) if name in TRANSFORMERS else kwargs


def input_size(model):
    """The (C, H, W) input of the computing checks: SIZE pixels (small() builds transformers for it)."""
    return (model.pretrained_cfg["input_size"][0], SIZE, SIZE)


def pair(name, **kwargs):
    """(vitops model, timm model) of `name` built with kwargs in eval mode, the vitops one holding the timm one's
    perturbed weights."""
    reference = perturb_(timm.create_model(name, pretrained=False, **kwargs)).eval()
    model = vitops.create_model(name, **kwargs).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    return model, reference


def signature(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def assert_same(a, b, exact=False):
    """Same nested structure (tensors, lists, tuples, dicts) and values."""
    assert type(a) is type(b) or (torch.is_tensor(a) and torch.is_tensor(b)), (type(a), type(b))
    if torch.is_tensor(a):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k], exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y, exact)
    else:
        assert a == b


# --- every model, on the meta device: state_dict, cfg, feature_info, API ----------------------------------------

CFG_KEYS = ("input_size", "fixed_input_size", "pool_size", "crop_pct", "interpolation", "mean", "std", "num_classes",
            "first_conv", "classifier", "test_input_size", "test_crop_pct", "tag")
API = ("forward_features", "forward_head", "forward_intermediates", "prune_intermediate_layers", "reset_classifier",
       "get_classifier", "set_grad_checkpointing", "no_weight_decay", "group_matcher")


@pytest.mark.parametrize("name", ALL)
def test_model_api_matches_timm(name):
    with torch.device("meta"):
        model = vitops.create_model(name)
        reference = timm.create_model(name)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(k, tuple(v.shape)) for k, v in reference.state_dict().items()]  # names, shapes and order
    assert model.feature_info == reference.feature_info  # timm's models all have it, features_only or not
    assert model.default_cfg is model.pretrained_cfg
    for key in CFG_KEYS:
        assert model.pretrained_cfg.get(key) == reference.pretrained_cfg.get(key), key
    for attr in ("num_classes", "num_features", "head_hidden_size"):
        assert getattr(model, attr) == getattr(reference, attr), attr
    for method in API:
        if hasattr(reference, method):  # vitops' CNNs also have no_weight_decay (an empty set)
            assert signature(getattr(model, method)) == signature(getattr(reference, method)), method
    for coarse in (False, True):
        assert model.group_matcher(coarse) == reference.group_matcher(coarse)
    if hasattr(reference, "no_weight_decay"):
        assert model.no_weight_decay() == reference.no_weight_decay()


@pytest.mark.parametrize("name", fast_or_slow(ALL))
def test_model_default_cfgs(name):
    """timm's test_model_default_cfgs (CNNs) and test_model_default_cfgs_non_std (transformers), on the meta
    device at the config's input size: shapes only."""
    with torch.device("meta"):
        model = vitops.create_model(name).eval()
        keys = set(model.state_dict())
        cfg = model.pretrained_cfg
        x = torch.randn(1, *cfg["input_size"])
        features = model.forward_features(x)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (1, model.head_hidden_size)
        if name in TRANSFORMERS:
            assert features.shape[-1] == model.num_features
        else:
            assert tuple(features.shape[s] for s in get_spatial_dim("NCHW")) == cfg["pool_size"]
            assert features.shape[get_channel_dim("NCHW")] == model.num_features
        model.reset_classifier(0)
        assert model.num_classes == 0 and model(x).shape == pre_logits.shape
        if name not in TRANSFORMERS:
            model.reset_classifier(0, "")
            assert model(x).shape == features.shape
            unpooled = vitops.create_model(name, num_classes=0, global_pool="").eval()
            assert unpooled(x).shape == features.shape
        else:
            assert vitops.create_model(name, num_classes=0).eval()(x).shape == (1, model.num_features)
    for layer in ("first_conv", "classifier"):
        names = (cfg[layer],) if isinstance(cfg[layer], str) else cfg[layer]
        assert all(n + ".weight" in keys for n in names), layer


# --- forward / backward, with values -------------------------------------------------------------------------


@pytest.mark.parametrize("name", fast_or_slow(COMPUTED))
def test_model_forward(name):
    """timm's test_model_forward: no NaN, and grad checkpointing gives the same output; here also timm's output."""
    model, reference = pair(name, **small(name))
    x = torch.randn(1, *input_size(model))
    with torch.no_grad():
        out = model(x)
        assert out.shape[0] == 1 and not torch.isnan(out).any()
        assert_same(out, reference(x))
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(x), out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", fast_or_slow(COMPUTED))
def test_model_backward(name):
    """timm's test_model_backward (num_classes=42, train mode): every parameter gets a gradient, no NaN; here also
    timm's output and gradients."""
    model, reference = pair(name, num_classes=42, **small(name))
    model.train()
    reference.train()
    x = torch.randn(2, *input_size(model))
    out, expected = model(x), reference(x)
    out = torch.cat(out) if isinstance(out, tuple) else out
    expected = torch.cat(expected) if isinstance(expected, tuple) else expected
    assert out.shape[-1] == 42 and not torch.isnan(out).any()
    out.mean().backward()
    expected.mean().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    theirs = dict(reference.named_parameters())
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        torch.testing.assert_close(p.grad, theirs[pname].grad, rtol=1e-4, atol=1e-5, msg=pname)


# --- TorchScript ------------------------------------------------------------------------------------------------


def _ops_in(scripted) -> set:
    """The vitops ops a scripted module calls."""
    graph = str(scripted.inlined_graph)
    return {op for op in ("attention_packed", "drop_path_add") if f"vitops::{op}" in graph}


@pytest.mark.parametrize("name", fast_or_slow(COMPUTED))
def test_model_forward_torchscript_default_built(name):
    """Default-built (fused) models script: the scripted model calls vitops' ops and, saved and loaded again, gives
    eager's outputs."""
    model = vitops.create_model(name, **small(name, drop_path_rate=0.1)).eval()
    scripted = torch.jit.script(model)
    assert _ops_in(scripted) == ({"drop_path_add", "attention_packed"} if name in TRANSFORMERS else {"drop_path_add"})
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    scripted = torch.jit.load(buffer)  # in a process that has imported vitops, which registers the ops
    x = torch.randn(1, *input_size(model))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)
    model.train()
    scripted.train()  # the same seed draws the same drop-path masks
    torch.manual_seed(3)
    expected_out = model(torch.cat([x, x]))
    torch.manual_seed(3)
    torch.testing.assert_close(scripted(torch.cat([x, x])), expected_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", fast_or_slow(COMPUTED, fast=["vit_tiny_patch16_224", "resnet18"]))
def test_model_forward_torchscript_set_scriptable(name):
    """timm's test_model_forward_torchscript: built under timm's set_scriptable(True), which vitops honours with
    plain PyTorch layers, so the scripted graph holds no vitops op; the same outputs as timm's."""
    with timm.set_scriptable(True):
        model, reference = pair(name, **small(name))
    scripted = torch.jit.script(model)
    assert _ops_in(scripted) == set()
    x = torch.randn(1, *input_size(model))
    with torch.no_grad():
        out = scripted(x)
        assert out.shape[0] == 1 and not torch.isnan(out).any()
        torch.testing.assert_close(out, reference(x), rtol=1e-5, atol=1e-5)


def test_layer_config_flags_are_honoured():
    """vitops' scriptable / exportable, and timm's set_layer_config / set_scriptable / set_exportable, build plain
    layers; the default is fused."""

    def fused(model):
        block = model.blocks[0]
        return block.attn.fused_attn, block.drop_path1.fused

    kwargs = dict(depth=1, img_size=32)
    assert fused(vitops.create_model("vit_tiny_patch16_224", **kwargs)) == (True, True)
    assert fused(vitops.create_model("vit_tiny_patch16_224", scriptable=True, **kwargs)) == (False, False)
    assert fused(vitops.create_model("vit_tiny_patch16_224", exportable=True, **kwargs)) == (False, False)
    for flags in (lambda: timm.set_scriptable(True), lambda: timm.set_exportable(True),
                  lambda: timm.layers.set_layer_config(scriptable=True)):
        with flags():  # timm's context objects set their flag when created
            assert fused(vitops.create_model("vit_tiny_patch16_224", **kwargs)) == (False, False)
    assert fused(vitops.create_model("vit_tiny_patch16_224", **kwargs)) == (True, True)  # flags restored
    with vitops.layers.config.set_layer_config(exportable=True):
        assert not vitops.layers.DropPath(0.1).fused
    assert vitops.layers.DropPath(0.1).fused


# --- features ---------------------------------------------------------------------------------------------------


def _check_feature_shapes(feature_info, outputs, size, batch):
    """timm's shape checks of the features of the levels feature_info (a FeatureInfo) returns."""
    channels, reductions = feature_info.channels(), feature_info.reduction()
    assert len(channels) == len(outputs)
    for c, r, o in zip(channels, reductions, outputs):
        assert o.shape[get_channel_dim("NCHW")] == c and o.shape[0] == batch
        for axis, s in zip(get_spatial_dim("NCHW"), size):
            assert o.shape[axis] <= math.ceil(s / r) + 1
        assert not torch.isnan(o).any()


def _feature_cases():
    """Every feature_cls on one CNN and the ViT; RepVGG (the flattened stages) with its default and 'getter'."""
    fast = {"resnet18": [None, *FEATURE_CLASSES], "vit_tiny_patch16_224": [None, *FEATURE_CLASSES],
            "repvgg_a0": [None, "getter"]}
    return [
        pytest.param(name, cls, marks=() if cls in fast.get(name, ()) else pytest.mark.slow)
        for name in COMPUTED
        for cls in [None, *FEATURE_CLASSES]
    ]


@pytest.mark.parametrize("name,feature_cls", _feature_cases())
def test_features_only_matches_timm(name, feature_cls):
    """timm's test_model_forward_features (default feature_cls) and test_model_forward_intermediates_features
    ('getter'), and every other feature_cls: the extractor timm builds, with timm's state_dict keys (in order),
    feature_info and outputs; where timm refuses a feature_cls (list/dict on a ViT, whose levels are not top-level
    modules) vitops refuses it too."""
    kwargs = small(name, features_only=True, **({} if feature_cls is None else dict(feature_cls=feature_cls)))
    try:
        reference = perturb_(timm.create_model(name, pretrained=False, **kwargs)).eval()
    except AssertionError as refusal:
        with pytest.raises(ValueError, match="not top-level modules"):
            vitops.create_model(name, **kwargs)
        assert "not present in model" in str(refusal)
        return
    model = vitops.create_model(name, **kwargs).eval()
    assert type(model).__name__ == type(reference).__name__
    if feature_cls == "fx" and "distilled" in name:
        # Deliberately different: an fx graph lists parameters in the order forward first reads them, and timm's
        # distilled DeiT reads pos_embed before the class token where its ViT does the opposite; vitops' share one
        # order (the ViT's). Same keys.
        assert sorted(model.state_dict()) == sorted(reference.state_dict())
    else:
        assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict(), strict=True)
    for accessor in ("channels", "reduction", "module_name"):
        assert getattr(model.feature_info, accessor)() == getattr(reference.feature_info, accessor)()
    assert len(model.feature_info.channels()) >= 3
    size = (SIZE, SIZE)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        out = model(x)
        assert_same(out, reference(x))
    if name not in TRANSFORMERS or feature_cls in (None, "getter"):  # a ViT's hook / fx features are NLC tokens
        _check_feature_shapes(model.feature_info, list(out.values()) if isinstance(out, dict) else out, size, 1)


@pytest.mark.parametrize("name,out_indices,feature_cls", [
    ("resnet18", (1, -1), "list"), ("repvgg_a0", 2, "getter"), ("repvgg_a0", (2,), "fx"),
    ("vit_tiny_patch16_224", (0, 2), "hook"), ("vit_tiny_patch16_224", (-2,), "getter"),
])
def test_features_only_out_indices_match_timm(name, out_indices, feature_cls):
    """Chosen levels: the modules after the last one dropped (list), pruned (getter) or not traced (fx), as in
    timm."""
    kwargs = small(name, features_only=True, feature_cls=feature_cls, out_indices=out_indices)
    reference = perturb_(timm.create_model(name, pretrained=False, **kwargs)).eval()
    model = vitops.create_model(name, **kwargs).eval()
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(reference.state_dict())
    assert model.feature_info.module_name() == reference.feature_info.module_name()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert_same(model(x), reference(x))


# Every pair of values of two forward_intermediates arguments is in some case, also among the NCHW cases alone
# (all that CNNs take).
INTERMEDIATES_CASES = [
    # indices, norm, stop_early, intermediates_only, output_fmt
    (None, False, False, False, "NCHW"),
    (None, True, True, True, "NLC"),
    (2, False, True, False, "NLC"),
    (2, True, False, True, "NCHW"),
    ([0, -1], False, False, True, "NLC"),
    ([0, -1], True, True, False, "NCHW"),
    (None, False, True, False, "NCHW"),
    (2, True, False, False, "NLC"),
    ([0, -1], True, False, True, "NCHW"),
    (2, False, True, True, "NCHW"),
    (None, True, False, True, "NCHW"),
    ([0, -1], False, True, False, "NCHW"),
    (2, False, False, False, "NCHW"),
]


@pytest.mark.parametrize("name", fast_or_slow(COMPUTED, fast=["resnet18", "repvgg_a0", "vit_tiny_patch16_224"]))
def test_forward_intermediates_matches_timm(name):
    """timm's test_model_forward_intermediates (every level, output NCHW, the final features equal
    forward_features, grad checkpointing changes nothing), then indices / norm / stop_early / intermediates_only /
    output_fmt in every pair of values (INTERMEDIATES_CASES), each result equal to timm's. CNNs refuse 'NLC' (timm
    asserts; vitops raises a ValueError)."""
    model, reference = pair(name, **small(name))
    x = torch.randn(1, *input_size(model))
    levels = len(model.feature_info)
    assert levels >= 3
    with torch.no_grad():
        final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
        assert len(intermediates) == levels
        _check_feature_shapes(timm.models.FeatureInfo(model.feature_info, levels), intermediates, x.shape[2:], 1)
        torch.testing.assert_close(final, model.forward_features(x))
        for indices, norm, stop_early, intermediates_only, output_fmt in INTERMEDIATES_CASES:
            args = dict(indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
                        intermediates_only=intermediates_only)
            if output_fmt == "NLC" and name not in TRANSFORMERS:
                with pytest.raises(AssertionError):
                    reference.forward_intermediates(x, **args)
                with pytest.raises(ValueError, match="output_fmt must be 'NCHW'"):
                    model.forward_intermediates(x, **args)
                continue
            assert_same(model.forward_intermediates(x, **args), reference.forward_intermediates(x, **args))
        if name in TRANSFORMERS:
            for extra in (dict(return_prefix_tokens=True), dict(output_dict=True),
                          dict(output_dict=True, return_prefix_tokens=True, intermediates_only=True)):
                assert_same(model.forward_intermediates(x, indices=2, **extra),
                            reference.forward_intermediates(x, indices=2, **extra))
        model.set_grad_checkpointing()
        final_checkpointed, _ = model.forward_intermediates(x, output_fmt="NCHW")
    torch.testing.assert_close(final_checkpointed, final, rtol=1e-4, atol=1e-5)


# --- fx ---------------------------------------------------------------------------------------------------------


def _fx_model(model, train=False):
    """timm's _create_fx_model: torchvision's feature extractor, traced with timm's leaf modules and autowrapped
    functions, returning the model's output node."""
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import NodePathTracer, create_feature_extractor, get_graph_node_names

    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    train_nodes, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    train_return = [train_nodes[-1]]
    if train:
        graph = NodePathTracer(**tracer_kwargs).trace(model)
        nodes = list(reversed(graph.nodes))
        outputs = [n.name for n in nodes[0]._input_nodes.keys()]
        names = [n.name for n in nodes]
        train_return = [train_nodes[-names.index(n)] for n in outputs]
    return create_feature_extractor(model, train_return_nodes=train_return, eval_return_nodes=[eval_nodes[-1]],
                                    tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("name", fast_or_slow(COMPUTED))
def test_model_forward_fx(name):
    """timm's test_model_forward_fx: the traced model gives exactly the eager outputs."""
    pytest.importorskip("torchvision")
    model = vitops.create_model(name, **small(name)).eval()
    x = torch.randn(1, *input_size(model))
    with torch.inference_mode():
        out = model(x)
        fx_out = torch.cat(tuple(_fx_model(model)(x).values()))
    assert torch.equal(fx_out, out) and not torch.isnan(out).any()


@pytest.mark.parametrize("name", fast_or_slow(COMPUTED, fast=["resnet18", "vit_tiny_patch16_224"]))
def test_model_backward_fx(name):
    """timm's test_model_backward_fx (train mode, num_classes=42): every parameter of the traced model gets a
    gradient."""
    pytest.importorskip("torchvision")
    model = vitops.create_model(name, num_classes=42, **small(name, drop_path_rate=0.1)).train()
    fx_model = _fx_model(model, train=True)
    out = torch.cat(tuple(fx_model(torch.randn(2, *input_size(model))).values()))
    out.mean().backward()
    assert out.shape[-1] == 42 and not torch.isnan(out).any()
    assert all(p.grad is not None for p in fx_model.parameters())
    assert sum(p.numel() for p in fx_model.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", fast_or_slow(["vit_tiny_patch16_224", "resnet18", "repvgg_a0", "resnet50"],
                                              fast=["vit_tiny_patch16_224"]))
def test_model_forward_fx_torchscript(name):
    """timm's test_model_forward_fx_torchscript: built scriptable, traced by fx, then scripted (timm excludes the
    distilled DeiTs, whose forward branches on torch.jit.is_scripting)."""
    pytest.importorskip("torchvision")
    with timm.set_scriptable(True):
        model = vitops.create_model(name, **small(name)).eval()
    scripted = torch.jit.script(_fx_model(model))
    x = torch.randn(1, *input_size(model))
    with torch.inference_mode():
        out = torch.cat(tuple(scripted(x).values()))
        torch.testing.assert_close(out, model(x))


# --- pretrained ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", fast_or_slow(COMPUTED, fast=["resnet18", "vit_tiny_patch16_224"]))
def test_model_load_pretrained(tmp_path, name):
    """timm's test_model_load_pretrained (in_chans=1, num_classes 5 and 0) and test_model_features_pretrained, from
    a local file (vitops never downloads): the weights timm loads from the same file."""
    kwargs = small(name)
    path = str(tmp_path / "weights.pth")
    torch.save(perturb_(timm.create_model(name, **kwargs)).state_dict(), path)
    overlay = dict(file=path)
    x = torch.randn(1, 1, *(SIZE, SIZE))
    for num_classes in (5, 0):
        args = dict(pretrained=True, in_chans=1, num_classes=num_classes, pretrained_cfg_overlay=overlay, **kwargs)
        model = vitops.create_model(name, **args).eval()
        reference = timm.create_model(name, **args).eval()
        with torch.no_grad():
            if num_classes:  # the new classifier is initialised at random: compare the features
                model.reset_classifier(0)
                reference.reset_classifier(0)
            torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    if name not in TRANSFORMERS:
        model = vitops.create_model(name, pretrained=True, features_only=True, pretrained_cfg_overlay=overlay)
        reference = timm.create_model(name, pretrained=True, features_only=True, pretrained_cfg_overlay=overlay)
        assert_same(model.state_dict(), reference.state_dict(), exact=True)
