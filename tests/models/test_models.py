"""Model zoo: registry, timm parity (state_dict names and outputs), model API, pretrained loading, features,
RepVGG re-parameterization, losses, export / compile. Small inputs and reduced depths keep it quick on 2 cores."""
import argparse
import fractions
import importlib.util
import os
import re

import pytest
import torch
import torch.nn.functional as F
from conftest import perturb_

import vitops
from vitops.loss import DistillationLoss, LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from vitops.models import adapt_input_conv, resample_abs_pos_embed

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")

RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet50d"]
VITS = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224", "vit_base_patch32_224",
        "vit_base_patch16_384", "vit_large_patch16_224"]
DEITS = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224", "deit_base_patch16_384",
         "deit_tiny_distilled_patch16_224", "deit_small_distilled_patch16_224", "deit_base_distilled_patch16_224",
         "deit_base_distilled_patch16_384"]
REPVGGS = ["repvgg_a0", "repvgg_a1", "repvgg_a2", "repvgg_b0", "repvgg_b1"]
ALL = RESNETS + VITS + DEITS + REPVGGS

# Small variants for forward / backward on the CPU.
SMALL = {
    "resnet18": dict(kwargs={}, size=64),
    "resnet50d": dict(kwargs={}, size=64),
    "vit_tiny_patch16_224": dict(kwargs=dict(depth=2, img_size=64), size=64),
    "deit_tiny_distilled_patch16_224": dict(kwargs=dict(depth=2, img_size=64), size=64),
    "repvgg_a0": dict(kwargs={}, size=64),
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# --- registry ------------------------------------------------------------------------------------------------


def test_every_listed_model_is_registered():
    assert set(vitops.list_models()) == set(ALL)
    assert vitops.create_model is vitops.models.create_model and vitops.list_models is vitops.models.list_models


def test_list_models_filters():
    assert vitops.list_models("resnet*") == ["resnet18", "resnet34", "resnet50", "resnet50d", "resnet101", "resnet152"]
    assert vitops.list_models("resnet*", exclude_filters=["*d"]) == [
        "resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
    assert vitops.list_models(["deit_*distilled*", "vit_large*"]) == [
        "deit_base_distilled_patch16_224", "deit_base_distilled_patch16_384", "deit_small_distilled_patch16_224",
        "deit_tiny_distilled_patch16_224", "vit_large_patch16_224"]
    pretrained = vitops.list_models("resnet50*", pretrained=True)
    assert pretrained == ["resnet50.a1_in1k", "resnet50d.ra2_in1k"]
    assert vitops.list_models("nothing*") == []


def test_is_model_and_entrypoint():
    assert vitops.models.is_model("resnet50") and vitops.models.is_model("resnet50.a1_in1k")
    assert not vitops.models.is_model("resnet51")
    assert vitops.models.model_entrypoint("resnet18") is vitops.models.resnet.resnet18


def test_unknown_model_suggests_close_matches():
    with pytest.raises(RuntimeError, match=r"unknown model 'resnet5'.*resnet50"):
        vitops.create_model("resnet5")
    with pytest.raises(RuntimeError, match="vit_small_patch16_224"):
        vitops.create_model("vit_smal_patch16_224")


def test_tagged_names_and_pretrained_cfg():
    model = vitops.create_model("resnet50.a1_in1k", num_classes=0)
    assert model.pretrained_cfg["tag"] == "a1_in1k" and model.pretrained_cfg["first_conv"] == "conv1"
    cfg = vitops.create_model("deit_tiny_distilled_patch16_224", depth=1).pretrained_cfg
    assert cfg["classifier"] == ("head", "head_dist") and cfg["mean"] == (0.485, 0.456, 0.406)
    assert vitops.create_model("vit_base_patch16_384", depth=1).pretrained_cfg["input_size"] == (3, 384, 384)


def test_none_kwargs_are_ignored():
    model = vitops.create_model("resnet18", num_classes=None, drop_rate=None, global_pool=None, in_chans=None,
                                drop_path_rate=None, scriptable=None, exportable=None)
    assert model.num_classes == 1000 and model.fc.in_features == 512


@pytest.mark.parametrize("name,millions", [("resnet50", 25.56), ("vit_small_patch16_224", 22.05),
                                           ("deit_base_patch16_224", 86.57)])
def test_documented_parameter_counts(name, millions):
    with torch.device("meta"):
        model = vitops.create_model(name)
    assert round(n_params(model) / 1e6, 2) == millions


# --- timm parity ---------------------------------------------------------------------------------------------


# The other families and sizes: tests/models/test_timm_conformance.py (test_model_forward, test_model_backward).
@pytest.mark.parametrize("name,kwargs,size", [
    ("vit_small_patch16_224", dict(depth=2, global_pool="avg"), 224),  # fc_norm instead of norm
])
def test_timm_checkpoint_loads_strict_and_matches(name, kwargs, size):
    reference = perturb_(timm.create_model(name, pretrained=False, **kwargs)).eval()
    model = vitops.create_model(name, **kwargs).eval()
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True),
                                   reference.forward_head(reference.forward_features(x), pre_logits=True))


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
def test_dynamic_img_size_matches_timm(name):
    reference = timm.create_model(name, dynamic_img_size=True, depth=2).eval()
    model = vitops.create_model(name, dynamic_img_size=True, depth=2).eval()
    model.load_state_dict(perturb_(reference).state_dict())
    x = torch.randn(2, 3, 96, 160)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
        maps = model.forward_intermediates(x, indices=1, intermediates_only=True)
        expected = reference.forward_intermediates(x, indices=1, intermediates_only=True)
    assert maps[0].shape == (2, model.embed_dim, 6, 10)
    torch.testing.assert_close(maps[0], expected[0])
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        model(torch.randn(1, 3, 100, 160))
    scripted = torch.jit.script(model)  # pos_embed resampled in the scripted forward too
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,kwargs", [
    ("resnet18", {}),
    pytest.param("resnet50d", {}, marks=pytest.mark.slow),
    ("vit_tiny_patch16_224", dict(depth=2, img_size=32)),
    ("vit_tiny_patch16_224", dict(depth=2, img_size=32, scriptable=True)),
    pytest.param("repvgg_a0", {}, marks=pytest.mark.slow),
])
def test_training_with_drop_path_matches_timm_for_a_seed(name, kwargs):
    """Stochastic depth draws its masks as timm does: same seed, same train-mode outputs and gradients (the ViT
    with LayerScale, whose gamma is fused into the residual add; built plain too)."""
    timm_kwargs = {k: v for k, v in kwargs.items() if k != "scriptable"}
    reference = timm.create_model(name, drop_path_rate=0.5, init_values=0.1, **timm_kwargs) if "vit" in name else \
        timm.create_model(name, drop_path_rate=0.5, **timm_kwargs)
    kwargs = dict(kwargs, init_values=0.1) if "vit" in name else kwargs
    model = vitops.create_model(name, drop_path_rate=0.5, **kwargs)
    model.load_state_dict(perturb_(reference).state_dict())
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    expected = reference(x)
    torch.manual_seed(1)
    out = model(x)
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    expected.backward(grad)
    out.backward(grad)
    theirs = dict(reference.named_parameters())
    for pname, p in model.named_parameters():
        torch.testing.assert_close(p.grad, theirs[pname].grad, rtol=1e-4, atol=1e-5, msg=pname)


