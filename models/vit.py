"""Plain ViT / DeiT in timm's ``VisionTransformer`` layout, on ``asvit_kernels.nn.Attention``.

Parameter names match timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.norm1``,
``.attn.qkv``, ``.attn.proj``, ``.norm2``, ``.mlp.fc1``, ``.mlp.fc2``, ``norm``, ``head``; with the
options ``reg_token``, ``dist_token``/``head_dist``, ``ls1``/``ls2.gamma``, ``attn.q_norm``/``k_norm``,
``norm_pre``, ``fc_norm``), so a timm ``VisionTransformer`` state dict loads with ``strict=True``.
``ViT.from_timm(model)`` reads the whole config from a timm model (activation included, which no
state dict records) and refuses, naming it, anything it does not implement; the README gives the
measured count of timm's vit_*/deit_* architectures it builds.

Beyond timm's layout:
  - per-layer widths (``num_heads``, ``attn_dims``, ``mlp_dims`` as lists), so a ViTAS sub-network
    extracted from the supernet is a standalone ViT;
  - any input size divisible by the patch (position embeddings resampled bicubically per call);
  - ``forward_packed``: images of different sizes in one packed token sequence, one varlen attention
    launch per layer, no padding.
"""
from __future__ import annotations

import functools
import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from asvit_kernels import backends
from asvit_kernels.nn import Attention
from asvit_kernels.ops.packing import cu_seqlens_from_lengths

__all__ = ["ViT", "PatchEmbed", "Mlp", "Block", "DropPath", "LayerScale", "ACTIVATIONS", "resample_pos_embed"]

Tensor = torch.Tensor
Size2 = Union[int, Sequence[int]]
GLOBAL_POOLS = ("token", "avg", "max", "avgmax")


# ----------------------------------------------------------------------------- argument checks


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _pos_int(v, name: str, minimum: int = 1) -> int:
    if not _is_int(v) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def _pair(v: Size2, name: str) -> tuple[int, int]:
    """An int or a pair of ints -> (h, w), each positive."""
    if _is_int(v):
        v = (v, v)
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or len(v) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}")
    return _pos_int(v[0], f"{name}[0]"), _pos_int(v[1], f"{name}[1]")


def _per_layer(v, depth: int, name: str, default: Optional[int]) -> list[int]:
    """None -> ``default`` every layer; an int -> that every layer; a list -> depth positive ints."""
    if v is None and default is not None:
        return [default] * depth
    if _is_int(v):
        return [_pos_int(v, name)] * depth
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise ValueError(f"{name} must be {'None, ' if default is not None else ''}an int or a list of "
                         f"depth ({depth}) ints, got {v!r}")
    if len(v) != depth:
        raise ValueError(f"{name} must have one entry per layer (depth={depth}), got {len(v)}")
    return [_pos_int(x, f"{name}[{i}]") for i, x in enumerate(v)]


# ----------------------------------------------------------------------------- layers


class _Packing(NamedTuple):
    """How packed tokens ``(total, D)`` split into samples."""
    cu_seqlens: Tensor      # int32 (n + 1,)
    max_seqlen: int
    sample_of_token: Tensor  # long (total,)
    num_samples: int


def init_linear_and_norm(m: nn.Module) -> None:
    """timm's ViT init of one module: Linear trunc_normal(std .02), bias 0; LayerNorm 1 / 0."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def drop_path_rates(rate: float, n: int) -> list[float]:
    """Stochastic depth per block, timm's linear rule: block i of n gets ``rate * i / (n - 1)``."""
    return [float(rate) * i / max(1, n - 1) for i in range(n)]


class DropPathRate:
    """``model.drop_path_rate`` (read, or assign to call ``set_drop_path``) for models that keep
    their rate in ``_drop_path_rate``."""

    @property
    def drop_path_rate(self) -> float:
        return self._drop_path_rate

    @drop_path_rate.setter
    def drop_path_rate(self, rate: float) -> None:
        self.set_drop_path(rate)


