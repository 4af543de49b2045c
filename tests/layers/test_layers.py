"""vitops.layers are drop-ins for timm's: same arguments, repr and state_dict keys."""
import pytest
import torch

from vitops.layers import DropPath, LayerScale, LayerScale2d

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


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


# --- DropPath: fused and plain forms, TorchScript -------------------------------------------------------------


def _built(fused: bool, make):
    from vitops.layers import set_layer_config

    with set_layer_config(exportable=not fused):
        return make()


@pytest.mark.parametrize("fused", [True, False])
def test_drop_path_forms_agree_and_script(fused):
    """The fused (vitops op) and plain (stock PyTorch) DropPath draw the same masks for a seed and compute the same
    values, eager and scripted, with and without a LayerScale gamma (tokens and NCHW maps)."""
    layer = _built(fused, lambda: DropPath(0.4)).train()
    assert layer.fused == fused
    scripted = torch.jit.script(layer)
    x, branch = torch.randn(8, 5, 6), torch.randn(8, 5, 6)
    maps, map_branch = torch.randn(8, 6, 3, 3), torch.randn(8, 6, 3, 3)
    gamma, gamma2d = LayerScale(6, 0.5), LayerScale2d(6, 0.5)
    for module in (layer, scripted):
        torch.manual_seed(1)
        expected_keep = torch.empty(8).bernoulli_(0.6) / 0.6  # timm's draw
        torch.manual_seed(1)
        torch.testing.assert_close(module(x), x * expected_keep.view(-1, 1, 1))
        torch.manual_seed(1)
        torch.testing.assert_close(module.add(x, branch, gamma.broadcast_gamma()),
                                   x + gamma(branch) * expected_keep.view(-1, 1, 1))
        torch.manual_seed(1)
        torch.testing.assert_close(module.add(maps, map_branch, gamma2d.broadcast_gamma()),
                                   maps + gamma2d(map_branch) * expected_keep.view(-1, 1, 1, 1))
    graph = str(scripted.inlined_graph)
    assert ("vitops::drop_path_add" in graph) == fused
    layer.eval()
    scripted.eval()
    for module in (layer, scripted):
        torch.testing.assert_close(module.add(x, branch), x + branch)
        assert torch.equal(module(x), x)


# --- Attention: timm's signature and call patterns -------------------------------------------------------------


def _signature(cls, method="__init__"):
    import inspect

    return [(p.name, p.kind, p.default) for p in inspect.signature(getattr(cls, method)).parameters.values()]


def test_attention_signature_is_timms():
    timm_layers = pytest.importorskip("timm.layers")
    from vitops.layers import Attention

    assert _signature(Attention) == _signature(timm_layers.Attention)
    assert _signature(Attention, "forward") == _signature(timm_layers.Attention, "forward")


LN = torch.nn.LayerNorm
# The ways timm's own code and its users build an Attention: positional in timm's order, keywords, mixed.
ATTENTION_CALLS = [
    ((48,), {}),
    ((48, 4), {}),
    ((48, 4, None, None, True), {}),  # qkv_bias positionally
    ((48, 4, None, None, True, True), dict(norm_layer=LN)),  # qk_norm positionally
    ((48, 4, 16), {}),  # attn_head_dim
    ((48, 4, None, 32), {}),  # dim_out
    ((48, 4, None, None, False, False, True), dict(norm_layer=LN)),  # scale_norm
    ((48, 4, None, None, True, False, False, False), {}),  # proj_bias=False
    ((48, 4, None, None, True, False, False, True, True), {}),  # gated
    ((48, 3, None, None, True, True, True, True, False, 0.0, 0.0, LN), {}),  # every argument positionally
    ((48,), dict(num_heads=2, qkv_bias=True, qk_norm=True, norm_layer=LN, attn_drop=0.0, proj_drop=0.0)),
]


@pytest.mark.parametrize("args,kwargs", ATTENTION_CALLS)
def test_attention_takes_timms_calls(args, kwargs):
    timm_layers = pytest.importorskip("timm.layers")
    from vitops.layers import Attention

    torch.manual_seed(0)
    theirs = timm_layers.Attention(*args, **kwargs).eval()
    ours = Attention(*args, **kwargs).eval()
    shapes = [(k, v.shape) for k, v in ours.state_dict().items()]
    assert shapes == [(k, v.shape) for k, v in theirs.state_dict().items()]
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 7, 48)
    mask = torch.randn(7, 7)
    with torch.no_grad():
        for call in (lambda m: m(x), lambda m: m(x, mask), lambda m: m(x, attn_mask=mask),
                     lambda m: m(x, None, True), lambda m: m(x, is_causal=True)):
            torch.testing.assert_close(call(ours), call(theirs), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.jit.script(ours)(x), theirs(x), rtol=1e-5, atol=1e-5)