def test_drop_path_rates_spaced_as_timm():
    vit = vitops.create_model("vit_tiny_patch16_224", depth=5, drop_path_rate=0.4)
    assert [round(b.drop_path1.drop_prob, 6) for b in vit.blocks] == [0.0, 0.1, 0.2, 0.3, 0.4]
    resnet = vitops.create_model("resnet18", drop_path_rate=0.7)
    blocks = [b for layer in (resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4) for b in layer]
    assert [round(b.drop_path.drop_prob, 6) for b in blocks] == [round(0.7 * i / 7, 6) for i in range(8)]


def test_layer_scale_uses_timm_names_and_fused_residual():
    reference = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, init_values=0.1).eval()
    model = vitops.create_model("vit_tiny_patch16_224", depth=2, img_size=32, init_values=0.1).eval()
    assert "blocks.0.ls1.gamma" in model.state_dict()
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))


# --- model API -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224", "repvgg_a0"])
def test_num_classes_zero_returns_pooled_features(name):
    kwargs = SMALL[name]["kwargs"]
    model = vitops.create_model(name, num_classes=0, **kwargs).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, model.num_features)
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    model.reset_classifier(5)
    with torch.no_grad():
        assert model(x).shape == (2, 5)
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(pre, out)


@pytest.mark.parametrize("pool,mult", [("avg", 1), ("max", 1), ("avgmax", 1), ("catavgmax", 2)])
def test_cnn_pool_variants(pool, mult):
    model = vitops.create_model("resnet18", global_pool=pool, num_classes=0).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
    expected = {"avg": feats.mean((2, 3)), "max": feats.amax((2, 3)),
                "avgmax": 0.5 * (feats.mean((2, 3)) + feats.amax((2, 3))),
                "catavgmax": torch.cat([feats.mean((2, 3)), feats.amax((2, 3))], 1)}[pool]
    torch.testing.assert_close(out, expected)
    model.reset_classifier(3)
    assert model.fc.in_features == 512 * mult
    unpooled = vitops.create_model("resnet18", global_pool="", num_classes=0).eval()
    with torch.no_grad():
        assert unpooled(x).shape == (2, 512, 2, 2)
    with pytest.raises(ValueError, match="global_pool"):
        vitops.create_model("resnet18", global_pool="median")


