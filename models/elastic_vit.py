"""The elastic super-transformer (ViTAS supernet, AutoProg's elastic model): one set of shared
weights, any ``SubnetConfig`` of a ``SubnetSpace`` selected with ``set_subnet``.

Elastic dimensions: patch size (a private patch embedding, class token and position embedding per
patch size), embed dim, depth (identity shifting: the active blocks run in slots 0..d-1), and per
layer heads, q/k/v width and MLP width. Each width is a channel range of the full-size shared
parameters (``sharing`` = "first" | "last" | "cyclic", ALGORITHMS.md); every Linear and LayerNorm
is an ``ElasticLinear`` / ``ElasticLayerNorm`` over those ranges, so the forward never copies a
weight slice. ``extract_subnet`` copies a sub-network's slices once into a standalone dense ``ViT``
with the same outputs; ``load_subnet`` writes a dense ``ViT`` back into the slices.
"""
from __future__ import annotations

import math
import numbers
import re
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from asvit_kernels.nn import ElasticLayerNorm, ElasticLinear
from asvit_kernels.ops import varlen_attention
from asvit_kernels.ranges import Range, channel_indices

from .growth import new_layer_sources
from .subnet import SHARING_RULES, Sharing, SubnetConfig, SubnetSpace, sample_subnet, subnet_flops, width_range
from .vit import DropPath, DropPathRate, ViT, drop_path_rates, resample_pos_embed

__all__ = ["ElasticViT", "ElasticBlock", "ElasticAttention", "SubnetRanges", "released_softmax_scale"]

Tensor = torch.Tensor


class SubnetRanges(NamedTuple):
    """The channel ranges a config uses: embed over ``D_max``; per active layer, the q/k/v range
    over ``qkv_max`` (the same offset inside each of the q, k and v blocks of the shared qkv, and
    v's range with private q/k), the MLP range, and with private q/k the block of ``2 * width``
    consecutive rows of the ``2 * qkv_max``-row q/k weight (q its first half, k its second: the
    released ViTAS layout)."""

    embed: Range
    qkv: tuple[Range, ...]
    mlp: tuple[Range, ...]
    qk: tuple[Range, ...]


