"""As-ViT (Auto-scaling Vision Transformers without training): the four-stage window-attention
network the topology search ranks and the scaling grows (ALGORITHMS.md, "As-ViT").

Layout. Tokens travel channels-last as ``(B, H, W, C)``, so every ``nn.Linear``, ``nn.Conv2d`` and
``nn.LayerNorm`` sees the batch as its leading dim (``asvit_kernels.ntk``'s fast path needs that).
Window attention puts the tokens in window order before the qkv projection and back after the
output projection (both act per token, and x is a third of qkv's width): the windows of the whole
batch are packed as sequences and go through one ``varlen_attention`` call per block; windows at
the bottom/right edge of a grid the window side does not divide are smaller (no padding).

Choices where the spec is silent (the released VITA-Group/AsViT code where it has one):
  * Stage-1 tokenizer: ``Conv2d(in_chans, E, K1, stride, dilation, padding=0)`` after an explicit
    zero pad with TensorFlow's "SAME" rule: grid = ceil(size / stride), total pad
    ``max(0, (grid - 1) * stride + dilation * (K1 - 1) + 1 - size)``, the smaller half on the
    top/left. At stride 4 / dilation 1 and a size divisible by 4 this is exactly the released pad
    ``((K1 - 4) // 2, (K1 - 3) // 2)``; it also gives 14/28/56 grids at 224 for the
    re-tokenization settings (16, 5), (8, 2), (4, 1) for every K1. Then LayerNorm(E)
    (the released code's ``patch_norm=True``). The conv keeps PyTorch's default init, as released.
  * Soft-split merge (stages 2-4): zero pad ``((K - 2) // 2, (K - 1) // 2)`` (the released pad,
    asymmetric for odd K, which ``nn.Unfold``'s symmetric padding cannot express), plus one more
    row/column at the bottom/right when the grid side is odd, then ``nn.Unfold(K, stride=2)``:
    the grid goes to ceil(side / 2). Odd grids occur under re-tokenization (224 at stride 16:
    14 -> 7 -> 4 -> 2). A grid side of 1 cannot be halved, so the stage-1 grid needs sides >= 5.
  * Heads: head dim = width // heads and q/k/v are heads * head_dim wide (the released rule), so a
    width not divisible by its heads (narrow scaling proxies, hidden = 9) still builds.
  * qkv, proj and MLP Linears have biases (released ``qkv_bias=True``); the merge Linear has none.
  * Head: the released ``Linear(C_last, C_last) -> Tanh -> Linear(C_last, num_classes)``
    (``num_classes=0``: identity). The spec only says "a head"; this one brings As-ViT Large to
    87.6M parameters (a single Linear: 86.5M), nearest the paper's ~88M, and the parameter limits
    of the scaling (80M / 110M) count it. The indicators never see it (they use forward_features).
  * Drop path: linearly increasing from 0 to ``drop_path_rate`` over all blocks (released rule).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from asvit_kernels.ops import varlen_attention

from .genotype import Genotype
from .vit import DropPath, DropPathRate, Mlp, drop_path_rates, init_linear_and_norm

__all__ = ["AsViT", "WindowAttention", "window_layout", "same_padding", "merged_side"]

Tensor = torch.Tensor
STAGE1_STRIDE = 4
MIN_STAGE1_GRID = 5  # 5 -> 3 -> 2 -> 1: the smallest side three merges can each halve


# ----------------------------------------------------------------------------- geometry

def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int, int]:
    """TensorFlow "SAME" padding along one axis: (pad_before, pad_after, output size = ceil(size / stride))."""
    out = -(-size // stride)
    total = max(0, (out - 1) * stride + dilation * (kernel - 1) + 1 - size)
    return total // 2, total - total // 2, out


def merged_side(side: int) -> int:
    """Grid side after a soft-split merge: ceil(side / 2)."""
    return -(-side // 2)


def _merge_padding(kernel: int, height: int, width: int) -> tuple[int, int, int, int]:
    """F.pad amounts (left, right, top, bottom) so Unfold(kernel, stride 2) gives ceil(side / 2)."""
    lo, hi = (kernel - 2) // 2, (kernel - 1) // 2
    return lo, hi + width % 2, lo, hi + height % 2


def window_sides(grid: tuple[int, int], split: int) -> tuple[int, int]:
    """Window (height, width): each grid side // split, at least 1."""
    return max(1, grid[0] // split), max(1, grid[1] // split)


@functools.lru_cache(maxsize=256)
def window_layout(height: int, width: int, win_h: int, win_w: int, batch: int,
                  device: torch.device) -> tuple[Optional[Tensor], Optional[Tensor], Tensor, int]:
    """How one block packs a ``(batch, height * width)`` token grid into windows.

    Returns ``(perm, inverse, cu_seqlens, max_len)``: ``tokens[:, perm]`` lists each sample's
    windows one after the other (windows row-major, tokens row-major inside each), ``inverse``
    undoes it, ``cu_seqlens`` int32 ``(batch * windows + 1,)`` are the packed window offsets of the
    flattened batch and ``max_len`` the largest window. perm/inverse are None for a single window.
    Edge windows are smaller when win_h / win_w do not divide the grid. Cached per argument set.
    """
    n = height * width
    rows = torch.arange(height).repeat_interleave(width)
    cols = torch.arange(width).repeat(height)
    per_row = -(-width // win_w)
    window_id = (rows // win_h) * per_row + cols // win_w       # (n,) row-major window index
    sizes = torch.bincount(window_id, minlength=per_row * -(-height // win_h))
    offsets = torch.arange(batch)[:, None] * n
    starts = (offsets + torch.cumsum(sizes, 0)[None, :] - sizes[None, :]).reshape(-1)
    cu = torch.cat([starts, torch.tensor([batch * n])]).to(torch.int32).to(device)
    max_len = min(win_h, height) * min(win_w, width)
    if sizes.numel() == 1:
        return None, None, cu, max_len
    perm = torch.argsort(window_id * n + torch.arange(n))      # stable order: window, then row-major
    return perm.to(device), torch.argsort(perm).to(device), cu, max_len


# ----------------------------------------------------------------------------- layers

class _Normed(nn.Module):
    """A module whose LayerNorms ``set_norm`` can bypass without changing parameter names."""

    use_norm: bool = True

    def _norm(self, ln: nn.LayerNorm, x: Tensor) -> Tensor:
        return ln(x) if self.use_norm else x


class PatchEmbed(_Normed):
    """Stage-1 tokenizer: (B, C_in, H_img, W_img) -> (B, H, W, E) with SAME padding (see module doc)."""

    def __init__(self, in_chans: int, dim: int, kernel: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel, stride=STAGE1_STRIDE, padding=0)
        self.norm = nn.LayerNorm(dim)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Token grid for an image of this size at the current stride."""
        return -(-height // self.proj.stride[0]), -(-width // self.proj.stride[1])

    def forward(self, x: Tensor) -> Tensor:
        k, s, d = self.proj.kernel_size[0], self.proj.stride[0], self.proj.dilation[0]
        top, bottom, _ = same_padding(x.shape[-2], k, s, d)
        left, right, _ = same_padding(x.shape[-1], k, s, d)
        x = self.proj(F.pad(x, (left, right, top, bottom)))
        return self._norm(self.norm, x.permute(0, 2, 3, 1))


class SoftSplit(_Normed):
    """Stages 2-4 patch merging: (B, H, W, d) -> (B, ceil(H/2), ceil(W/2), d_out) by
    Unfold(K, stride 2) -> LayerNorm(K*K*d) -> Linear(K*K*d, d_out, no bias)."""

    def __init__(self, dim: int, out_dim: int, kernel: int):
        super().__init__()
        self.kernel = kernel
        self.unfold = nn.Unfold(kernel, stride=2)
        self.norm = nn.LayerNorm(kernel * kernel * dim)
        self.reduction = nn.Linear(kernel * kernel * dim, out_dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, H, W, _ = x.shape
        x = F.pad(x.permute(0, 3, 1, 2), _merge_padding(self.kernel, H, W))
        x = self.unfold(x).transpose(1, 2).reshape(B, merged_side(H), merged_side(W), -1)
        return self.reduction(self._norm(self.norm, x))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping windows of a (B, H, W, C) grid.

    Window side = max(1, grid side // split) per axis (split 1: global). No position bias, no shift.
    q/k/v are ``heads * (dim // heads)`` wide. One varlen attention call covers all windows of the batch.
    """

    def __init__(self, dim: int, num_heads: int, split: int, *, backend: Optional[str] = None):
        super().__init__()
        if dim < num_heads:
            raise ValueError(f"dim ({dim}) must be >= num_heads ({num_heads})")
        self.num_heads, self.head_dim, self.split, self.backend = num_heads, dim // num_heads, split, backend
        inner = self.num_heads * self.head_dim
        self.qkv = nn.Linear(dim, 3 * inner)
        self.proj = nn.Linear(inner, dim)

    def forward(self, x: Tensor) -> Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        N, inner = H * W, self.num_heads * self.head_dim
        wh, ww = window_sides((H, W), self.split)
        perm, inverse, cu, max_len = window_layout(H, W, wh, ww, B, x.device)
        # qkv and proj act per token, so the tokens are put in window order on x (C wide, not
        # qkv's 3C) and back after proj; grids the window divides permute (a copy whose backward
        # is a copy), others gather. The batch stays the leading dim of every Linear's input.
        even = perm is not None and H % wh == 0 and W % ww == 0
        if even:
            x = x.reshape(B, H // wh, wh, W // ww, ww, C).transpose(2, 3).reshape(B, N, C)
        elif perm is not None:
            x = x.reshape(B, N, C).index_select(1, perm)
        q, k, v = self.qkv(x).reshape(B * N, 3, self.num_heads, self.head_dim).unbind(1)
        o = varlen_attention(q, k, v, cu, cu, max_len, max_len, backend=self.backend)
        o = self.proj(o.reshape(B, N, inner))
        if even:
            return o.reshape(B, H // wh, W // ww, wh, ww, C).transpose(2, 3).reshape(B, H, W, C)
        if perm is not None:
            o = o.index_select(1, inverse)
        return o.reshape(B, H, W, C)

    def extra_repr(self) -> str:
        return f"heads={self.num_heads}, head_dim={self.head_dim}, split={self.split}"


class Block(_Normed):
    """Pre-norm transformer block on (B, H, W, C): x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, dim: int, num_heads: int, split: int, expansion: int, drop_path: float = 0.0, *,
                 backend: Optional[str] = None):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, split, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, expansion * dim)
        self.drop_path = DropPath(drop_path)  # always a DropPath: set_drop_path changes its rate

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path(self.attn(self._norm(self.norm1, x)))
        return x + self.drop_path(self.mlp(self._norm(self.norm2, x)))


class Stage(nn.Module):
    """A tokenizer (PatchEmbed or SoftSplit) followed by ``depth`` blocks."""

    def __init__(self, tokenizer: nn.Module, blocks: Sequence[Block]):
        super().__init__()
        self.tokenizer = tokenizer
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.tokenizer(x))


# ----------------------------------------------------------------------------- model

def _check_int(value, name: str, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _size_pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if not isinstance(value, (tuple, list)) else tuple(value)
    if len(pair) != 2:
        raise ValueError(f"{name} must be an int or (height, width), got {value!r}")
    return _check_int(pair[0], name), _check_int(pair[1], name)


class AsViT(DropPathRate, _Normed):
    """As-ViT: four stages of window-attention blocks on a grid halved between stages.

    ``forward_features(x)``: (B, in_chans, H, W) -> (B, C_last), the global average pool of the
    last stage after the final LayerNorm; ``forward(x)`` -> (B, num_classes) logits.
    Build with ``AsViT.from_genotype``.
    """

    def __init__(self, genotype: Union[str, Genotype], *, num_classes: int = 1000, img_size=224, in_chans: int = 3,
                 drop_path_rate: float = 0.0, backend: Optional[str] = None):
        super().__init__()
        genotype = Genotype.parse(genotype)  # TypeError naming genotype for anything else
        _check_int(num_classes, "num_classes", 0)
        _check_int(in_chans, "in_chans")
        if isinstance(drop_path_rate, bool) or not isinstance(drop_path_rate, (int, float)) \
                or not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be a float in [0, 1), got {drop_path_rate!r}")
        self._genotype = genotype
        self.img_size = _size_pair(img_size, "img_size")
        self.num_classes, self.in_chans = num_classes, in_chans
        g = genotype
        widths, heads = g.widths, g.stage_heads
        total = sum(g.depths)
        rates = drop_path_rates(drop_path_rate, total)
        stages = []
        for i in range(4):
            if i == 0:
                tokenizer = PatchEmbed(in_chans, widths[0], g.kernels[0])
            else:
                tokenizer = SoftSplit(widths[i - 1], widths[i], g.kernels[i])
            first = sum(g.depths[:i])
            blocks = [Block(widths[i], heads[i], g.splits[i], g.expansions[i], rates[first + j], backend=backend)
                      for j in range(g.depths[i])]
            stages.append(Stage(tokenizer, blocks))
        self.stages = nn.ModuleList(stages)
        self.num_features = widths[-1]
        self._drop_path_rate = float(drop_path_rate)
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Sequential(nn.Linear(self.num_features, self.num_features), nn.Tanh(),
                                  nn.Linear(self.num_features, num_classes)) if num_classes > 0 else nn.Identity()
        self.apply(init_linear_and_norm)  # Conv2d keeps PyTorch's default
        self.stage_grids(self.img_size)  # the configured size must be usable

    @classmethod
    def from_genotype(cls, genotype: Union[str, Genotype], *, embed_dim: Optional[int] = None,
                      depths: Optional[Sequence[int]] = None, num_classes: int = 1000, img_size=224,
                      in_chans: int = 3, drop_path_rate: float = 0.0, backend: Optional[str] = None,
                      device: Union[str, torch.device, None] = None) -> "AsViT":
        """Build from a genotype string or Genotype; ``embed_dim`` / ``depths`` override its
        hidden / depths. ``device`` (e.g. "meta") builds the parameters there directly. Only the
        structure is checked; ``Genotype.validate()`` checks membership in the search space."""
        g = Genotype.parse(genotype)
        if embed_dim is not None:
            g = g.with_(hidden=embed_dim)
        if depths is not None:
            g = g.with_(depths=depths)
        kwargs = dict(num_classes=num_classes, img_size=img_size, in_chans=in_chans,
                      drop_path_rate=drop_path_rate, backend=backend)
        if device is None:
            return cls(g, **kwargs)
        with torch.device(device):
            return cls(g, **kwargs)

    # ------------------------------------------------------------------ introspection

    @property
    def genotype(self) -> Genotype:
        """The architecture, with the actual depths and hidden width."""
        return self._genotype

    @property
    def tokenization(self) -> tuple[int, int]:
        """(stride, dilation) of the stage-1 patch embedding."""
        conv = self.stages[0].tokenizer.proj
        return conv.stride[0], conv.dilation[0]

    @property
    def norm_enabled(self) -> bool:
        return self.use_norm

    def stage_grids(self, img_size=None) -> list[tuple[int, int]]:
        """Token grid (H, W) of each stage for an input of ``img_size`` (default: the configured
        one) at the current tokenization; ValueError when three merges cannot halve it."""
        h, w = self.img_size if img_size is None else _size_pair(img_size, "img_size")
        grid = self.stages[0].tokenizer.grid(h, w)
        if min(grid) < MIN_STAGE1_GRID:
            stride, dilation = self.tokenization
            raise ValueError(f"img size {h}x{w} gives a {grid[0]}x{grid[1]} token grid at stride {stride}; "
                             f"the three merges need a grid side >= {MIN_STAGE1_GRID} (img size >= "
                             f"{(MIN_STAGE1_GRID - 1) * stride + 1})")
        grids = [grid]
        for _ in range(3):
            grids.append((merged_side(grids[-1][0]), merged_side(grids[-1][1])))
        return grids

    def stage_info(self, img_size=None) -> list[dict]:
        """Per stage: grid, window (h, w), width, heads, head_dim, depth, expansion, kernel, split."""
        g = self._genotype
        out = []
        for i, grid in enumerate(self.stage_grids(img_size)):
            out.append({"grid": grid, "window": window_sides(grid, g.splits[i]), "width": g.widths[i],
                        "heads": g.stage_heads[i], "head_dim": g.widths[i] // g.stage_heads[i],
                        "depth": g.depths[i], "expansion": g.expansions[i], "kernel": g.kernels[i],
                        "split": g.splits[i]})
        return out

    # ------------------------------------------------------------------ switches

    def set_tokenization(self, stride: int = STAGE1_STRIDE, dilation: int = 1) -> "AsViT":
        """Progressive re-tokenization: change the stage-1 conv's stride and dilation in place
        (same weight tensors). The SAME pad is recomputed per input, so the grid is
        ceil(size / stride): at 224, (16, 5) -> 14x14, (8, 2) -> 28x28, (4, 1) -> 56x56.
        Windows follow the grid. Returns self."""
        _check_int(stride, "stride")
        _check_int(dilation, "dilation")
        conv = self.stages[0].tokenizer.proj
        conv.stride, conv.dilation = (stride, stride), (dilation, dilation)
        return self

    def set_drop_path(self, rate: float) -> "AsViT":
        """Stochastic depth ``rate`` of the last block, linear from 0 over all blocks (the released
        rule, as at construction); training schedules change it per stage. Returns self."""
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
            raise ValueError(f"drop_path_rate must be a float in [0, 1), got {rate!r}")
        blocks = [b for stage in self.stages for b in stage.blocks]
        for blk, p in zip(blocks, drop_path_rates(rate, len(blocks))):
            blk.drop_path.drop_prob = p
        self._drop_path_rate = float(rate)
        return self

    def set_norm(self, enabled: bool) -> "AsViT":
        """Bypass every LayerNorm (False, as L^E is measured) or use them again (True). The
        LayerNorm modules and their parameters stay, so ``state_dict()`` keys never change."""
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
        for m in self.modules():
            if isinstance(m, _Normed):
                m.use_norm = enabled
        return self

    # ------------------------------------------------------------------ forward

    def forward_tokens(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, H_4, W_4, C_last): the last stage's tokens, no final LayerNorm."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (B, {self.in_chans}, H, W), got {shape}")
        self.stage_grids(tuple(x.shape[-2:]))
        for stage in self.stages:
            x = stage(x)
        return x

    def pooled_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, C_last): the last stage's tokens averaged over the grid BEFORE
        the final LayerNorm; the released code's ``forward_features(x)[1]``, the output As-ViT's
        indicators (kappa, L^E) differentiate. Behind a LayerNorm with weight 1 and bias 0 the
        channel sum is the same for every input, so its NTK would hold only ``norm.weight``."""
        return self.forward_tokens(x).mean(dim=(1, 2))

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, C_last): final LayerNorm, then mean over the last grid (what
        the classifier head reads)."""
        return self._norm(self.norm, self.forward_tokens(x)).mean(dim=(1, 2))

    def forward(self, x: Tensor) -> Tensor:
        """(B, in_chans, H, W) -> (B, num_classes)."""
        return self.head(self.forward_features(x))

    def extra_repr(self) -> str:
        return f"genotype='{self._genotype}', img_size={self.img_size}"
