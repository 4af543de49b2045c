"""vitops.layers are drop-ins for timm's: same arguments, repr and state_dict keys."""
import pytest
import torch

from vitops.layers import DropPath, LayerScale, LayerScale2d


def test_drop_path_repr_and_behaviour():
    layer = DropPath(0.25)
    assert repr(layer) == "DropPath(drop_prob=0.250)"
    x = torch.randn(4, 3)
    layer.eval()
    assert layer(x) is x
    layer.train()
    torch.manual_seed(0)
    out = layer(x)
    rows_kept = torch.isclose(out, x / 0.75).all(1)
    rows_dropped = (out == 0).all(1)
    assert torch.all(rows_kept | rows_dropped)


def test_drop_path_add_method_fuses_layer_scale():
    layer = DropPath(0.0)
    ls = LayerScale(6, init_values=0.5)
    x, b = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    torch.testing.assert_close(layer.add(x, b, ls.broadcast_gamma()), x + ls(b))
    ls2 = LayerScale2d(6, init_values=0.5)
    m, n = torch.randn(2, 6, 4, 4), torch.randn(2, 6, 4, 4)
    torch.testing.assert_close(layer.add(m, n, ls2.broadcast_gamma()), m + ls2(n))


def test_matches_timm():
    timm_layers = pytest.importorskip("timm.layers")
    assert repr(DropPath(0.1)) == repr(timm_layers.DropPath(0.1))
    ours, theirs = LayerScale(8, 1e-5), timm_layers.LayerScale(8, 1e-5)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 8)
    assert torch.equal(ours(x), theirs(x))
    ours2, theirs2 = LayerScale2d(8, 0.1), timm_layers.LayerScale2d(8, 0.1)
    x = torch.randn(2, 8, 3, 3)
    assert torch.equal(ours2(x), theirs2(x))
    timm_drop = timm_layers.DropPath(0.3)
    drop = DropPath(0.3)
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(a, timm_drop(x))