def released_softmax_scale(max_embed: int) -> float:
    """The softmax scale of ViTAS's released supernet: ``(max_embed // 3) ** -0.5`` for EVERY
    sub-network, whatever its head dim (their ``Attention`` takes ``head_dim = dim // 3`` when the
    heads are a list of choices): 128^-0.5 at embed 384. Pass it as ``ElasticViT(softmax_scale=...)``
    to run their checkpoints as trained."""
    return float((max_embed // 3) ** -0.5)


def _in_block(r: Range, size: int, base: int) -> list[Range]:
    """Range ``r`` of a block of ``size`` channels that starts at row ``base`` of a larger weight.

    elastic_linear wraps a range modulo the whole weight (3 * size rows for qkv), not the block, so
    a range that wraps inside its block is given as its two runs."""
    o, w = r
    if o + w <= size:
        return [(base + o, w)]
    first = size - o
    return [(base + o, first), (base, w - first)]


def _natural(r: Range, size: int, unit: int = 1) -> Range:
    """``(0, size)`` for a full-width range ``(o, size)`` with ``o % unit == 0``, else ``r``.

    A full-width cyclic range only rotates the channels. Where every op over a dimension uses the
    same range and commutes with the rotation (LayerNorm, linear, GELU, residual adds; attention
    when it moves whole heads: ``unit`` = head dim), running the dimension in natural order
    computes the same network (up to rounding order) on plain views, with no wrapped gathers."""
    o, w = r
    return (0, size) if w == size and o % unit == 0 else r


def _channels(param: Tensor, r: Range) -> Tensor:
    """``param[..., idx(r)]`` of a small token parameter ``(1, n, D_max)``: a view when ``r`` does not
    wrap; a wrapping cyclic range concatenates two views (a copy of these small token tensors only,
    never of a Linear or LayerNorm weight)."""
    o, w = r
    C = param.shape[-1]
    if o + w <= C:
        return param[..., o:o + w]
    return torch.cat([param[..., o:], param[..., :w - (C - o)]], -1)


def _patches(x: Tensor, p: int) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, (H/p)(W/p), C*p*p)`` in ``F.unfold``'s order (channel, row, column
    within a patch; patches row-major): one reshape/permute copy, about 5x cheaper on a CPU than
    unfold's im2col (thread CPU time, batch 8, 112 px, patch 16, one thread)."""
    B, C, H, W = x.shape
    t = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(B, (H // p) * (W // p), C * p * p)


class ElasticAttention(nn.Module):
    """Multi-head self-attention over ranges of shared projections, ``(B, N, d) -> (B, N, d)``.

    Shared: ``qkv: D_max -> 3 * qkv_max`` (rows [q | k | v], timm's layout; q, k and v use the same
    range inside their blocks). With ``private_qk`` (ViTAS private attention maps): one
    ``qk[str(h)]: D_max -> 2 * qkv_max`` per heads choice h, of which a width w uses ONE block of 2w
    consecutive rows (q its first w, k the next w: released ViTAS), and a shared
    ``v: D_max -> qkv_max``. ``proj: qkv_max -> D_max`` always shared. ``softmax_scale`` None:
    ``head_dim ** -0.5`` of the sub-network; a number: that scale for every sub-network."""

    def __init__(self, dim: int, qkv_dim: int, head_choices: Sequence[int], qkv_bias: bool, private_qk: bool,
                 backend: Optional[str], softmax_scale: Optional[float] = None):
        super().__init__()
        self.max_qkv, self.private_qk, self.backend = qkv_dim, private_qk, backend
        self.softmax_scale = softmax_scale
        if private_qk:
            self.qk = nn.ModuleDict({str(h): ElasticLinear(dim, 2 * qkv_dim, qkv_bias, backend=backend)
                                     for h in head_choices})
            self.v = ElasticLinear(dim, qkv_dim, qkv_bias, backend=backend)
        else:
            self.qkv = ElasticLinear(dim, 3 * qkv_dim, qkv_bias, backend=backend)
        self.proj = ElasticLinear(qkv_dim, dim, backend=backend)
        self.num_heads = head_choices[-1]

    def set_subnet(self, embed: Range, qkv: Range, num_heads: int, qk: Range) -> None:
        C = self.max_qkv
        self.num_heads = num_heads
        if self.private_qk:
            self.qk[str(num_heads)].set_range(embed, qk)
            self.v.set_range(embed, qkv)
        else:
            self.qkv.set_range(embed, _in_block(qkv, C, 0) + _in_block(qkv, C, C) + _in_block(qkv, C, 2 * C))
        self.proj.set_range(qkv, embed)

    def forward(self, x: Tensor) -> Tensor:
        B, N, _ = x.shape
        H, total = self.num_heads, B * N
        if self.private_qk:
            q, k = self.qk[str(H)](x).reshape(total, 2, H, -1).unbind(1)
            v = self.v(x).reshape(total, H, -1)
        else:
            q, k, v = self.qkv(x).reshape(total, 3, H, -1).unbind(1)
        # B equal-length sequences: uniform offsets, as asvit_kernels.nn.Attention does.
        cu = torch.arange(0, (B + 1) * N, N, device=x.device, dtype=torch.int32)
        o = varlen_attention(q, k, v, cu, cu, N, N, softmax_scale=self.softmax_scale, backend=self.backend)
        return self.proj(o.reshape(B, N, -1))


class ElasticBlock(nn.Module):
    """Pre-norm block ``x + drop(attn(norm1(x)))``, ``x + drop(fc2(gelu(fc1(norm2(x)))))`` over
    ``(B, N, d)``; ``drop`` is stochastic depth (``vit.DropPath``, rate set by the supernet)."""

    def __init__(self, dim: int, qkv_dim: int, mlp_dim: int, head_choices: Sequence[int], qkv_bias: bool,
                 private_qk: bool, norm_eps: float, backend: Optional[str], softmax_scale: Optional[float] = None):
        super().__init__()
        self.norm1 = ElasticLayerNorm(dim, eps=norm_eps, backend=backend)
        self.attn = ElasticAttention(dim, qkv_dim, head_choices, qkv_bias, private_qk, backend, softmax_scale)
        self.norm2 = ElasticLayerNorm(dim, eps=norm_eps, backend=backend)
        self.mlp = nn.ModuleDict({"fc1": ElasticLinear(dim, mlp_dim, backend=backend),
                                  "fc2": ElasticLinear(mlp_dim, dim, backend=backend)})
        self.drop_path1, self.drop_path2 = DropPath(), DropPath()

    def set_subnet(self, embed: Range, qkv: Range, num_heads: int, mlp: Range, qk: Range) -> None:
        self.norm1.set_range(embed)
        self.norm2.set_range(embed)
        self.attn.set_subnet(embed, qkv, num_heads, qk)
        self.mlp["fc1"].set_range(embed, mlp)
        self.mlp["fc2"].set_range(mlp, embed)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp["fc2"](F.gelu(self.mlp["fc1"](self.norm2(x)))))


class _Slice(NamedTuple):
    """Dense parameter ``name`` (rows ``rows`` of it, None = all) <-> ``src[index]``, where
    ``index`` holds one index tensor per dim of ``src`` (None = the whole dim)."""

    name: str
    rows: Optional[slice]
    src: Tensor
    index: tuple[Optional[Tensor], ...]


class ElasticViT(DropPathRate, nn.Module):
    """ViTAS / AutoProg super-transformer over a ``SubnetSpace``.

    Args:
        space: the choices; the supernet holds the widest of each, ``space.num_slots`` layer slots,
            and one patch embedding / class token / position embedding per patch size.
        img_size: the square input size the position embeddings are built for (each patch size must
            divide it); other inputs divisible by the patch get them resampled, as ``ViT`` does.
        sharing: "first" | "last" | "cyclic": which channels a width uses (``subnet.width_range``),
            the same rule for every elastic dimension (embed, per-layer q/k/v, per-layer MLP).
        private_qk: ViTAS private attention maps (one q/k projection per heads choice; a width w
            uses one block of 2w consecutive rows of it, placed by ``sharing`` over its 2 * qkv_max
            rows, q the block's first half and k its second, as the released code slices it).
        softmax_scale: None (default): each sub-network's ``head_dim ** -0.5``. A positive number:
            that scale for every sub-network (``released_softmax_scale(D_max)`` is the released
            ViTAS supernet's); ``extract_subnet`` carries it into the dense ``ViT``.
        drop_path_rate: stochastic depth (training mode only) of the last ACTIVE block: active
            block i of a depth-d sub-network gets ``rate * i / max(1, d - 1)`` (timm's linear
            rule over the active depth, recomputed by every ``set_subnet``); inactive slots get 0.
            Settable later: ``set_drop_path`` or ``model.drop_path_rate = r``. Default 0 (none).

    Parameters (timm-like names): ``patch_embed[str(p)]`` (an ElasticLinear ``C*p*p -> D_max`` on
    unfolded patches: Conv2d's weight ``(D, C, p, p)`` flattened), ``cls_token[str(p)] (1, 1, D_max)``,
    ``pos_embed[str(p)] (1, 1 + (img/p)^2, D_max)``, ``blocks[i]`` (norm1, attn, norm2, mlp.fc1,
    mlp.fc2), ``norm``, ``head``. Init as ``ViT``'s (timm): Linear trunc_normal(.02) / bias 0,
    position embeddings trunc_normal(.02), class tokens normal(1e-6), LayerNorm 1/0, patch embedding
    PyTorch's Conv2d default. No dropout; drop path per ``drop_path_rate``; class-token pooling only.

    The forward runs the sub-network last given to ``set_subnet`` (initially ``space.largest()``).
    """

    def __init__(self, space: SubnetSpace, img_size: int = 224, in_chans: int = 3, num_classes: int = 1000,
                 qkv_bias: bool = True, *, sharing: Sharing = "first", private_qk: bool = False, norm_eps: float = 1e-6,
                 drop_path_rate: float = 0.0, backend: Optional[str] = None,
                 softmax_scale: Optional[float] = None):
        super().__init__()
        if not isinstance(space, SubnetSpace):
            raise TypeError(f"space must be a SubnetSpace, got {type(space).__name__}")
        if sharing not in SHARING_RULES:
            raise ValueError(f"sharing must be one of {SHARING_RULES}, got {sharing!r}")
        if isinstance(img_size, bool) or not isinstance(img_size, int) or img_size < 1:
            raise ValueError(f"img_size must be a positive int (square inputs), got {img_size!r}")
        for p in space.patch_sizes:
            if img_size % p:
                raise ValueError(f"img_size {img_size} must be divisible by every patch size, not by {p}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if softmax_scale is not None and (isinstance(softmax_scale, bool) or not isinstance(softmax_scale, numbers.Real)
                                          or not 0 < softmax_scale < math.inf):
            raise ValueError(f"softmax_scale must be None or a finite number > 0, got {softmax_scale!r}")
        self.softmax_scale = None if softmax_scale is None else float(softmax_scale)
        self.space, self.sharing, self.private_qk = space, sharing, bool(private_qk)
        self.img_size, self.in_chans, self.num_classes = img_size, in_chans, num_classes
        self.qkv_bias, self.norm_eps, self.backend = bool(qkv_bias), float(norm_eps), backend
        D, Q, M = space.embed_dims[-1], space.qkv_dims[-1], space.mlp_dims[-1]
        self.max_embed, self.max_qkv, self.max_mlp = D, Q, M

        self.patch_embed = nn.ModuleDict({str(p): ElasticLinear(in_chans * p * p, D, backend=backend)
                                          for p in space.patch_sizes})
        self.cls_token = nn.ParameterDict({str(p): nn.Parameter(torch.empty(1, 1, D)) for p in space.patch_sizes})
        self.pos_embed = nn.ParameterDict({str(p): nn.Parameter(torch.empty(1, 1 + (img_size // p) ** 2, D))
                                           for p in space.patch_sizes})
        self.blocks = nn.ModuleList([ElasticBlock(D, Q, M, space.heads, qkv_bias, self.private_qk, norm_eps, backend,
                                                  self.softmax_scale) for _ in range(space.num_slots)])
        self.norm = ElasticLayerNorm(D, eps=norm_eps, backend=backend)
        self.head = ElasticLinear(D, num_classes, backend=backend)
        self.init_weights()
        self._drop_path_rate = 0.0
        self.set_drop_path(drop_path_rate)
        self.set_subnet(space.largest())

    def init_weights(self) -> None:
        """``ViT``'s init (timm's default); the patch embeddings keep PyTorch's Conv2d init."""
        for p in self.pos_embed.values():
            nn.init.trunc_normal_(p, std=0.02)
        for p in self.cls_token.values():
            nn.init.normal_(p, std=1e-6)
        patch = set(self.patch_embed.values())
        for m in self.modules():
            if isinstance(m, ElasticLinear) and m not in patch:
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, ElasticLayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif m in patch:
                m.reset_parameters()

    def no_weight_decay(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.startswith(("pos_embed.", "cls_token."))}

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth ``rate`` (in [0, 1]) for the last active block, linear from 0 at the
        first over the active depth d (``rate * i / max(1, d - 1)``); slots past d get 0. The rate
        is kept: ``set_subnet`` re-spreads it over the new depth."""
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0.0 <= rate <= 1.0:
            raise ValueError(f"drop_path_rate must be a number in [0, 1], got {rate!r}")
        self._drop_path_rate = float(rate)
        self._spread_drop_path()

    def _spread_drop_path(self) -> None:
        slots = getattr(self, "slots", None)
        slots = range(len(self.blocks)) if slots is None else slots
        rates = [0.0] * len(self.blocks)
        for s, p in zip(slots, drop_path_rates(self._drop_path_rate, len(slots))):
            rates[s] = p
        for blk, p in zip(self.blocks, rates):
            blk.drop_path1.drop_prob = blk.drop_path2.drop_prob = p

    def _check_slots(self, slots: Optional[Sequence[int]], depth: int) -> tuple[int, ...]:
        """``slots`` as a tuple (default ``0..depth-1``): ``depth`` strictly increasing slot indices."""
        if slots is None:
            return tuple(range(depth))
        if isinstance(slots, (str, bytes)) or not isinstance(slots, Sequence):
            raise TypeError(f"slots must be a sequence of slot indices, got {type(slots).__name__}")
        out = tuple(slots)
        ok = (len(out) == depth and all(isinstance(k, int) and not isinstance(k, bool) for k in out)
              and all(0 <= k < len(self.blocks) for k in out) and all(a < b for a, b in zip(out, out[1:])))
        if not ok:
            raise ValueError(f"slots must be {depth} strictly increasing slot indices in [0, {len(self.blocks)}), "
                             f"got {slots!r}")
        return out

    # ------------------------------------------------------------------ sub-networks

    def channel_ranges(self, config: SubnetConfig) -> SubnetRanges:
        """The channel ranges ``config`` uses (validated against the space)."""
        cfg = self.space.validate(config)
        s = self.space
        qk_dims = [2 * q for q in s.qkv_dims]   # the private q/k weight: blocks of 2w rows over 2 * qkv_max
        return SubnetRanges(
            width_range(self.sharing, s.embed_dims, self.max_embed, cfg.embed_dim),
            tuple(width_range(self.sharing, s.qkv_dims, self.max_qkv, q) for q in cfg.qkv_dim),
            tuple(width_range(self.sharing, s.mlp_dims, self.max_mlp, m) for m in cfg.mlp_dim),
            tuple(width_range(self.sharing, qk_dims, 2 * self.max_qkv, 2 * q) for q in cfg.qkv_dim))

    def set_subnet(self, config: SubnetConfig, slots: Optional[Sequence[int]] = None) -> SubnetConfig:
        """Select the sub-network the next forwards run (``ValueError`` outside the space or for
        heads that do not divide a q/k/v width); returns the canonical config now active.

        ``slots``: the supernet slots its layers run in, in order (the others are identities).
        Default ``0..depth-1`` (ViTAS identity shifting); AutoProg's grown supernet keeps its old
        layers through ``models.growth.supernet_slots``."""
        cfg = self.space.validate(config)
        slots = self._check_slots(slots, cfg.depth)
        r = self.channel_ranges(cfg)
        # Full-width cyclic ranges run in natural channel order (``_natural``); forward_features
        # rotates its output back, so it returns the channels in the config's order. The private
        # q/k block (2w rows over 2 * qkv_max, q then k) is not a rotation of q and k alone: kept.
        e = _natural(r.embed, self.max_embed)
        self.patch_embed[str(cfg.patch_size)].set_range(None, e)
        for l, k in enumerate(slots):
            q = r.qkv[l] if self.private_qk else _natural(r.qkv[l], self.max_qkv, cfg.qkv_dim[l] // cfg.heads[l])
            self.blocks[k].set_subnet(e, q, cfg.heads[l], _natural(r.mlp[l], self.max_mlp), r.qk[l])
        self.norm.set_range(e)
        self.head.set_range(e, None)
        self.config, self.ranges, self.slots = cfg, r, slots
        self._embed_run = e
        self._spread_drop_path()
        return cfg

    def sample_subnet(self, generator: Optional[torch.Generator] = None, space: Optional[SubnetSpace] = None,
                      p_identity: Optional[float] = None) -> SubnetConfig:
        """``subnet.sample_subnet`` over ``space`` (default: this supernet's; a narrower one, e.g.
        AutoProg's candidates, is checked when its configs are set). Does not select the result."""
        return sample_subnet(generator, self.space if space is None else space, p_identity)

    def subnet_flops(self, config: Optional[SubnetConfig] = None, img_size: Optional[int] = None) -> int:
        """``subnet.subnet_flops`` (multiply-adds) of ``config`` (default: the active one)."""
        cfg = self.config if config is None else self.space.validate(config)
        return subnet_flops(cfg, self.img_size if img_size is None else img_size, in_chans=self.in_chans,
                            num_classes=self.num_classes)

    # ------------------------------------------------------------------ forward

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)``, H and W multiples of the patch -> normed tokens ``(B, 1 + N, embed_dim)``,
        channel j being the embed range's j-th channel."""
        t = self._tokens(x)
        o = self.ranges.embed[0]
        return t if self._embed_run[0] == o else torch.roll(t, -o, -1)

    def _tokens(self, x: Tensor) -> Tensor:
        """forward_features in the channel order the ops run in (``_embed_run``)."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"x must be a (B, {self.in_chans}, H, W) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        cfg, e = self.config, self._embed_run
        p, key = cfg.patch_size, str(cfg.patch_size)
        H, W = x.shape[-2:]
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not divisible by the patch size {p}")
        B = x.shape[0]
        t = self.patch_embed[key](_patches(x, p))
        grid = self.img_size // p
        pos = resample_pos_embed(_channels(self.pos_embed[key], e), (grid, grid), (H // p, W // p), 1)
        t = torch.cat([_channels(self.cls_token[key], e).expand(B, -1, -1), t], 1) + pos
        for k in self.slots:
            t = self.blocks[k](t)
        return self.norm(t)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> logits ``(B, num_classes)`` of the active sub-network."""
        return self.head(self._tokens(x)[:, 0])

    # ------------------------------------------------------------------ dense sub-networks

    def _slices(self, cfg: SubnetConfig, slots: Optional[Sequence[int]] = None) -> list[_Slice]:
        """Every dense ``ViT`` parameter of ``cfg`` (layer l in slot ``slots[l]``, default slot l) as
        index tensors into the shared parameters."""
        slots = self._check_slots(slots, cfg.depth)
        r = self.channel_ranges(cfg)
        dev = self.head.weight.device
        idx = lambda rng, size: channel_indices(rng, size, dev)  # noqa: E731
        e, p = idx(r.embed, self.max_embed), str(cfg.patch_size)
        out = [_Slice("patch_embed.proj.weight", None, self.patch_embed[p].weight, (e, None)),
               _Slice("patch_embed.proj.bias", None, self.patch_embed[p].bias, (e,)),
               _Slice("cls_token", None, self.cls_token[p], (None, None, e)),
               _Slice("pos_embed", None, self.pos_embed[p], (None, None, e)),
               _Slice("norm.weight", None, self.norm.weight, (e,)),
               _Slice("norm.bias", None, self.norm.bias, (e,)),
               _Slice("head.weight", None, self.head.weight, (None, e)),
               _Slice("head.bias", None, self.head.bias, (None,))]
        Q = self.max_qkv
        for l in range(cfg.depth):
            blk, pre, w = self.blocks[slots[l]], f"blocks.{l}.", cfg.qkv_dim[l]
            q, m = idx(r.qkv[l], Q), idx(r.mlp[l], self.max_mlp)
            for n in ("norm1", "norm2"):
                ln = getattr(blk, n)
                out += [_Slice(f"{pre}{n}.weight", None, ln.weight, (e,)),
                        _Slice(f"{pre}{n}.bias", None, ln.bias, (e,))]
            a = blk.attn
            if self.private_qk:
                qk = a.qk[str(cfg.heads[l])]
                parts = [(slice(0, 2 * w), qk, idx(r.qk[l], 2 * Q)), (slice(2 * w, 3 * w), a.v, q)]
            else:
                parts = [(None, a.qkv, torch.cat([q, q + Q, q + 2 * Q]))]
            for rows, lin, o in parts:
                out.append(_Slice(pre + "attn.qkv.weight", rows, lin.weight, (o, e)))
                if self.qkv_bias:
                    out.append(_Slice(pre + "attn.qkv.bias", rows, lin.bias, (o,)))
            fc1, fc2 = blk.mlp["fc1"], blk.mlp["fc2"]
            out += [_Slice(pre + "attn.proj.weight", None, a.proj.weight, (e, q)),
                    _Slice(pre + "attn.proj.bias", None, a.proj.bias, (e,)),
                    _Slice(pre + "mlp.fc1.weight", None, fc1.weight, (m, e)),
                    _Slice(pre + "mlp.fc1.bias", None, fc1.bias, (m,)),
                    _Slice(pre + "mlp.fc2.weight", None, fc2.weight, (e, m)),
                    _Slice(pre + "mlp.fc2.bias", None, fc2.bias, (e,))]
        return out

    def _dense_shell(self, cfg: SubnetConfig) -> ViT:
        vit = ViT(img_size=self.img_size, patch_size=cfg.patch_size, in_chans=self.in_chans,
                  num_classes=self.num_classes, embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=list(cfg.heads),
                  qkv_bias=self.qkv_bias, attn_dims=list(cfg.qkv_dim), mlp_dims=list(cfg.mlp_dim), class_token=True,
                  global_pool="token", drop_path_rate=self._drop_path_rate, norm_eps=self.norm_eps,
                  backend=self.backend)
        if self.softmax_scale is not None:  # a fixed supernet scale travels with the sub-network
            for blk in vit.blocks:
                blk.attn.scale = self.softmax_scale
        return vit

    @torch.no_grad()
    def extract_subnet(self, config: SubnetConfig, slots: Optional[Sequence[int]] = None) -> ViT:
        """A standalone dense ``ViT`` of ``config`` (same device and dtype) holding copies of its
        slices of the shared weights: its outputs equal this supernet's under
        ``set_subnet(config, slots)``. The copies are made once, here (index_select); the result
        shares no storage with the supernet."""
        cfg = self.space.validate(config)
        slots = self._check_slots(slots, cfg.depth)
        ref = self.head.weight
        vit = self._dense_shell(cfg).to(device=ref.device, dtype=ref.dtype)
        state = vit.state_dict()
        for s in self._slices(cfg, slots):
            t = s.src
            for dim, i in enumerate(s.index):
                if i is not None:
                    t = t.index_select(dim, i)
            dst = state[s.name] if s.rows is None else state[s.name][s.rows]
            dst.copy_(t.reshape(dst.shape))  # the patch weight (d, C*p*p) -> Conv2d's (d, C, p, p)
        vit.train(self.training)
        return vit

    @torch.no_grad()
    def load_subnet(self, config: SubnetConfig, model: ViT, slots: Optional[Sequence[int]] = None) -> "ElasticViT":
        """The inverse of ``extract_subnet``: write a dense ``ViT`` of ``config``'s shape into this
        supernet's slices (AutoProg recycling a trained sub-network). Channels outside ``config``
        are left as they are. Returns self."""
        cfg = self.space.validate(config)
        slots = self._check_slots(slots, cfg.depth)
        shell = self._dense_shell(cfg).state_dict()
        state = model.state_dict()
        if set(state) != set(shell) or any(state[k].shape != shell[k].shape for k in shell):
            raise ValueError("model does not have the shape of the dense ViT of this config")
        for s in self._slices(cfg, slots):
            src = state[s.name] if s.rows is None else state[s.name][s.rows]
            full = [torch.arange(n, device=s.src.device) if i is None else i for n, i in zip(s.src.shape, s.index)]
            grid = torch.meshgrid(*full, indexing="ij")
            s.src.index_put_(grid, src.to(s.src).reshape(grid[0].shape))
        return self

    # ------------------------------------------------------------------ growth

    @torch.no_grad()
    def grow(self, old_depth: int, new_depth: int, *, source: Optional["ElasticViT"] = None,
             old_slots: Optional[Sequence[int]] = None) -> "ElasticViT":
        """MoGrow depth growth in place (ALGORITHMS.md, AutoProg): old layer i is ``source``'s slot
        ``old_slots[i]`` (default ``0..old_depth-1``: the slots the model trained so far); after
        growth slot ``k < new_depth`` holds a copy of old layer ``new_layer_sources(old_depth,
        new_depth)[k]`` (whole slot: every width, every private q/k), and every non-block parameter
        is ``source``'s. ``source`` is the slowest EMA copy (an ElasticViT of the same shape;
        default self). Slots ``>= new_depth`` are left as they are. Widths need no growth operator
        here: the supernet already holds the widest. Returns self."""
        if not 1 <= new_depth <= self.space.num_slots:
            raise ValueError(f"new_depth must be in [1, {self.space.num_slots}] (the slots), got {new_depth}")
        layers = new_layer_sources(old_depth, new_depth)   # checks the depths
        old = self._check_slots(old_slots, old_depth)
        srcs = [old[i] for i in layers]
        src = self if source is None else source
        mine = self.state_dict()
        theirs = src.state_dict()
        if set(theirs) != set(mine) or any(theirs[k].shape != mine[k].shape for k in mine):
            raise ValueError("source must be an ElasticViT with the same parameters and shapes")
        # Snapshot first: with source=self, slot k may be read after an earlier slot was overwritten.
        theirs = {k: v.detach().clone() for k, v in theirs.items()}
        slot = re.compile(r"blocks\.(\d+)\.(.*)")
        for name, t in mine.items():
            m = slot.fullmatch(name)
            if m is None:
                t.copy_(theirs[name])
            elif int(m.group(1)) < new_depth:
                t.copy_(theirs[f"blocks.{srcs[int(m.group(1))]}.{m.group(2)}"])
        return self
