"""timm-compatible multi-head self-attention on the fused varlen kernels.

``Attention`` takes timm's ``timm.layers.Attention`` constructor arguments and its call
``forward(x, attn_mask=None, is_causal=False)``, with the same parameter names (``qkv``, ``q_norm``,
``k_norm``, ``norm``, ``gate``, ``proj``), so a timm ViT's state dict loads unchanged,
``timm.create_model(..., attn_layer=Attention)`` builds with it, and ``patch_timm`` swaps the
attention of a built timm model in place.
"""

import copy
import logging
import sys
from typing import Final, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import varlen_attention

log = logging.getLogger(__name__)
Tensor = torch.Tensor

# The child modules of timm's Attention (timm 1.0.25 .. 1.0.31) that ours reproduces; patch_timm
# refuses an instance with any other child, since its forward would use something ours does not.
TIMM_CHILDREN = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop")


def _register_fx_leaf() -> None:
    """Make timm's FX feature extraction keep ``Attention`` as one leaf call, as timm does for its
    own layers. Only when timm is already imported: importing it here would pull in torchvision."""
    fx = sys.modules.get("timm.layers._fx")
    if fx is not None and hasattr(fx, "register_notrace_module"):
        fx.register_notrace_module(Attention)  # adds to a set: repeating it is harmless