@pytest.mark.parametrize("pool", ["token", "avg", ""])
def test_vit_pool_variants(pool):
    model = vitops.create_model("vit_tiny_patch16_224", depth=1, img_size=32, global_pool=pool, num_classes=0)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
    if pool == "":
        assert out.shape == (2, 5, 192)
    else:
        assert out.shape == (2, 192)
    assert isinstance(model.fc_norm, torch.nn.LayerNorm) == (pool == "avg")


def test_vit_no_weight_decay_and_distilled_training():
    model = vitops.create_model("deit_tiny_distilled_patch16_224", depth=1, img_size=32)
    assert model.no_weight_decay() == {"pos_embed", "cls_token", "dist_token", "reg_token"}  # as timm's
    head, head_dist = model.get_classifier()
    x = torch.randn(2, 3, 32, 32)
    model.train()
    assert isinstance(model(x), torch.Tensor)
    model.set_distilled_training(True)
    out, out_dist = model(x)
    assert out.shape == out_dist.shape == (2, 1000)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        torch.testing.assert_close(model(x), (head(feats[:, 0]) + head_dist(feats[:, 1])) / 2)
    with pytest.raises(ValueError, match="token"):
        vitops.create_model("deit_tiny_distilled_patch16_224", depth=1, global_pool="avg")


@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_grad_checkpointing_gives_the_same_gradients(name):
    kwargs = SMALL[name]["kwargs"]
    model = vitops.create_model(name, num_classes=4, **kwargs)
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    assert model.grad_checkpointing
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], msg=n)


# --- in_chans, pretrained loading, checkpoint formats ---------------------------------------------------------


def test_adapt_input_conv():
    w = torch.randn(8, 3, 3, 3)
    torch.testing.assert_close(adapt_input_conv(1, w), w.sum(1, keepdim=True))
    five = adapt_input_conv(5, w)
    torch.testing.assert_close(five, torch.cat([w, w[:, :2]], 1) * 0.6)
    assert adapt_input_conv(3, w) is w


