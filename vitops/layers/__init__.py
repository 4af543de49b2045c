"""Drop-in layers with timm's names, arguments and state_dict keys."""
from vitops.layers.attention import Attention
from vitops.layers.drop_path import DropPath
from vitops.layers.layer_scale import LayerScale, LayerScale2d

__all__ = ["Attention", "DropPath", "LayerScale", "LayerScale2d"]