class DropPath(nn.Module):
    """Stochastic depth: zero a residual branch per sample with probability ``drop_prob`` (training
    only), scaling kept ones by 1 / (1 - drop_prob). Packed input draws one decision per sample."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: Tensor, packing: Optional[_Packing] = None) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        n = x.shape[0] if packing is None else packing.num_samples
        mask = x.new_empty(n).bernoulli_(keep)
        if keep > 0.0:
            mask = mask / keep
        if packing is not None:  # every token of a sample shares its sample's decision
            mask = mask[packing.sample_of_token]
        return x * mask.reshape(-1, *([1] * (x.dim() - 1)))

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:g}"


class PatchEmbed(nn.Module):
    """Non-overlapping patches -> tokens: ``(B, C, H, W)`` -> ``(B, (H/ph) * (W/pw), D)``.

    ``img_size``, ``grid_size`` and ``num_patches`` describe the size the position embedding was
    built for; other sizes divisible by the patch are accepted (the caller checks divisibility)."""

    def __init__(self, img_size: tuple[int, int], patch_size: tuple[int, int], in_chans: int, embed_dim: int,
                 bias: bool = True):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: OpenAI CLIP's activation (timm's ``quick_gelu``)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


# The MLP activations of timm ViTs, by the name ``act_layer`` takes. The name is part of the model's
# config because a state dict cannot tell them apart (SigLIP's tanh GELU loads into an exact one).
ACTIVATIONS = {"gelu": lambda: nn.GELU(), "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
               "quick_gelu": QuickGELU, "silu": nn.SiLU, "relu": nn.ReLU}


def make_activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"act_layer must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]()


class Mlp(nn.Module):
    """``fc1 (D -> hidden) -> act -> fc2 (hidden -> D)``, timm's names; ``act`` a name of ``ACTIVATIONS``."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` (CaiT / DeiT-3 / DINOv2; timm's ``ls1``/``ls2``)."""

    def __init__(self, dim: int, init_values: float):
        super().__init__()
        self.init_values = float(init_values)
        self.gamma = nn.Parameter(torch.full((dim,), self.init_values))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: ``x + drop(ls1(attn(norm1(x))))``, then ``x + drop(ls2(mlp(norm2(x))))``.

    Takes ``(B, N, D)``, or packed ``(total, D)`` with a ``_Packing`` (one varlen attention call)."""

    def __init__(self, dim: int, num_heads: int, attn_dim: int, mlp_dim: int, qkv_bias: bool,
                 drop_path: float, norm_eps: float, backend: Optional[str], *, qk_norm: bool = False,
                 init_values: Optional[float] = None, act: str = "gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        qk_norm_layer = functools.partial(nn.LayerNorm, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, norm_layer=qk_norm_layer,
                              attn_dim=attn_dim, backend=backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim, act)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor, packing: Optional[_Packing] = None) -> Tensor:
        if packing is None:
            a = self.attn(self.norm1(x))
        else:
            a = self.attn(self.norm1(x), cu_seqlens=packing.cu_seqlens, max_seqlen=packing.max_seqlen)
        x = x + self.drop_path1(self.ls1(a), packing)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))), packing)


def resample_pos_embed(pos_embed: Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int],
                       num_prefix_tokens: int) -> Tensor:
    """Position embedding ``(P, prefix + gh*gw, D)`` for grid ``old_grid`` -> ``(P, prefix + nh*nw, D)``.

    The prefix (class token) rows are kept; the grid part is resized as an image ``(P, D, gh, gw)``
    by bicubic interpolation (align_corners=False, no antialias). P is 1, or the batch when the
    embedding is expanded per sample (``ntk`` does that)."""
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    P, _, D = pos_embed.shape
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    # Half precision is resized in float32 (interpolate's half kernels are not everywhere).
    work = grid.float() if grid.dtype in (torch.float16, torch.bfloat16) else grid
    img = work.reshape(P, old_grid[0], old_grid[1], D).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=False)
    grid = img.permute(0, 2, 3, 1).reshape(P, new_grid[0] * new_grid[1], D).to(pos_embed.dtype)
    return torch.cat([prefix, grid], 1) if num_prefix_tokens else grid


# ----------------------------------------------------------------------------- the model