@pytest.mark.parametrize("name,in_chans", [
    pytest.param("resnet50d", 1, marks=pytest.mark.slow),  # the deep stem's first conv, conv1.0
    ("resnet18", 4),
    ("vit_tiny_patch16_224", 2),
])
def test_pretrained_in_chans_matches_timm(tmp_path, name, in_chans):
    kwargs = dict(depth=1) if "vit" in name else {}
    path = str(tmp_path / "w.pth")
    torch.save(timm.create_model(name, **kwargs).state_dict(), path)
    overlay = dict(file=path)
    reference = timm.create_model(name, pretrained=True, in_chans=in_chans, pretrained_cfg_overlay=overlay,
                                  **kwargs).eval()
    model = vitops.create_model(name, pretrained=True, in_chans=in_chans, pretrained_cfg_overlay=overlay,
                                **kwargs).eval()
    x = torch.randn(2, in_chans, 224 if "vit" in name else 64, 224 if "vit" in name else 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    assert model.pretrained_cfg["input_size"][0] == in_chans


def test_pos_embed_resampled_as_timm(tmp_path):
    path = str(tmp_path / "deit.pth")
    torch.save(timm.create_model("deit_tiny_distilled_patch16_224", depth=1).state_dict(), path)
    overlay = dict(file=path)
    kwargs = dict(depth=1, img_size=96, pretrained=True, pretrained_cfg_overlay=overlay)
    reference = timm.create_model("deit_tiny_distilled_patch16_224", **kwargs).eval()
    model = vitops.create_model("deit_tiny_distilled_patch16_224", **kwargs).eval()
    assert model.pos_embed.shape == (1, 2 + 36, 192)
    torch.testing.assert_close(model.pos_embed, reference.pos_embed)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x))
    # the prefix (class, distillation) tokens' embeddings are kept as they are
    original = torch.load(path)["pos_embed"]
    torch.testing.assert_close(model.pos_embed[:, :2], original[:, :2])


def test_resample_abs_pos_embed_identity_and_shape():
    pos = torch.randn(1, 1 + 16, 8)
    assert resample_abs_pos_embed(pos, (4, 4)) is pos
    assert resample_abs_pos_embed(pos, (6, 2)).shape == (1, 13, 8)


def _state_dict_for(name, **kwargs):
    return vitops.create_model(name, **kwargs).state_dict()


@pytest.mark.parametrize("fmt", ["bare", "model", "state_dict", "ema", "module_prefix", "orig_mod_prefix",
                                 "safetensors"])
def test_checkpoint_formats(tmp_path, fmt):
    kwargs = dict(depth=1, img_size=32)
    sd = _state_dict_for("vit_tiny_patch16_224", **kwargs)
    decoy = {k: torch.zeros_like(v) for k, v in sd.items()}
    path = str(tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pth"))
    if fmt == "safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        obj = {
            "bare": sd,
            "model": {"model": sd, "epoch": 3},
            "state_dict": {"state_dict": sd, "optimizer": {}},
            "ema": {"state_dict": decoy, "state_dict_ema": sd},
            "module_prefix": {"state_dict": {"module." + k: v for k, v in sd.items()}},
            "orig_mod_prefix": {"model": {"_orig_mod." + k: v for k, v in sd.items()}},
        }[fmt]
        torch.save(obj, path)
    model = vitops.create_model("vit_tiny_patch16_224", checkpoint_path=path, **kwargs)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, sd[k], msg=k)


