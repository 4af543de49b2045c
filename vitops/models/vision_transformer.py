"""Vision Transformer (Dosovitskiy et al. 2020) with timm 1.0's module names, parameter shapes and forward: timm
checkpoints load strict=True and give the same outputs. Blocks use vitops' fused Attention and end
each residual in a fused `x + drop_path(ls(branch))` (vitops.ops.drop_path_add, LayerScale folded in)."""

from functools import partial
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.jit import Final

from vitops.layers import Attention, LayerScale
from vitops.models._builder import build_model_with_cfg, resample_abs_pos_embed
from vitops.models._common import check_input, make_drop_path
from vitops.models._features import forward_intermediates
from vitops.models._registry import pretrained_cfg, register_model, register_pretrained_cfgs

__all__ = ["VisionTransformer", "Block", "Attention", "checkpoint_filter_fn"]


class _SdpaAttention(nn.Module):
    """Multi-head self-attention with timm's submodule and parameter names (qkv, q_norm, k_norm, attn_drop, norm,
    proj, proj_drop), on F.scaled_dot_product_attention: the plain path for torch.jit.script and ONNX export."""

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[type] = None,
        **kwargs,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"vitops Attention: dim {dim} must be divisible by num_heads {num_heads}")
        norm_layer = norm_layer or nn.LayerNorm
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        x = self.norm(x)
        return self.proj_drop(self.proj(x))


def make_attention(plain: bool, **kwargs) -> nn.Module:
    """vitops' fused Attention, or the plain SDPA one for scriptable / exportable models."""
    return _SdpaAttention(**kwargs) if plain else Attention(**kwargs)


