"""Attention, a drop-in for timm.layers.Attention backed by vitops.ops.attention_packed."""
from typing import Optional, Type

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn
from torch.jit import Final

from vitops.layers.config import use_fused_ops
from vitops.ops import MAX_HEAD_DIM, attention, attention_packed

# Leaves of a torch.fx trace: their argument checks can't run on proxies.
torch.fx.wrap("attention")
torch.fx.wrap("attention_packed")


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection: timm's `Attention` with the same signature
    (positional order and defaults included), submodules (qkv, q_norm, k_norm, attn_drop, norm, gate, proj,
    proj_drop) and state_dict keys, so timm weights load as they are and give the same outputs.

    The attention core runs `vitops.ops.attention_packed` straight on the qkv Linear's output and hands its
    (B, N, H*D) result to proj: no reshape/permute copies. With qk_norm, q and k are normalized first and
    `vitops.ops.attention` reads them (and v, in place) as strided views.

    `F.scaled_dot_product_attention` runs instead, exactly as in timm's fused path, when:
      - the layer was built plain (`fused_attn` False: scriptable/exportable, see vitops.layers.config),
      - training with attn_drop > 0 (vitops kernels have no dropout),
      - an attn_mask or is_causal is given (vitops kernels take no mask).

    Difference from timm: a ValueError (not an AssertionError) for dim not divisible by num_heads, for qk_norm or
    scale_norm without norm_layer, and for a fused layer whose head_dim is over vitops' kernels' limit.
    """

    fused_attn: Final[bool]

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: Optional[int] = None,
        dim_out: Optional[int] = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        gated: bool = False,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: Optional[Type[nn.Module]] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        dim_out = dim_out or dim
        head_dim = attn_head_dim
        if head_dim is None:
            if dim % num_heads != 0:
                raise ValueError(f"vitops.layers.Attention: dim {dim} is not divisible by num_heads {num_heads}")
            head_dim = dim // num_heads
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("vitops.layers.Attention: norm_layer must be given with qk_norm or scale_norm")
        self.fused_attn = use_fused_ops()
        if self.fused_attn and head_dim > MAX_HEAD_DIM:
            raise ValueError(f"vitops.layers.Attention: head_dim {head_dim} is over the supported {MAX_HEAD_DIM}")
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.attn_dim = num_heads * head_dim
        self.scale = head_dim**-0.5

        self.qkv = nn.Linear(dim, self.attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)

    @classmethod
    def from_timm(cls, module: nn.Module) -> "Attention":
        """A fused vitops Attention that shares `module`'s submodules (and so its parameters) with it."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads = module.num_heads
        new.head_dim = getattr(module, "head_dim", module.qkv.out_features // (3 * module.num_heads))
        new.attn_dim = getattr(module, "attn_dim", new.num_heads * new.head_dim)
        new.scale = module.scale
        new.fused_attn = True
        if new.head_dim > MAX_HEAD_DIM:
            raise ValueError(f"vitops.layers.Attention: head_dim {new.head_dim} is over the supported {MAX_HEAD_DIM}")
        for name in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"):
            setattr(new, name, getattr(module, name, None if name == "gate" else nn.Identity()))
        new.train(module.training)
        return new

    def _sdpa(self, qkv: Tensor, attn_mask: Optional[Tensor], is_causal: bool) -> Tensor:
        b, n, _ = qkv.shape
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        # SDPA's default scale is head_dim ** -0.5 (self.scale): called exactly as timm calls it
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop.p if self.training else 0.0, is_causal=is_causal
        )
        return x.transpose(1, 2).reshape(b, n, self.attn_dim)

    def _fused(self, qkv: Tensor) -> Tensor:
        if isinstance(self.q_norm, nn.Identity) and isinstance(self.k_norm, nn.Identity):
            if torch.jit.is_scripting():
                return torch.ops.vitops.attention_packed(qkv, self.num_heads, self.scale)[0]
            return attention_packed(qkv, self.num_heads, scale=self.scale)
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = _last_dim_contiguous(self.q_norm(q)), _last_dim_contiguous(self.k_norm(k))
        if torch.jit.is_scripting():
            x = torch.ops.vitops.attention(q, k, v, self.scale)[0]
        else:
            x = attention(q, k, v, scale=self.scale)
        return x.transpose(1, 2).flatten(2)

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x)
        if not self.fused_attn or attn_mask is not None or is_causal or (self.training and self.attn_drop.p > 0):
            x = self._sdpa(qkv, attn_mask, is_causal)
        else:
            x = self._fused(qkv)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        x = self.proj(x)
        return self.proj_drop(x)
