"""Drop-in layers with timm's names, arguments and state_dict keys."""
from vitops.layers.acblock import ACBlock
from vitops.layers.attention import Attention
from vitops.layers.config import set_layer_config
from vitops.layers.conv_norm_act import ConvNormAct
from vitops.layers.drop_path import DropPath
from vitops.layers.layer_scale import LayerScale, LayerScale2d
from vitops.layers.repvgg import RepVGGBlock

__all__ = [
    "ACBlock", "Attention", "ConvNormAct", "DropPath", "LayerScale", "LayerScale2d", "RepVGGBlock", "set_layer_config"
]