class Attention(nn.Module):
    """Self-attention over ``(B, N, C)`` tokens, or packed ``(total, C)`` ones with ``cu_seqlens``.

    Args (timm's, same order and defaults): ``dim``, ``num_heads``, ``attn_head_dim`` (default
    ``dim // num_heads``), ``dim_out`` (default ``dim``), ``qkv_bias``, ``qk_norm``, ``scale_norm``
    (a norm of the attention output before ``proj``), ``proj_bias``, ``gated`` (timm 1.0.31:
    output times ``sigmoid(gate(x))``), ``attn_drop``, ``proj_drop``, ``norm_layer`` (needed by
    ``qk_norm`` / ``scale_norm``), ``device``, ``dtype``.
    Keyword-only extras: ``attn_dim`` (the width of each of q, k and v, ``num_heads * head_dim``;
    ViTAS sub-networks) and ``backend`` of the kernels.

    ``fused_attn`` is always True (there is no unfused path). Attention dropout ``attn_drop > 0``
    in training runs inside the kernels (``varlen_attention``'s ``dropout_p``, the seed drawn from
    torch's default generator of the input's device; the mask is the backend's own RNG, not
    SDPA's), and in the ``attn_mask`` fallback as SDPA's dropout.
    """

    fused_attn: Final[bool]

    def __init__(self, dim: int, num_heads: int = 8, attn_head_dim: Optional[int] = None,
                 dim_out: Optional[int] = None, qkv_bias: bool = False, qk_norm: bool = False,
                 scale_norm: bool = False, proj_bias: bool = True, gated: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, norm_layer: Optional[type] = None, device=None, dtype=None, *,
                 attn_dim: Optional[int] = None, backend: Optional[str] = None):
        super().__init__()
        for name, v in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name, v in (("attn_head_dim", attn_head_dim), ("dim_out", dim_out), ("attn_dim", attn_dim)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ValueError(f"{name} must be None or a positive int, got {v!r}")
        if attn_head_dim is not None:
            if attn_dim is not None and attn_dim != num_heads * attn_head_dim:
                raise ValueError(f"attn_dim ({attn_dim}) must equal num_heads * attn_head_dim "
                                 f"({num_heads} * {attn_head_dim})")
            attn_dim = num_heads * attn_head_dim
        attn_dim = dim if attn_dim is None else attn_dim
        if attn_dim % num_heads:
            raise ValueError(f"attention width ({attn_dim}) must be divisible by num_heads ({num_heads})")
        if (qk_norm or scale_norm) and norm_layer is None:
            raise ValueError("norm_layer must be given when qk_norm or scale_norm is True (as in timm)")
        dd = {"device": device, "dtype": dtype}
        self.num_heads, self.head_dim, self.attn_dim = num_heads, attn_dim // num_heads, attn_dim
        self.scale = self.head_dim ** -0.5
        self.backend = backend
        self.fused_attn = True
        self.qkv = nn.Linear(dim, attn_dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(attn_dim, dim if dim_out is None else dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        _register_fx_leaf()

    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False, *,
                cu_seqlens: Optional[Tensor] = None, max_seqlen: Optional[int] = None) -> Tensor:
        """timm's call: ``x (B, N, C)``; ``attn_mask`` as SDPA takes it (bool, True = may attend,
        or additive float; broadcast to ``(B, H, N, N)``); ``is_causal``. Keyword-only, for packed
        sequences: ``x (total, C)`` with int32 ``cu_seqlens (n + 1,)`` and optional ``max_seqlen``.

        A mask that only hides keys (the same for every head and query: key padding) runs through
        the varlen kernel with the hidden keys left out; any other mask runs through
        ``F.scaled_dot_product_attention``. A query that sees no key returns 0, as SDPA does."""
        return self._forward(x, attn_mask, is_causal, cu_seqlens, max_seqlen)

    def _forward(self, x: Tensor, attn_mask: Optional[Tensor], is_causal: bool, cu_seqlens: Optional[Tensor],
                 max_seqlen: Optional[int]) -> Tensor:
        _check_call(x, attn_mask, is_causal, cu_seqlens)
        q, k, v = self.qkv(x).reshape(-1, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = self.q_norm(q), self.k_norm(k)
        p = self.attn_drop.p if self.training else 0.0
        o = self.norm(_attend(x, q, k, v, attn_mask, is_causal, cu_seqlens, max_seqlen, self.scale, p, self.backend))
        if self.gate is not None:
            o = o * self.gate(x).sigmoid()
        return self.proj_drop(self.proj(o))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend}"

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` compiles a twin sharing these submodules whose ``forward`` is timm's
        call without the keyword-only varlen extras (TorchScript cannot compile keyword-only
        arguments). The attention itself runs as an ignored Python call, so a scripted model runs
        from Python but cannot be saved with ``torch.jit.save``."""
        twin = copy.copy(self)
        twin.__class__ = _ScriptableAttention
        return twin


class _ScriptableAttention(Attention):
    def forward(self, x: Tensor, attn_mask: Optional[Tensor] = None, is_causal: bool = False) -> Tensor:
        return self._forward(x, attn_mask, is_causal, None, None)

    def __prepare_scriptable__(self) -> nn.Module:
        return self


@torch.jit.ignore
def _check_call(x: Tensor, attn_mask: Optional[Tensor], is_causal: bool, cu_seqlens: Optional[Tensor]) -> None:
    """Argument checks of ``Attention.forward`` (Python, outside TorchScript)."""
    if not isinstance(is_causal, bool):
        raise TypeError(f"is_causal must be a bool, got {type(is_causal).__name__}")
    packed = cu_seqlens is not None
    if packed and x.dim() != 2:
        raise ValueError(f"with cu_seqlens, x must be packed (total, C), got shape {tuple(x.shape)}")
    if not packed and x.dim() != 3:
        raise ValueError(f"x must be (B, N, C) (or packed (total, C) with cu_seqlens), got {tuple(x.shape)}")
    if packed and attn_mask is not None:
        raise ValueError("attn_mask cannot be combined with packed input (cu_seqlens): pack only the kept tokens")
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal=True are mutually exclusive (as in SDPA): fold the causal "
                         "mask into attn_mask")


@torch.jit.ignore
def _attend(x: Tensor, q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
            cu_seqlens: Optional[Tensor], max_seqlen: Optional[int], scale: float, p: float,
            backend: Optional[str]) -> Tensor:
    """q, k, v ``(total, H, D)`` of tokens ``x`` -> the attention output ``(*x.shape[:-1], H * D)``.
    Python, kept out of TorchScript (``torch.jit.ignore``): it dispatches to custom ops."""
    lead = x.shape[:-1]
    cu_k, max_k = cu_seqlens, max_seqlen
    if cu_seqlens is None:  # B equal-length sequences: uniform offsets, no host sync
        B, N = lead
        cu_seqlens = cu_k = torch.arange(B + 1, device=x.device, dtype=torch.int32) * N
        max_seqlen = max_k = N
        if attn_mask is not None:
            keep = _key_padding(attn_mask, B, q.shape[1], N)
            if keep is None:
                return _sdpa(q, k, v, attn_mask, B, N, scale, p)
            lens = keep.sum(1, dtype=torch.int32)
            cu_k = torch.cat([lens.new_zeros(1), lens.cumsum(0, dtype=torch.int32)])
            max_k = int(lens.max()) if B else 0  # one host read, for the kernels' grid
            keep = keep.reshape(-1)
            k, v = k[keep], v[keep]
    o = varlen_attention(q, k, v, cu_seqlens, cu_k, max_seqlen, max_k, p, scale, is_causal, backend=backend)
    return o.reshape(*lead, -1)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, B: int, N: int, scale: float, p: float) -> Tensor:
    """The fallback for masks that are not key padding: SDPA on ``(B, H, N, D)``."""
    H, D = q.shape[1:]
    q, k, v = (t.reshape(B, N, H, D).transpose(1, 2) for t in (q, k, v))
    if mask.dtype != torch.bool:
        mask = mask.to(q.dtype)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
    return o.transpose(1, 2).reshape(B, N, H * D)

# Plain torch.fx.symbolic_trace records these two as single calls (their Python branches on the
# arguments cannot run on proxies); timm's tracer keeps the whole module as a leaf anyway.
torch.fx.wrap("_check_call")
torch.fx.wrap("_attend")


def _key_padding(mask: Tensor, B: int, H: int, N: int) -> Optional[Tensor]:
    """``(B, N)`` bool of the keys each sample may attend when ``mask`` (SDPA's: bool, True = keep,
    or additive float) is the same for every head and query and only keeps or hides keys (float:
    values 0 or -inf); None when it is any other mask. Checks shape and dtype (errors name
    ``attn_mask``)."""
    if not isinstance(mask, Tensor):
        raise TypeError(f"attn_mask must be None or a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask must be bool or floating point, got {mask.dtype}")
    try:
        ok = mask.dim() <= 4 and torch.broadcast_shapes(mask.shape, (B, H, N, N)) == (B, H, N, N)
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"attn_mask of shape {tuple(mask.shape)} does not broadcast to (B, heads, N, N) = "
                         f"{(B, H, N, N)}")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    rows = m[:, :1, :1, :]
    if (m.shape[1] > 1 or m.shape[2] > 1) and not torch.equal(m, rows.expand_as(m)):
        return None
    rows = rows.reshape(rows.shape[0], N).expand(B, N)
    if mask.dtype == torch.bool:
        return rows
    keep = rows == 0
    if not bool((keep | (rows == float("-inf"))).all()):
        return None
    return keep


def patch_timm(model: nn.Module, backend: Optional[str] = None, *, return_count: bool = False):
    """Replace, in place, every ``timm.layers.Attention`` in ``model`` with ours, reusing its
    submodules (same parameters, no copies). Returns ``model`` (``(model, count)`` with
    ``return_count=True``; ``count_patched(model)`` counts ours later).

    Only instances of timm's own ``Attention`` whose ``forward`` is timm's are swapped: models
    with attention classes of their own (beit, tiny_vit, efficientformer, eva, ...) are left as
    they are. An instance with a child module ours does not reproduce raises ``ValueError``
    naming it. Without timm imported, nothing can be a timm module: ``model`` is returned as is.
    """
    timm_attn = sys.modules.get("timm.layers.attention")
    timm_cls = getattr(timm_attn, "Attention", None)
    replaced = 0
    if timm_cls is not None:
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if not isinstance(child, timm_cls) or type(child).forward is not timm_cls.forward:
                    continue
                setattr(parent, name, _from_timm(child, backend))
                replaced += 1
    log.info("patch_timm: %d attention modules replaced", replaced)
    return (model, replaced) if return_count else model


def count_patched(model: nn.Module) -> int:
    """How many ``asvit_kernels.nn.Attention`` modules ``model`` has."""
    return sum(isinstance(m, Attention) for m in model.modules())


def _from_timm(child: nn.Module, backend: Optional[str]) -> Attention:
    unknown = sorted(set(n for n, _ in child.named_children()) - set(TIMM_CHILDREN))
    if unknown:
        raise ValueError(f"patch_timm: {type(child).__module__}.{type(child).__name__} has modules "
                         f"{unknown} that asvit_kernels.nn.Attention does not implement")
    qkv, proj = child.qkv, child.proj
    attn_dim = child.num_heads * child.head_dim
    if qkv.out_features != 3 * attn_dim or proj.in_features != attn_dim:
        raise ValueError(f"patch_timm: qkv {tuple(qkv.weight.shape)} / proj {tuple(proj.weight.shape)} do not match "
                         f"num_heads * head_dim = {attn_dim}")
    # Built on the meta device (nothing allocated), then given the timm module's own submodules.
    new = Attention(qkv.in_features, child.num_heads, attn_dim=attn_dim, dim_out=proj.out_features,
                    qkv_bias=qkv.bias is not None, proj_bias=proj.bias is not None,
                    gated=getattr(child, "gate", None) is not None, device="meta", backend=backend)
    for attr in TIMM_CHILDREN:
        if hasattr(child, attr):
            setattr(new, attr, getattr(child, attr))
    new.scale = child.scale
    new.train(child.training)
    return new
