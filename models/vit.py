"""Plain ViT / DeiT in timm's ``VisionTransformer`` layout, on ``asvit_kernels.nn.Attention``.

Parameter names match timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.norm1``,
``.attn.qkv``, ``.attn.proj``, ``.norm2``, ``.mlp.fc1``, ``.mlp.fc2``, ``norm``, ``head``), so a timm
``vit_*`` / ``deit_*`` (non-distilled) state dict loads with ``strict=True``.

Beyond timm's layout:
  - per-layer widths (``num_heads``, ``attn_dims``, ``mlp_dims`` as lists), so a ViTAS sub-network
    extracted from the supernet is a standalone ViT;
  - any input size divisible by the patch (position embeddings resampled bicubically per call);
  - ``forward_packed``: images of different sizes in one packed token sequence, one varlen attention
    launch per layer, no padding.
"""
from __future__ import annotations

import numbers
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from asvit_kernels import backends
from asvit_kernels.nn import Attention
from asvit_kernels.ops.packing import cu_seqlens_from_lengths

__all__ = ["ViT", "PatchEmbed", "Mlp", "Block", "DropPath", "resample_pos_embed"]

Tensor = torch.Tensor
Size2 = Union[int, Sequence[int]]
GLOBAL_POOLS = ("token", "avg")


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

    def __init__(self, img_size: tuple[int, int], patch_size: tuple[int, int], in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.patch_size = img_size, patch_size
        self.grid_size = (img_size[0] // patch_size[0], img_size[1] // patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """``fc1 (D -> hidden) -> GELU -> fc2 (hidden -> D)``, timm's names."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + drop(attn(norm1(x)))``, then ``x + drop(mlp(norm2(x)))``.

    Takes ``(B, N, D)``, or packed ``(total, D)`` with a ``_Packing`` (one varlen attention call)."""

    def __init__(self, dim: int, num_heads: int, attn_dim: int, mlp_dim: int, qkv_bias: bool,
                 drop_path: float, norm_eps: float, backend: Optional[str]):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_dim=attn_dim, backend=backend)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, mlp_dim)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: Tensor, packing: Optional[_Packing] = None) -> Tensor:
        if packing is None:
            a = self.attn(self.norm1(x))
        else:
            a = self.attn(self.norm1(x), cu_seqlens=packing.cu_seqlens, max_seqlen=packing.max_seqlen)
        x = x + self.drop_path1(a, packing)
        return x + self.drop_path2(self.mlp(self.norm2(x)), packing)


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
        global_pool: "token" (the class token's features) or "avg" (mean over the patch tokens of
            the normed features; timm's ``global_pool="avg", fc_norm=False``).
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
                 drop_path_rate: float = 0.0, norm_eps: float = 1e-6, backend: Optional[str] = None):
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
        if isinstance(norm_eps, bool) or not isinstance(norm_eps, numbers.Real) or not norm_eps > 0:
            raise ValueError(f"norm_eps must be a positive number, got {norm_eps!r}")
        if backend is not None and backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"backend must be None, 'auto' or one of {backends.BACKENDS}, got {backend!r}")

        self.num_classes, self.global_pool, self.depth = num_classes, global_pool, depth
        self.embed_dim = self.num_features = embed_dim
        self.num_heads, self.attn_dims, self.mlp_dims = heads, attn, mlp
        self.has_class_token = bool(class_token)
        self.num_prefix_tokens = 1 if class_token else 0

        self.patch_embed = PatchEmbed(img, patch, in_chans, embed_dim)
        self.img_size, self.patch_size = img, patch
        self.grid_size, self.num_patches = self.patch_embed.grid_size, self.patch_embed.num_patches
        if class_token:
            self.cls_token = nn.Parameter(torch.empty(1, 1, embed_dim))
        else:
            self.register_parameter("cls_token", None)
        self.pos_embed = nn.Parameter(torch.empty(1, self.num_prefix_tokens + self.num_patches, embed_dim))
        self.blocks = nn.Sequential(*[
            Block(embed_dim, heads[i], attn[i], mlp[i], qkv_bias, 0.0, float(norm_eps), backend)
            for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=float(norm_eps))
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.set_drop_path(drop_path_rate)
        self.init_weights()

    # ------------------------------------------------------------------ set-up

    def init_weights(self) -> None:
        """timm's default init (see the class docstring); deterministic under torch.manual_seed."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():  # pre-order, as timm draws them
            init_linear_and_norm(m)

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth ``rate`` for the last block, linear from 0 at the first (timm's rule)."""
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1], got {rate!r}")
        self._drop_path_rate = float(rate)
        for blk, p in zip(self.blocks, drop_path_rates(rate, len(self.blocks))):
            blk.drop_path1.drop_prob = blk.drop_path2.drop_prob = p

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

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
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(t.shape[0], -1, -1), t], 1)
        return t + resample_pos_embed(self.pos_embed, self.grid_size, grid, self.num_prefix_tokens)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)``, H and W multiples of the patch -> normed tokens ``(B, prefix + N, D)``."""
        self._check_image(x, "x", 4)
        t = self._embed(x)
        for blk in self.blocks:
            t = blk(t)
        return self.norm(t)

    def _pool(self, x: Tensor) -> Tensor:
        """``(B, prefix + N, D)`` -> ``(B, D)``."""
        if self.global_pool == "token":
            return x[:, 0]
        return x[:, self.num_prefix_tokens:].mean(1)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Features ``(B, prefix + N, D)`` -> logits ``(B, num_classes)`` (pooled ``(B, D)`` with pre_logits)."""
        x = self._pool(x)
        return x if pre_logits else self.head(x)

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
            pooled = x[starts]
        else:  # segment mean over each sample's patch tokens
            sample, n = packing.sample_of_token, packing.num_samples
            is_patch = torch.arange(x.shape[0], device=x.device) - starts[sample] >= self.num_prefix_tokens
            sums = x.new_zeros(n, x.shape[1]).index_add(0, sample[is_patch], x[is_patch])
            counts = (packing.cu_seqlens[1:] - packing.cu_seqlens[:-1] - self.num_prefix_tokens).to(x.dtype)
            pooled = sums / counts[:, None]
        return pooled if pre_logits else self.head(pooled)