def test_pretrained_from_vitops_home(tmp_path, monkeypatch):
    monkeypatch.setenv("VITOPS_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as info:
        vitops.create_model("resnet18", pretrained=True)
    message = str(info.value)
    assert "resnet18_a1_0-d63eafa0.pth" in message and str(tmp_path / "checkpoints") in message
    os.makedirs(tmp_path / "checkpoints")
    sd = timm.create_model("resnet18").state_dict()
    torch.save(sd, tmp_path / "checkpoints" / "resnet18.pth")
    model = vitops.create_model("resnet18", pretrained=True)
    torch.testing.assert_close(model.fc.weight, sd["fc.weight"])
    # another class count: everything but the classifier is loaded
    model = vitops.create_model("resnet18", pretrained=True, num_classes=7)
    assert model.fc.weight.shape == (7, 512)
    torch.testing.assert_close(model.conv1.weight, sd["conv1.weight"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vitops.create_model("resnet18", checkpoint_path=str(tmp_path / "missing.pth"))


def test_state_dict_round_trip(tmp_path):
    model = vitops.create_model("resnet18", num_classes=3).eval()
    path = str(tmp_path / "r.pth")
    torch.save(model.state_dict(), path)
    loaded = vitops.create_model("resnet18", num_classes=3, checkpoint_path=path).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def _damaged_checkpoint(tmp_path, damage: str) -> str:
    """A checkpoint file for a resnet18 with 10 classes that can't be loaded into one: corrupted bytes, a cut
    file (torch.save or safetensors), or the weights of another architecture or size."""
    good = vitops.create_model("resnet18", num_classes=10).state_dict()
    path = str(tmp_path / ("w.safetensors" if "safetensors" in damage else "w.pth"))
    if damage == "corrupted":
        with open(path, "wb") as f:
            f.write(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    elif damage == "truncated":
        torch.save(good, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    elif damage == "truncated_safetensors":
        safetensors_torch = pytest.importorskip("safetensors.torch")
        safetensors_torch.save_file(good, path)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) - 1000)
    elif damage == "other_architecture":  # resnet34: resnet18's keys plus more, most with the same shapes
        torch.save(vitops.create_model("resnet34", num_classes=10).state_dict(), path)
    elif damage == "other_size":  # same keys, one layer narrower: every other tensor would load
        torch.save(dict(good, **{"layer4.1.conv2.weight": good["layer4.1.conv2.weight"][:256]}), path)
    elif damage == "other_in_chans":  # a first conv of 4 input channels, which can't be adapted to 3
        torch.save(dict(good, **{"conv1.weight": torch.randn(64, 4, 7, 7)}), path)
    elif damage == "pickled_objects":  # not loaded unless asked for: unpickling can run code
        torch.save({"state_dict": good, "config": fractions.Fraction(1, 3)}, path)
    return path


@pytest.mark.parametrize("damage,problem", [
    ("corrupted", "not a readable torch.save file"),
    ("truncated", "truncated or corrupted"),
    ("truncated_safetensors", "not a readable safetensors file"),
    ("other_architecture", "does not fit ResNet .*unexpected keys .*layer1.2"),
    ("other_size", r"does not fit ResNet .*layer4.1.conv2.weight \(256, 512, 3, 3\) \(the model's is \(512, 512,"),
    ("other_in_chans", r"does not fit ResNet .*conv1.weight \(64, 4, 7, 7\)"),
    ("pickled_objects", "pickled objects other than tensors .*weights_only=False"),
])
def test_bad_checkpoint_names_the_file_and_loads_nothing(tmp_path, damage, problem):
    path = _damaged_checkpoint(tmp_path, damage)
    model = vitops.create_model("resnet18", num_classes=10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises((ValueError, RuntimeError), match=f"{re.escape(path)}.*{problem}|{problem}.*{re.escape(path)}"):
        vitops.models.load_checkpoint(model, path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # never half-loaded
    with pytest.raises((ValueError, RuntimeError), match=re.escape(path)):
        vitops.create_model("resnet18", num_classes=10, pretrained=True, checkpoint_path=path)


def test_trusted_pickled_checkpoint_loads_when_asked(tmp_path):
    path = _damaged_checkpoint(tmp_path, "pickled_objects")
    model = vitops.create_model("resnet18", num_classes=10)
    vitops.models.load_checkpoint(model, path, weights_only=False)
    torch.save({"state_dict": model.state_dict(), "args": argparse.Namespace(lr=0.1)}, path)  # timm's train.py
    vitops.models.load_checkpoint(model, path)


# --- features --------------------------------------------------------------------------------------------------


def test_features_model_pickles(tmp_path):
    model = vitops.create_model("resnet18", features_only=True, out_indices=(2, 4)).eval()
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(loaded(x), model(x)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name,out_indices", [("resnet18", (0, 5)), ("vit_tiny_patch16_224", (12,)),
                                              ("repvgg_a0", (-6,))])
def test_out_indices_out_of_range(name, out_indices):
    with pytest.raises(IndexError, match="out of range"):
        vitops.create_model(name, features_only=True, out_indices=out_indices)


# --- bad inputs --------------------------------------------------------------------------------------------------


def test_wrong_input_channels_and_size_are_clear_errors():
    resnet = vitops.create_model("resnet18")
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        resnet(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="4-d"):
        resnet(torch.randn(3, 32, 32))
    vit = vitops.create_model("vit_tiny_patch16_224", depth=1, img_size=32)
    with pytest.raises(ValueError, match="expected 32x32 images, got 48x48"):
        vit(torch.randn(1, 3, 48, 48))
    with pytest.raises(ValueError, match="multiple of patch_size"):
        vitops.create_model("vit_tiny_patch16_224", img_size=40)


# --- RepVGG ------------------------------------------------------------------------------------------------------


def test_repvgg_reparameterize_keeps_outputs():
    model = perturb_(vitops.create_model("repvgg_a0", num_classes=10))
    model.train()
    with torch.no_grad():
        for _ in range(2):  # non-trivial BN statistics
            model(torch.randn(4, 3, 32, 32))
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        model.reparameterize()
        out = model(x)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    deploy = vitops.create_model("repvgg_a0", num_classes=10, inference_mode=True).eval()
    deploy.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(deploy(x), out)


# --- losses ------------------------------------------------------------------------------------------------------


def test_distillation_loss_soft_hard_none():
    torch.manual_seed(0)
    teacher = torch.nn.Linear(6, 5)
    inputs, labels = torch.randn(4, 6), torch.randint(0, 5, (4,))
    s, s_kd = torch.randn(4, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    base = torch.nn.CrossEntropyLoss()
    t = teacher(inputs).detach()
    T, alpha = 2.0, 0.3
    soft = DistillationLoss(base, teacher, "soft", alpha, T)((inputs), (s, s_kd), labels)
    kd = F.kl_div(F.log_softmax(s_kd / T, 1), F.log_softmax(t / T, 1), reduction="sum", log_target=True) * T * T
    torch.testing.assert_close(soft, base(s, labels) * (1 - alpha) + kd / s_kd.numel() * alpha)
    hard = DistillationLoss(base, teacher, "hard", alpha, T)(inputs, (s, s_kd), labels)
    torch.testing.assert_close(hard, base(s, labels) * (1 - alpha) + F.cross_entropy(s_kd, t.argmax(1)) * alpha)
    none = DistillationLoss(base, None, "none", alpha, T)(inputs, s, labels)
    torch.testing.assert_close(none, base(s, labels))
    soft.backward()
    assert s.grad is not None and s_kd.grad is not None
    assert teacher.weight.grad is None
    with pytest.raises(ValueError, match="distillation_type"):
        DistillationLoss(base, teacher, "medium")
    with pytest.raises(ValueError, match="dist_logits"):
        DistillationLoss(base, teacher, "soft")(inputs, s, labels)


def test_distillation_loss_with_a_distilled_deit():
    student = vitops.create_model("deit_tiny_distilled_patch16_224", depth=1, img_size=32, num_classes=5)
    student.set_distilled_training(True)
    teacher = vitops.create_model("resnet18", num_classes=5).eval()
    criterion = DistillationLoss(SoftTargetCrossEntropy(), teacher, "hard", alpha=0.5, tau=1.0)
    x = torch.randn(2, 3, 32, 32)
    target = F.one_hot(torch.tensor([1, 3]), 5).float()
    loss = criterion(x, student(x), target)
    loss.backward()
    assert torch.isfinite(loss) and student.head_dist.weight.grad is not None


def test_label_smoothing_and_soft_target_ce_match_timm():
    from timm.loss import LabelSmoothingCrossEntropy as TimmLS
    from timm.loss import SoftTargetCrossEntropy as TimmST

    x, y = torch.randn(6, 10), torch.randint(0, 10, (6,))
    torch.testing.assert_close(LabelSmoothingCrossEntropy(0.1)(x, y), TimmLS(0.1)(x, y))
    soft = torch.softmax(torch.randn(6, 10), 1)
    torch.testing.assert_close(SoftTargetCrossEntropy()(x, soft), TimmST()(x, soft))
    torch.testing.assert_close(LabelSmoothingCrossEntropy(0.0)(x, y), F.cross_entropy(x, y))


# --- export / compile ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("exportable", [False, True])
@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_models_torch_export(name, exportable):
    """Default-built models export with vitops' ops in the graph (their fake kernels trace them); exportable=True
    builds plain layers, so the exported graph holds stock ATen ops only."""
    spec = SMALL[name]
    model = vitops.create_model(name, exportable=exportable, drop_path_rate=0.1, **spec["kwargs"]).eval()
    x = torch.randn(1, 3, spec["size"], spec["size"])
    exported = torch.export.export(model, (x,))
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("vitops." in t for t in targets) == (not exportable and "vit" in name)
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), model(x))


@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="onnx not installed")
@pytest.mark.parametrize("name", ["resnet18", "vit_tiny_patch16_224"])
def test_exportable_onnx(tmp_path, name):
    import onnx

    spec = SMALL[name]
    model = vitops.create_model(name, exportable=True, **spec["kwargs"]).eval()
    path = str(tmp_path / "m.onnx")
    x = torch.randn(1, 3, spec["size"], spec["size"])
    torch.onnx.export(model, (x,), path, dynamo=importlib.util.find_spec("onnxscript") is not None)
    onnx.checker.check_model(onnx.load(path))
    if importlib.util.find_spec("onnxruntime") is not None:
        import onnxruntime

        session = onnxruntime.InferenceSession(path)
        (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name,kwargs", [
    ("vit_tiny_patch16_224", dict(depth=2, img_size=32)),
    pytest.param("resnet18", {}, marks=pytest.mark.slow),
])
def test_compile_fullgraph_forward_backward(name, kwargs):
    """fullgraph=True: the fused ops trace without graph breaks, forward and backward (aot_eager keeps it quick
    on the CPU; the GPU benchmark compiles with inductor)."""
    model = vitops.create_model(name, drop_path_rate=0.1, num_classes=4, **kwargs)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 32, 32)
    torch.manual_seed(3)
    out = compiled(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    torch.manual_seed(3)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)