class ViT(DropPathRate, nn.Module):
    """Vision Transformer (ViT / DeiT), timm's parameter layout, with optional per-layer widths.

    Args:
        img_size, patch_size: int or (h, w); the position embedding is built for ``img_size``.
        num_heads: int, or a list of ``depth`` ints (heads of each layer).
        attn_dims: None (= ``embed_dim`` every layer) or a list of ``depth`` ints: the width of each of
            q, k and v in that layer (``qkv: D -> 3 * attn_dim``, ``proj: attn_dim -> D``).
        mlp_dims: None (= ``int(embed_dim * mlp_ratio)``) or a list of ``depth`` MLP hidden widths.
        class_token: prepend a class token (its position embedding row included, as timm).
        reg_tokens: register tokens after the class token (``reg_token (1, R, D)``; DINOv2-reg, "reg4").
        no_embed_class: the position embedding covers the patches only; prefix tokens get none
            (DeiT-3, big_vision).
        distilled: DeiT's distillation token after the class token and a second head
            ``head_dist``; logits are the mean of both heads (timm's inference output).
        global_pool: "token" (the class token's features), or "avg" / "max" / "avgmax" over the
            patch tokens.
        fc_norm: the final norm after pooling (``fc_norm``) instead of before it (``norm``). False
            by default; None is timm's rule (True for "avg", "max", "avgmax").
        pre_norm: a LayerNorm ``norm_pre`` after the embedding, and no patch-embedding bias (CLIP).
        final_norm: False drops the final norm.
        init_values: LayerScale ``ls1``/``ls2`` with this initial gamma (None: no LayerScale).
        qk_norm: LayerNorm of q and k per head (``attn.q_norm``/``attn.k_norm``).
        act_layer: the MLP activation, one of ``ACTIVATIONS`` ("gelu" exact, "gelu_tanh",
            "quick_gelu", "silu", "relu"). A state dict cannot tell them apart, so it is config:
            ``ViT.from_timm`` reads it from the timm model.
        drop_path_rate: stochastic depth of the last block; block i gets ``rate * i / (depth - 1)``
            (timm's linear rule). Settable later: ``set_drop_path`` or ``model.drop_path_rate = r``.
        norm_eps: LayerNorm epsilon (timm: 1e-6).
        backend: the backend of the attention kernels (None/"auto", "torch", "triton", "cuda").

    Init (timm's default): position embedding and Linear weights trunc_normal(std .02), class token
    normal(std 1e-6), Linear biases 0, LayerNorm 1/0; the patch Conv2d keeps PyTorch's default.
    """

    def __init__(self, img_size: Size2 = 224, patch_size: Size2 = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: Union[int, Sequence[int]] = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, *, attn_dims: Optional[Sequence[int]] = None,
                 mlp_dims: Optional[Sequence[int]] = None, class_token: bool = True, global_pool: str = "token",
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, backend: Optional[str] = None,
                 reg_tokens: int = 0, no_embed_class: bool = False, distilled: bool = False,
                 fc_norm: Optional[bool] = False, pre_norm: bool = False, final_norm: bool = True,
                 init_values: Optional[float] = None, qk_norm: bool = False, act_layer: str = "gelu"):
        super().__init__()
        img, patch = _pair(img_size, "img_size"), _pair(patch_size, "patch_size")
        if img[0] % patch[0] or img[1] % patch[1]:
            raise ValueError(f"img_size {img} must be divisible by patch_size {patch}")
        in_chans = _pos_int(in_chans, "in_chans")
        num_classes = _pos_int(num_classes, "num_classes", minimum=0)
        embed_dim = _pos_int(embed_dim, "embed_dim")
        depth = _pos_int(depth, "depth", minimum=0)
        if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, numbers.Real) or int(embed_dim * mlp_ratio) < 1:
            raise ValueError(f"mlp_ratio must be a number with int(embed_dim * mlp_ratio) >= 1, got {mlp_ratio!r}")
        heads = _per_layer(num_heads, depth, "num_heads", default=None)
        attn = _per_layer(attn_dims, depth, "attn_dims", default=embed_dim)
        mlp = _per_layer(mlp_dims, depth, "mlp_dims", default=int(embed_dim * mlp_ratio))
        for i, (h, a) in enumerate(zip(heads, attn)):
            if a % h:
                raise ValueError(f"num_heads[{i}]={h} must divide attn_dims[{i}]={a}"
                                 + (" (attn_dims=None: embed_dim)" if attn_dims is None else ""))
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError('global_pool="token" needs class_token=True (use global_pool="avg")')
        reg_tokens = _pos_int(reg_tokens, "reg_tokens", minimum=0)
        if distilled and (not class_token or reg_tokens or global_pool != "token"):
            raise ValueError('distilled=True needs class_token=True, reg_tokens=0 and global_pool="token"')
        if init_values is not None and (isinstance(init_values, bool) or not isinstance(init_values, numbers.Real)):
            raise ValueError(f"init_values must be None or a number, got {init_values!r}")
        if act_layer not in ACTIVATIONS:
            raise ValueError(f"act_layer must be one of {sorted(ACTIVATIONS)}, got {act_layer!r}")
        use_fc_norm = global_pool in ("avg", "max", "avgmax") if fc_norm is None else bool(fc_norm)
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, numbers.Real) or not norm_eps > 0:
            raise ValueError(f"norm_eps must be a positive number, got {norm_eps!r}")
        if backend is not None and backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"backend must be None, 'auto' or one of {backends.BACKENDS}, got {backend!r}")

        self.num_classes, self.global_pool, self.depth = num_classes, global_pool, depth
        self.embed_dim = self.num_features = embed_dim
        self.num_heads, self.attn_dims, self.mlp_dims = heads, attn, mlp
        self.has_class_token = bool(class_token)
        self.num_reg_tokens, self.no_embed_class, self.distilled = reg_tokens, bool(no_embed_class), bool(distilled)
        self.num_prefix_tokens = int(class_token) + int(distilled) + reg_tokens
        self.act_layer, self.norm_eps = act_layer, float(norm_eps)

        self.patch_embed = PatchEmbed(img, patch, in_chans, embed_dim, bias=not pre_norm)
        self.img_size, self.patch_size = img, patch
        self.grid_size, self.num_patches = self.patch_embed.grid_size, self.patch_embed.num_patches
        if class_token:
            self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        else:
            self.register_parameter("cls_token", None)
        self.dist_token = nn.Parameter(torch.empty(1, 1, embed_dim)) if distilled else None
        self.reg_token = nn.Parameter(torch.empty(1, reg_tokens, embed_dim)) if reg_tokens else None
        pos_len = self.num_patches + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.empty(1, pos_len, embed_dim))
        self.norm_pre = nn.LayerNorm(embed_dim, eps=float(norm_eps)) if pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*[
            Block(embed_dim, heads[i], attn[i], mlp[i], qkv_bias, 0.0, float(norm_eps), backend, qk_norm=qk_norm,
                  init_values=init_values, act=act_layer)
            for i in range(depth)])
        final = nn.LayerNorm(embed_dim, eps=float(norm_eps)) if final_norm else nn.Identity()
        self.norm = nn.Identity() if use_fc_norm else final
        self.fc_norm = final if use_fc_norm else nn.Identity()
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if distilled:
            self.head_dist = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.set_drop_path(drop_path_rate)
        self.init_weights()

    # ------------------------------------------------------------------ set-up

    @classmethod
    def from_timm(cls, model: nn.Module, backend: Optional[str] = None) -> "ViT":
        """A ``ViT`` with the architecture of a timm ``VisionTransformer`` (or DeiT's distilled
        one), read from the model itself (activation included), holding its weights (loaded with
        ``strict=True``), on its device and dtype; a ``meta`` model gives a ``meta`` ViT.
        ``ValueError`` names the first option of ``model`` that ViT does not implement."""
        return _from_timm(cls, model, backend)

    def init_weights(self) -> None:
        """timm's default init (see the class docstring); deterministic under torch.manual_seed."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():  # pre-order, as timm draws them
            init_linear_and_norm(m)
            if isinstance(m, LayerScale):
                nn.init.constant_(m.gamma, m.init_values)

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth ``rate`` for the last block, linear from 0 at the first (timm's rule)."""
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1], got {rate!r}")
        self._drop_path_rate = float(rate)
        for blk, p in zip(self.blocks, drop_path_rates(rate, len(self.blocks))):
            blk.drop_path1.drop_prob = blk.drop_path2.drop_prob = p

    def no_weight_decay(self) -> set[str]:
        return {n for n in ("pos_embed", "cls_token", "reg_token", "dist_token") if getattr(self, n) is not None}

    # ------------------------------------------------------------------ batched path

    def _grid(self, H: int, W: int, what: str = "input") -> tuple[int, int]:
        ph, pw = self.patch_size
        if H % ph or W % pw:
            raise ValueError(f"{what} size {H}x{W} is not divisible by the patch size {ph}x{pw}")
        return H // ph, W // pw

    def _check_image(self, x: Tensor, what: str, ndim: int) -> None:
        if not isinstance(x, Tensor) or x.dim() != ndim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            want = "(B, C, H, W)" if ndim == 4 else "(C, H, W)"
            raise ValueError(f"{what} must be a tensor {want}, got {shape}")
        if x.shape[-3] != self.patch_embed.proj.in_channels:
            raise ValueError(f"{what} has {x.shape[-3]} channels, the model takes "
                             f"in_chans={self.patch_embed.proj.in_channels}")

    def _embed(self, x: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` of one size -> tokens ``(B, prefix + gh*gw, D)`` with positions."""
        grid = self._grid(x.shape[-2], x.shape[-1])
        t = self.patch_embed(x)
        prefix = [p.expand(t.shape[0], -1, -1) for p in (self.cls_token, self.dist_token, self.reg_token)
                  if p is not None]
        if self.no_embed_class:  # positions for the patches only, then the prefix tokens in front
            t = t + resample_pos_embed(self.pos_embed, self.grid_size, grid, 0)
            t = torch.cat(prefix + [t], 1) if prefix else t
        else:
            t = torch.cat(prefix + [t], 1) if prefix else t
            t = t + resample_pos_embed(self.pos_embed, self.grid_size, grid, self.num_prefix_tokens)
        return self.norm_pre(t)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)``, H and W multiples of the patch -> normed tokens ``(B, prefix + N, D)``."""
        self._check_image(x, "x", 4)
        t = self._embed(x)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def _pool(self, x: Tensor) -> Tensor:
        """``(B, prefix + N, D)`` -> ``(B, D)`` (distilled: ``(B, 2, D)``, class and distillation token)."""
        if self.global_pool == "token":
            return x[:, :2] if self.distilled else x[:, 0]
        patches = x[:, self.num_prefix_tokens:]
        if self.global_pool == "avg":
            return patches.mean(1)
        if self.global_pool == "max":
            return patches.amax(1)
        return 0.5 * (patches.amax(1) + patches.mean(1))

    def _head(self, pooled: Tensor, pre_logits: bool) -> Tensor:
        """Pooled ``(n, D)`` (distilled ``(n, 2, D)``) -> fc_norm -> logits, or the pre-logits."""
        pooled = self.fc_norm(pooled)
        if self.distilled:  # timm's inference output: the mean of both heads
            if pre_logits:
                return pooled.mean(1)
            return 0.5 * (self.head(pooled[:, 0]) + self.head_dist(pooled[:, 1]))
        return pooled if pre_logits else self.head(pooled)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Features ``(B, prefix + N, D)`` -> logits ``(B, num_classes)`` (pooled ``(B, D)`` with pre_logits)."""
        return self._head(self._pool(x), pre_logits)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> logits ``(B, num_classes)`` (features ``(B, D)`` when num_classes=0)."""
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------ packed path

    def _packed_tokens(self, images: Sequence[Tensor]) -> tuple[Tensor, list[int]]:
        """Embed each image (equal sizes share one patch-embedding call) -> packed tokens
        ``(total, D)`` in input order, and each image's token count."""
        if isinstance(images, Tensor) or not isinstance(images, Sequence) or len(images) == 0:
            raise ValueError("images must be a non-empty sequence of (C, H, W) tensors")
        for i, img in enumerate(images):
            self._check_image(img, f"images[{i}]", 3)
            self._grid(img.shape[-2], img.shape[-1], f"images[{i}]")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, img in enumerate(images):
            groups.setdefault((img.shape[-2], img.shape[-1]), []).append(i)
        seqs: list[Optional[Tensor]] = [None] * len(images)
        for idx in groups.values():
            tokens = self._embed(torch.stack([images[i] for i in idx]))
            for j, i in enumerate(idx):
                seqs[i] = tokens[j]
        return torch.cat(seqs), [s.shape[0] for s in seqs]

    def _features_packed(self, images: Sequence[Tensor]) -> tuple[Tensor, _Packing]:
        x, lens = self._packed_tokens(images)
        n = len(lens)
        sample = torch.repeat_interleave(torch.arange(n, device=x.device), torch.tensor(lens, device=x.device),
                                         output_size=x.shape[0])
        packing = _Packing(cu_seqlens_from_lengths(lens, device=x.device), max(lens), sample, n)
        for blk in self.blocks:
            x = blk(x, packing)
        return self.norm(x), packing

    def forward_features_packed(self, images: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Images ``(C, H_i, W_i)`` of any sizes divisible by the patch -> (normed packed tokens
        ``(total, D)``, int32 ``cu_seqlens (n + 1,)``). Every layer runs once over all the tokens,
        attention as one varlen call; no padding."""
        x, packing = self._features_packed(images)
        return x, packing.cu_seqlens

    def forward_packed(self, images: Sequence[Tensor], pre_logits: bool = False) -> Tensor:
        """Images ``(C, H_i, W_i)`` -> logits ``(n, num_classes)`` (pooled ``(n, D)`` with pre_logits),
        equal to running ``forward`` on each image alone, with one attention launch per layer."""
        x, packing = self._features_packed(images)
        starts = packing.cu_seqlens[:-1].long()
        if self.global_pool == "token":
            pooled = torch.stack([x[starts], x[starts + 1]], 1) if self.distilled else x[starts]
        else:  # segment mean / max over each sample's patch tokens
            sample, n = packing.sample_of_token, packing.num_samples
            is_patch = torch.arange(x.shape[0], device=x.device) - starts[sample] >= self.num_prefix_tokens
            idx, patches = sample[is_patch], x[is_patch]
            if self.global_pool != "max":
                counts = (packing.cu_seqlens[1:] - packing.cu_seqlens[:-1] - self.num_prefix_tokens).to(x.dtype)
                mean = x.new_zeros(n, x.shape[1]).index_add(0, idx, patches) / counts[:, None]
            if self.global_pool != "avg":
                big = x.new_empty(n, x.shape[1])
                amax = big.scatter_reduce(0, idx[:, None].expand_as(patches), patches, "amax", include_self=False)
            pooled = {"avg": lambda: mean, "max": lambda: amax, "avgmax": lambda: 0.5 * (amax + mean)}[self.global_pool]()
        return self._head(pooled, pre_logits)


# ----------------------------------------------------------------------------- from timm

_TIMM_ACTS = {"GELUTanh": "gelu_tanh", "QuickGELU": "quick_gelu", "SiLU": "silu", "ReLU": "relu"}


def _timm_activation(act: nn.Module) -> Optional[str]:
    name = type(act).__name__
    if name == "GELU":  # torch's (approximate attribute) or timm's exact one
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(getattr(act, "approximate", "none"))
    return _TIMM_ACTS.get(name)


def _from_timm(cls, model: nn.Module, backend: Optional[str]) -> "ViT":
    def refuse(what: str):
        raise ValueError(f"ViT.from_timm: {type(model).__name__} uses {what}, which ViT does not implement")

    if type(model).__name__ not in ("VisionTransformer", "VisionTransformerDistilled"):
        refuse(f"class {type(model).__module__}.{type(model).__name__} (not timm's VisionTransformer)")
    if getattr(model, "attn_pool", None) is not None:
        refuse(f"global_pool={model.global_pool!r} (attention pooling)")
    if model.global_pool not in GLOBAL_POOLS:
        refuse(f"global_pool={model.global_pool!r}")
    if getattr(model, "pool_include_prefix", False):
        refuse("pool_include_prefix=True")
    if model.pos_embed is None:
        refuse("no position embedding (pos_embed='none')")
    pe = model.patch_embed
    if type(pe).__name__ != "PatchEmbed" or not isinstance(getattr(pe, "norm", nn.Identity()), nn.Identity) \
            or getattr(pe, "flatten", True) is not True or getattr(pe, "dynamic_img_pad", False):
        refuse(f"patch embedding {type(pe).__name__} with a norm, padding or no flatten")
    distilled = type(model).__name__ == "VisionTransformerDistilled"
    if distilled and getattr(model, "distilled_training", False):
        refuse("distilled_training=True (two outputs)")

    norms = [model.norm, model.fc_norm, model.norm_pre]
    blocks = list(model.blocks)
    heads, attn_dims, mlp_dims, acts, ls, qk_norm, qkv_bias = [], [], [], set(), set(), set(), set()
    for i, blk in enumerate(blocks):
        if type(blk).__name__ != "Block":
            refuse(f"block class {type(blk).__name__}")
        a, m = blk.attn, blk.mlp
        if type(a).__name__ != "Attention" or type(m).__name__ != "Mlp":
            refuse(f"blocks[{i}] attention {type(a).__name__} / MLP {type(m).__name__}")
        for what, mod in (("scale_attn_norm", a.norm), ("scale_mlp_norm", getattr(m, "norm", nn.Identity()))):
            if not isinstance(mod, nn.Identity):
                refuse(what)
        if getattr(a, "gate", None) is not None:
            refuse("gated attention")
        if a.proj.bias is None or m.fc1.bias is None or m.fc2.bias is None:
            refuse("proj_bias=False")
        if a.scale != a.head_dim ** -0.5:
            refuse(f"an attention scale {a.scale} other than head_dim ** -0.5")
        act = _timm_activation(m.act)
        if act is None:
            refuse(f"MLP activation {type(m.act).__name__}")
        heads.append(a.num_heads)
        attn_dims.append(a.num_heads * a.head_dim)
        mlp_dims.append(m.fc1.out_features)
        acts.add(act)
        qk_norm.add(not isinstance(a.q_norm, nn.Identity))
        qkv_bias.add(a.qkv.bias is not None)
        for sc in (blk.ls1, blk.ls2):
            ls.add(None if isinstance(sc, nn.Identity) else float(getattr(sc, "init_values", 1e-5)))
        norms += [blk.norm1, blk.norm2] + ([a.q_norm, a.k_norm] if qk_norm == {True} else [])
    for what, values in (("different activations per block", acts), ("qk_norm in some blocks only", qk_norm),
                         ("qkv_bias in some blocks only", qkv_bias), ("LayerScale in some blocks only",
                                                                      {v is None for v in ls})):
        if len(values) > 1:
            refuse(what)
    eps = set()
    for n in norms:
        if isinstance(n, nn.Identity):
            continue
        if not isinstance(n, nn.LayerNorm) or not n.elementwise_affine or n.bias is None:
            refuse(f"norm layer {type(n).__name__} (not an affine LayerNorm)")
        eps.add(n.eps)
    if len(eps) > 1:
        refuse(f"LayerNorms with different eps {sorted(eps)}")
    ref = next(model.parameters())
    pre_norm = not isinstance(model.norm_pre, nn.Identity)
    if (pe.proj.bias is None) != pre_norm:
        refuse("a patch-embedding bias that does not follow pre_norm (bias = not pre_norm)")
    use_fc_norm = not isinstance(model.fc_norm, nn.Identity)
    with torch.device(ref.device):
        ours = cls(img_size=tuple(pe.img_size), patch_size=tuple(pe.patch_size), in_chans=pe.proj.in_channels,
                   num_classes=model.num_classes, embed_dim=model.embed_dim, depth=len(blocks), num_heads=heads,
                   qkv_bias=qkv_bias == {True}, attn_dims=attn_dims, mlp_dims=mlp_dims,
                   class_token=model.cls_token is not None, global_pool=model.global_pool,
                   norm_eps=eps.pop() if eps else 1e-6, backend=backend, reg_tokens=model.num_reg_tokens,
                   no_embed_class=model.no_embed_class, distilled=distilled, fc_norm=use_fc_norm,
                   pre_norm=pre_norm, final_norm=not (isinstance(model.norm, nn.Identity) and not use_fc_norm),
                   init_values=next(iter(ls)) if blocks and None not in ls else None, qk_norm=qk_norm == {True},
                   act_layer=acts.pop() if acts else "gelu")
    ours = ours.to(ref.dtype)
    ours.load_state_dict(model.state_dict(), strict=True)
    return ours.train(model.training)