class Mlp(nn.Module):
    """timm's Mlp: fc1, act, drop1, norm, fc2, drop2."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop1(self.act(self.fc1(x)))
        return self.drop2(self.fc2(self.norm(x)))


class PatchEmbed(nn.Module):
    """Image to patch tokens: proj (Conv2d, kernel = stride = patch), norm (Identity); (B, H*W, C) out."""

    def __init__(self, img_size: Tuple[int, int], patch_size: int, in_chans: int, embed_dim: int, bias: bool = True):
        super().__init__()
        self.img_size = img_size
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size[0] // patch_size, img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.norm = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        return self.norm(x.flatten(2).transpose(1, 2))


class Block(nn.Module):
    """Pre-norm transformer block with timm's names: norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2."""

    plain: Final[bool]

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        init_values: Optional[float] = None,
        drop_path: float = 0.0,
        norm_layer=None,
        plain: bool = False,
    ):
        super().__init__()
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.plain = plain
        self.norm1 = norm_layer(dim)
        self.attn = make_attention(
            plain, dim=dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, attn_drop=attn_drop,
            proj_drop=proj_drop, norm_layer=norm_layer,
        )  # fmt: skip
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = make_drop_path(drop_path, plain)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = make_drop_path(drop_path, plain)

    @torch.jit.unused
    def _fused(self, x: Tensor) -> Tensor:
        gamma1 = self.ls1.gamma if isinstance(self.ls1, LayerScale) else None
        gamma2 = self.ls2.gamma if isinstance(self.ls2, LayerScale) else None
        x = self.drop_path1.add(x, self.attn(self.norm1(x)), gamma=gamma1)
        return self.drop_path2.add(x, self.mlp(self.norm2(x)), gamma=gamma2)

    def forward(self, x: Tensor) -> Tensor:
        if self.plain or torch.jit.is_scripting():
            x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x))))
            x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
            return x
        return self._fused(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """ViT with timm's names: patch_embed, cls_token, pos_embed, pos_drop, patch_drop, norm_pre, blocks, norm,
    fc_norm, head_drop, head.

    Args:
        img_size, patch_size, in_chans, num_classes, global_pool ('token', 'avg', ''), embed_dim, depth,
        num_heads, mlp_ratio, qkv_bias, qk_norm, init_values (LayerScale; None for none), class_token, drop_rate
        (head), pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate (linspace(0, rate, depth)),
        scriptable / exportable (plain PyTorch attention and residuals), fc_norm (None: when global_pool is avg),
        dynamic_img_size (take any image size that is a multiple of the patch size, resampling pos_embed per
        forward as timm does).
    """

    num_prefix_tokens: Final[int]
    global_pool: Final[str]
    dynamic_img_size: Final[bool]

    def __init__(
        self,
        img_size: Union[int, Tuple[int, int]] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: Optional[float] = None,
        class_token: bool = True,
        fc_norm: Optional[bool] = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        scriptable: bool = False,
        exportable: bool = False,
        num_extra_tokens: int = 0,
        dynamic_img_size: bool = False,
    ):
        super().__init__()
        if global_pool not in ("", "avg", "token", "max", "avgmax"):
            raise ValueError(f"vitops ViT: unknown global_pool {global_pool!r}; choose 'token', 'avg' or ''")
        if global_pool == "token" and not class_token:
            raise ValueError("vitops ViT: global_pool='token' needs class_token=True")
        if dynamic_img_size and scriptable:
            raise ValueError("vitops ViT: dynamic_img_size can't be scripted; use scriptable=False")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        for s in img_size:
            if s % patch_size:
                raise ValueError(f"vitops ViT: img_size {img_size} must be a multiple of patch_size {patch_size}")
        plain = bool(scriptable or exportable)
        norm_layer = partial(nn.LayerNorm, eps=1e-6)
        use_fc_norm = global_pool in ("avg", "avgmax", "max") if fc_norm is None else fc_norm
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = (1 if class_token else 0) + num_extra_tokens
        self.has_class_token = class_token
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self._init_extra_tokens(embed_dim)
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + self.num_prefix_tokens, embed_dim) * 0.02)
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        self.patch_drop = nn.Identity()
        self.norm_pre = nn.Identity()
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.Sequential(*[
            Block(
                dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, init_values=init_values, drop_path=dpr[i],
                norm_layer=norm_layer, plain=plain,
            )
            for i in range(depth)
        ])  # fmt: skip
        reduction = patch_size
        self._feature_levels = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = norm_layer(embed_dim) if not use_fc_norm else nn.Identity()
        self.fc_norm = norm_layer(embed_dim) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self._init_heads(num_classes)
        self.init_weights()

    # --- hooks for subclasses (DeiT distilled) -------------------------------------------------------------------

    def _init_extra_tokens(self, embed_dim: int) -> None:
        pass

    def _init_heads(self, num_classes: int) -> None:
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()

    def _prefix_tokens(self, x: Tensor) -> List[Tensor]:
        to_cat: List[Tensor] = []
        if self.cls_token is not None:
            to_cat.append(self.cls_token.expand(x.shape[0], -1, -1))
        return to_cat

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_weights)

    # --- model API ---------------------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"pos_embed", "cls_token", "dist_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("", "avg", "token", "max", "avgmax"):
                raise ValueError(f"vitops ViT: unknown global_pool {global_pool!r}; choose 'token', 'avg' or ''")
            self.global_pool = global_pool
        self._init_heads(num_classes)

    @torch.jit.ignore
    def feature_levels(self) -> List[dict]:
        return [dict(f) for f in self._feature_levels]

    @torch.jit.unused
    def _check_input(self, x: Tensor) -> None:
        if not self.dynamic_img_size:
            check_input(x, self.in_chans, type(self).__name__, fixed_size=self.patch_embed.img_size)
            return
        patch = self.patch_embed.patch_size[0]
        check_input(x, self.in_chans, type(self).__name__, min_size=patch)
        if isinstance(x, torch.Tensor) and (x.shape[2] % patch or x.shape[3] % patch):
            raise ValueError(
                f"vitops {type(self).__name__}: with dynamic_img_size the image sides must be multiples of the "
                f"patch size {patch}, got {x.shape[2]}x{x.shape[3]}"
            )

    def _grid(self, x: Tensor) -> Tuple[int, int]:
        """The patch grid of image batch x."""
        if not self.dynamic_img_size:
            return self.patch_embed.grid_size
        patch = self.patch_embed.patch_size[0]
        return x.shape[-2] // patch, x.shape[-1] // patch

    @torch.jit.unused
    def _resampled_pos_embed(self, grid: Tuple[int, int]) -> Tensor:
        return resample_abs_pos_embed(
            self.pos_embed, new_size=grid, old_size=self.patch_embed.grid_size, num_prefix_tokens=self.num_prefix_tokens
        )

    def _pos_embed(self, x: Tensor, grid: Tuple[int, int]) -> Tensor:
        pos_embed = self.pos_embed
        if self.dynamic_img_size and not torch.jit.is_scripting():
            pos_embed = self._resampled_pos_embed(grid)
        to_cat = self._prefix_tokens(x)
        if len(to_cat) > 0:
            x = torch.cat(to_cat + [x], dim=1)
        return self.pos_drop(x + pos_embed)

    def _embed(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            self._check_input(x)
        grid = self._grid(x)
        x = self.patch_embed(x)
        x = self._pos_embed(x, grid)
        return self.norm_pre(self.patch_drop(x))

    def forward_features(self, x: Tensor) -> Tensor:
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting() and torch.is_grad_enabled():
            for blk in self.blocks:
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)

    @torch.jit.ignore
    def forward_feature_maps(self, x: Tensor, indices: List[int]) -> List[Tensor]:
        """Outputs of the blocks at `indices` as (B, C, H/patch, W/patch) maps, prefix tokens removed."""
        return self._levels(x, indices, stop_early=True, norm=False)[0]

    @torch.jit.ignore
    def _levels(self, x: Tensor, indices: List[int], stop_early: bool, norm: bool):
        B = x.shape[0]
        H, W = self._grid(x)
        wanted = set(indices)
        last = max(indices) if stop_early else len(self.blocks) - 1
        outs = {}
        x = self._embed(x)
        for i, blk in enumerate(self.blocks):
            if i > last:
                break
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in wanted:
                y = self.norm(x) if norm else x
                outs[i] = y[:, self.num_prefix_tokens:].reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
        return [outs[i] for i in indices], x

    @torch.jit.ignore
    def forward_intermediates(self, x: Tensor, indices=None, norm: bool = False, stop_early: bool = False,
                              intermediates_only: bool = False):
        """timm's API: (final normed tokens, [NCHW block outputs at indices]) or, with intermediates_only, the
        list. indices: None for every block, n for the last n, or a sequence of block indices."""
        out = forward_intermediates(self, x, indices, stop_early, intermediates_only, norm=norm)
        return out if intermediates_only else (self.norm(out[0]), out[1])

    def pool(self, x: Tensor) -> Tensor:
        if self.global_pool == "":
            return x
        if self.global_pool == "token":
            return x[:, 0]
        x = x[:, self.num_prefix_tokens:]
        if self.global_pool == "avg":
            return x.mean(dim=1)
        if self.global_pool == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def checkpoint_filter_fn(state_dict: dict, model: VisionTransformer) -> dict:
    """Adapts a timm/vitops ViT checkpoint to `model`: pos_embed resampled (bicubic, antialiased, prefix tokens
    kept) to the model's patch grid, as timm does when img_size differs from the checkpoint's."""
    out = {}
    for k, v in state_dict.items():
        if k == "pos_embed" and v.shape != model.pos_embed.shape:
            v = resample_abs_pos_embed(
                v, new_size=model.patch_embed.grid_size, num_prefix_tokens=model.num_prefix_tokens,
                interpolation="bicubic", antialias=True,
            )  # fmt: skip
        out[k] = v
    return out


