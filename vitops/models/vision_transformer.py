"""Vision Transformer (Dosovitskiy et al. 2020) with timm 1.0's module names, parameter shapes and forward: timm
checkpoints load strict=True and give the same outputs. Blocks use vitops' fused Attention and end
each residual in a fused `x + drop_path(ls(branch))` (vitops.ops.drop_path_add, LayerScale folded in)."""

from functools import partial
from typing import Any, Dict, List, Optional, Set, Tuple, Union

import torch
from torch import Tensor, nn
from torch.jit import Final

from vitops.layers import Attention, DropPath, LayerScale
from vitops.models._builder import build_model_with_cfg, resample_abs_pos_embed
from vitops.models._common import check_input, run_blocks
from vitops.models._features import feature_take_indices
from vitops.models._registry import pretrained_cfg, register_model, register_pretrained_cfgs

__all__ = ["VisionTransformer", "Block", "Attention", "checkpoint_filter_fn"]


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
    """Pre-norm transformer block with timm's names: norm1, attn, ls1, drop_path1, norm2, mlp, ls2, drop_path2.
    Each residual ends in DropPath.add: `x + drop_path(ls(branch))` fused into one op, LayerScale folded in."""

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
    ):
        super().__init__()
        norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm_layer(dim)
        self.attn = Attention(
            dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, attn_drop=attn_drop, proj_drop=proj_drop,
            norm_layer=norm_layer,
        )  # fmt: skip
        self.ls1 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.ls2 = LayerScale(dim, init_values=init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        gamma1: Optional[Tensor] = None
        gamma2: Optional[Tensor] = None
        if hasattr(self.ls1, "gamma"):  # a LayerScale (hasattr is what TorchScript resolves when ls is Identity)
            gamma1 = self.ls1.broadcast_gamma()
        if hasattr(self.ls2, "gamma"):
            gamma2 = self.ls2.broadcast_gamma()
        x = self.drop_path1.add(x, self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal), gamma1)
        return self.drop_path2.add(x, self.mlp(self.norm2(x)), gamma2)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class VisionTransformer(nn.Module):
    """ViT with timm's names: patch_embed, cls_token, pos_embed, pos_drop, patch_drop, norm_pre, blocks, norm,
    fc_norm, head_drop, head.

    Args:
        img_size, patch_size, in_chans, num_classes, global_pool ('token', 'avg', 'max', 'avgmax', ''), embed_dim,
        depth, num_heads, mlp_ratio, qkv_bias, qk_norm, init_values (LayerScale; None for none), class_token,
        drop_rate (head), pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate (linspace(0, rate,
        depth)), fc_norm (None: when global_pool is avg), dynamic_img_size (take any image size that is a multiple
        of the patch size, resampling pos_embed per forward as timm does).
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
        num_extra_tokens: int = 0,
        dynamic_img_size: bool = False,
    ):
        super().__init__()
        _check_global_pool(global_pool)
        if global_pool == "token" and not class_token:
            raise ValueError("vitops ViT: global_pool='token' needs class_token=True")
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        for s in img_size:
            if s % patch_size:
                raise ValueError(f"vitops ViT: img_size {img_size} must be a multiple of patch_size {patch_size}")
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
        self.pos_embed = nn.Parameter(torch.randn(1, num_patches + self.num_prefix_tokens, embed_dim) * 0.02)
        self._init_extra_tokens(embed_dim)  # after pos_embed: timm's parameter order
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        self.patch_drop = nn.Identity()
        self.norm_pre = nn.Identity()
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]
        self.blocks = nn.Sequential(*[
            Block(
                dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm,
                proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, init_values=init_values, drop_path=dpr[i],
                norm_layer=norm_layer,
            )
            for i in range(depth)
        ])  # fmt: skip
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)]
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
    def no_weight_decay(self) -> Set[str]:
        return {"pos_embed", "cls_token", "dist_token", "reg_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """Parameter groups for layer-wise lr decay (timm's optimizer factory): the embedding, then each block."""
        return dict(
            stem=r"^cls_token|reg_token|pos_embed|patch_embed|norm_pre",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            _check_global_pool(global_pool)
            self.global_pool = global_pool
        self._init_heads(num_classes)

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

    def _pos_embed(self, x: Tensor, grid: Tuple[int, int]) -> Tensor:
        to_cat = self._prefix_tokens(x)  # read before pos_embed, as timm does (fx graphs list them alike)
        pos_embed = self.pos_embed
        if self.dynamic_img_size:
            old = self.patch_embed.grid_size
            pos_embed = resample_abs_pos_embed(
                pos_embed, [grid[0], grid[1]], [old[0], old[1]], num_prefix_tokens=self.num_prefix_tokens
            )
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

    def forward_features(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        x = self._embed(x)
        if attn_mask is not None or is_causal:
            for blk in self.blocks:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
        elif self.grad_checkpointing and not torch.jit.is_scripting():
            x = run_blocks(self.blocks, x, checkpointing=True)
        else:
            x = self.blocks(x)
        return self.norm(x)

    @torch.jit.ignore
    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        output_dict: bool = False,
        attn_mask: Optional[Tensor] = None,
        is_causal: bool = False,
    ):
        """timm's API: (final normed tokens, [block outputs at indices]), or with intermediates_only the list, or
        with output_dict {'image_features', 'image_intermediates'[, 'image_intermediates_prefix']}.

        Args:
            indices: None for every block, n for the last n, or a sequence of block indices.
            return_prefix_tokens: pair each intermediate with its prefix (class, distillation) tokens.
            norm: apply the final norm to the intermediates. stop_early: don't run the blocks after the last one
            taken. output_fmt: 'NCHW' maps or 'NLC' tokens (prefix tokens removed either way).
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"vitops ViT: output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B = x.shape[0]
        H, W = self._grid(x)
        x = self._embed(x)
        intermediates = []
        for i, blk in enumerate(self.blocks[: max_index + 1] if stop_early else self.blocks):
            if attn_mask is not None or is_causal:
                x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
            elif self.grad_checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix_tokens = [y[:, : self.num_prefix_tokens] for y in intermediates] if self.num_prefix_tokens else None
        intermediates = [y[:, self.num_prefix_tokens :] for y in intermediates]
        if output_fmt == "NCHW":
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if output_dict:
            out = {"image_intermediates": intermediates}
            if prefix_tokens is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix_tokens
            if not intermediates_only:
                out["image_features"] = self.norm(x)
            return out
        if return_prefix_tokens and prefix_tokens is not None:
            intermediates = list(zip(intermediates, prefix_tokens))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    @torch.jit.ignore
    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        """Drops the blocks after the last of `indices` (and the final norm, the head) for feature extraction;
        returns the indices, counted from 0."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.fc_norm = nn.Identity()
            self.reset_classifier(0, "")
        return take_indices

    def pool(self, x: Tensor, pool_type: Optional[str] = None) -> Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "":
            return x
        if pool_type == "token":
            return x[:, 0]
        x = x[:, self.num_prefix_tokens :]
        if pool_type == "avg":
            return x.mean(dim=1)
        if pool_type == "max":
            return x.amax(dim=1)
        return 0.5 * (x.amax(dim=1) + x.mean(dim=1))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


_GLOBAL_POOLS = ("", "avg", "token", "max", "avgmax")


def _check_global_pool(global_pool: str) -> None:
    if global_pool not in _GLOBAL_POOLS:
        raise ValueError(f"vitops ViT: unknown global_pool {global_pool!r}; choose one of {_GLOBAL_POOLS}")


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
    "vit_base_patch32_224.augreg_in21k_ft_in1k": _cfg(
        _AUGREG + "B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz"),
    "vit_base_patch16_224.augreg2_in21k_ft_in1k": _cfg(),
    "vit_base_patch16_384.augreg_in21k_ft_in1k": _cfg(
        _AUGREG + "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz",
        input_size=(3, 384, 384), crop_pct=1.0),
    "vit_large_patch16_224.augreg_in21k_ft_in1k": _cfg(
        _AUGREG + "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz"),
})  # fmt: skip


def _create_vision_transformer(variant: str, pretrained: bool = False, model_cls=VisionTransformer, **kwargs):
    # timm's default: the last 3 blocks, through forward_intermediates ('getter'); fewer for shallower models
    feature_cfg = dict(out_indices=min(3, kwargs.get("depth", 12)), feature_cls="getter")
    return build_model_with_cfg(
        model_cls, variant, pretrained, feature_cfg=feature_cfg, pretrained_filter_fn=checkpoint_filter_fn, **kwargs
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
