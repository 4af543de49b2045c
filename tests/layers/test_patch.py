"""vitops.patch_model on timm models: what it replaces, and that a patched model still scripts."""
import pytest
import torch

import vitops

timm = pytest.importorskip("timm")

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


@pytest.mark.parametrize("scriptable", [False, True])
def test_patched_timm_model_scripts(scriptable):
    """A timm ViT (built plain or, under timm's set_scriptable, scriptable) patched with vitops' Attention and
    DropPath scripts; the scripted model runs vitops' fused ops and gives the eager model's outputs (the same
    drop-path masks for a seed in training)."""
    with timm.set_scriptable(scriptable):
        model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, drop_path_rate=0.1, init_values=0.1)
    model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    report = vitops.patch_model(model)
    assert report.counts() == {"Attention": 2, "DropPath": 2}  # block 0's drop rate is 0: timm's Identity
    scripted = torch.jit.script(model)
    graph = str(scripted.inlined_graph)
    assert "vitops::attention_packed" in graph and "vitops::drop_path_add" in graph
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-5)
    model.train()
    scripted.train()
    torch.manual_seed(2)
    eager = model(x)
    torch.manual_seed(2)
    torch.testing.assert_close(scripted(x), eager, rtol=1e-5, atol=1e-5)