_cfg = partial(
    pretrained_cfg, crop_pct=0.9, fixed_input_size=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
    first_conv="patch_embed.proj", classifier="head",
)


_AUGREG = "https://storage.googleapis.com/vit_models/augreg/"
register_pretrained_cfgs({
    "vit_tiny_patch16_224.augreg_in21k_ft_in1k": _cfg(
        _AUGREG + "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz"),
    "vit_small_patch16_224.augreg_in21k_ft_in1k": _cfg(
        _AUGREG + "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz"),
    "vit_base_patch32_224.augreg2_in21k_ft_in1k": _cfg(),
    "vit_base_patch16_224.augreg2_in21k_ft_in1k": _cfg(),
    "vit_base_patch16_384.augreg_in21k_ft_in1k": _cfg(
        _AUGREG + "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz",
        input_size=(3, 384, 384), crop_pct=1.0),
    "vit_large_patch16_224.augreg_in21k_ft_in1k": _cfg(
        _AUGREG + "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz"),
})  # fmt: skip


def _create_vision_transformer(variant: str, pretrained: bool = False, model_cls=VisionTransformer, **kwargs):
    return build_model_with_cfg(
        model_cls, variant, pretrained, default_out_indices=min(3, kwargs.get("depth", 12)),
        pretrained_filter_fn=checkpoint_filter_fn, **kwargs,
    )


def _vit(variant: str, pretrained: bool, model_args: dict, kwargs: dict):
    return _create_vision_transformer(variant, pretrained, **dict(model_args, **kwargs))


@register_model
def vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit("vit_tiny_patch16_224", pretrained, dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), kwargs)


@register_model
def vit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit("vit_small_patch16_224", pretrained, dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), kwargs)


@register_model
def vit_base_patch32_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit("vit_base_patch32_224", pretrained, dict(patch_size=32, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model
def vit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _vit("vit_base_patch16_224", pretrained, dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), kwargs)


@register_model
def vit_base_patch16_384(pretrained: bool = False, **kwargs) -> VisionTransformer:
    args = dict(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _vit("vit_base_patch16_384", pretrained, args, kwargs)


@register_model
def vit_large_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    args = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)
    return _vit("vit_large_patch16_224", pretrained, args, kwargs)
