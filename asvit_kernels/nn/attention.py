"""timm-compatible multi-head self-attention on the fused varlen kernels.

Parameter names follow timm's ``Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``proj``), so a timm
ViT's state dict loads unchanged; ``patch_timm`` swaps the blocks of a built model in place.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops import varlen_attention


class Attention(nn.Module):
    """Self-attention over ``(B, N, C)`` or packed ``(total, C)`` tokens (``cu_seqlens`` given).

    ``attn_dim`` is the width of each of q, k and v (default ``dim``, timm's layout); a narrower or
    wider one gives ``qkv: dim -> 3 * attn_dim`` and ``proj: attn_dim -> dim`` (ViTAS sub-networks).
    The projections see the tokens with the batch as the leading dim, as ``ntk``'s fast path needs.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, norm_layer: type = nn.LayerNorm, *,
                 attn_dim: Optional[int] = None, backend: Optional[str] = None):
        super().__init__()
        attn_dim = dim if attn_dim is None else attn_dim
        if isinstance(attn_dim, bool) or not isinstance(attn_dim, int) or attn_dim < 1:
            raise ValueError(f"attn_dim must be a positive int, got {attn_dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        if attn_dim % num_heads:
            raise ValueError(f"attention width ({attn_dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.head_dim, self.backend = num_heads, attn_dim // num_heads, backend
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = nn.Identity()  # timm's scale_norm slot; patch_timm carries it over
        self.proj = nn.Linear(attn_dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                max_seqlen: Optional[int] = None, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attn_mask is not None:
            raise NotImplementedError("attn_mask is not supported; pass packed tokens with cu_seqlens instead")
        packed = cu_seqlens is not None
        if packed and x.dim() != 2:
            raise ValueError(f"with cu_seqlens, x must be packed (total, C), got shape {tuple(x.shape)}")
        if not packed and x.dim() != 3:
            raise ValueError(f"x must be (B, N, C) (or packed (total, C) with cu_seqlens), got {tuple(x.shape)}")
        lead = x.shape[:-1]
        if not packed:  # B equal-length sequences: uniform offsets, no host sync
            B, N = lead
            cu_seqlens = torch.arange(0, (B + 1) * N, N, device=x.device, dtype=torch.int32)
            max_seqlen = N
        total = lead.numel()
        q, k, v = self.qkv(x).reshape(total, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = self.q_norm(q), self.k_norm(k)
        p = self.attn_drop.p if self.training else 0.0
        o = varlen_attention(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, p, self.scale,
                             backend=self.backend)
        return self.proj_drop(self.proj(self.norm(o.reshape(*lead, -1))))


def _is_timm_attention(m: nn.Module) -> bool:
    """timm's Attention by its layout (timm itself may not be importable here)."""
    return (type(m).__name__ == "Attention" and not isinstance(m, Attention)
            and isinstance(getattr(m, "qkv", None), nn.Linear) and isinstance(getattr(m, "proj", None), nn.Linear)
            and isinstance(getattr(m, "num_heads", None), int))


def patch_timm(model: nn.Module, backend: Optional[str] = None) -> int:
    """Replace every timm ``Attention`` in ``model`` in place with ``asvit_kernels.nn.Attention``,
    reusing its submodules (same parameters, no copies). Returns how many were replaced."""
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not _is_timm_attention(child):
                continue
            new = Attention(child.qkv.in_features, child.num_heads, attn_dim=child.qkv.out_features // 3, backend=backend)
            for attr in ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"):
                if hasattr(child, attr):
                    setattr(new, attr, getattr(child, attr))
            new.scale = getattr(child, "scale", new.scale)
            new.train(child.training)
            setattr(parent, name, new)
            replaced += 1
    return replaced