# --- built from vitops layers ----------------------------------------------------------------------------------


def test_residuals_go_through_drop_path_add(monkeypatch):
    import vitops.layers.drop_path as drop_path_module

    calls = []
    original = drop_path_module.drop_path_add

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(drop_path_module, "drop_path_add", counting)
    vit = vitops.create_model("vit_tiny_patch16_224", depth=3, img_size=32).eval()
    with torch.no_grad():
        vit(torch.randn(1, 3, 32, 32))
    assert len(calls) == 6  # two residuals per block
    calls.clear()
    resnet = vitops.create_model("resnet18").eval()
    with torch.no_grad():
        resnet(torch.randn(1, 3, 32, 32))
    assert len(calls) == 8  # one per block


def test_distilled_features_only():
    model = vitops.create_model("deit_tiny_distilled_patch16_224", depth=2, img_size=32, features_only=True,
                                out_indices=(0, 1)).eval()
    with torch.no_grad():
        outs = model(torch.randn(2, 3, 32, 32))
    assert [o.shape for o in outs] == [(2, 192, 2, 2)] * 2


@pytest.mark.parametrize("name", ["vit_tiny_patch16_224", "resnet18"])
def test_bf16_autocast_forward_backward(name):
    kwargs = SMALL[name]["kwargs"]
    model = vitops.create_model(name, num_classes=5, drop_path_rate=0.1, **kwargs)
    x = torch.randn(2, 3, 64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_compile_fullgraph_inductor_vit_tiny():
    """The default inductor backend too (one small ViT, to keep CI quick): same outputs as eager."""
    model = vitops.create_model("vit_tiny_patch16_224", depth=1, img_size=32, num_classes=4).eval()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    out = compiled(x)
    out.sum().backward()
    torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-4)
    assert x.grad is not None and all(p.grad is not None for p in model.parameters())


def test_load_checkpoint_resamples_vit_pos_embed(tmp_path):
    path = str(tmp_path / "v.pth")
    torch.save({"model": _state_dict_for("vit_tiny_patch16_224", depth=1, img_size=64)}, path)
    model = vitops.create_model("vit_tiny_patch16_224", depth=1, img_size=32)
    vitops.models.load_checkpoint(model, path)
    assert model.pos_embed.shape == (1, 5, 192)


def test_vitops_reparameterize_folds_every_resnet_bn():
    model = perturb_(vitops.create_model("resnet50d", num_classes=10)).eval()
    x = torch.randn(2, 3, 32, 32)
    fused, report = vitops.reparameterize(model)
    assert report.pair_search == "fx" and report.conv_bn_pairs == report.bns_before == 55 and report.bns_after == 0
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)


def test_vitops_reparameterize_on_repvgg():
    model = perturb_(vitops.create_model("repvgg_a0", num_classes=10)).eval()
    x = torch.randn(2, 3, 64, 64)
    fused, _ = vitops.reparameterize(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
