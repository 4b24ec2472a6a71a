"""Attention over variable token counts: flash-attn's varlen API (packed sequences, cu_seqlens) as a
torch.library custom op with autograd, over the torch / triton / cuda backends; and a padded
``(B, H, N, D)`` form with per-sample lengths."""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import backends
from . import _autocast, _transforms, _validate
from .packing import pack, unpack

Tensor = torch.Tensor
MAX_HEAD_DIM = 256


def _impl(backend: str):
    """(forward, backward) of varlen attention for ``backend``, imported on first use."""
    if backend == "triton":
        from ..triton import varlen_attention as m
    elif backend == "cuda":
        from ..cuda_backend import attention as m
    elif backend == "torch_flash":
        from ..torch_backend import flash_varlen as m
    else:
        from ..torch_backend import attention as m
    return m.varlen_forward, m.varlen_backward


def _last_dim_contiguous(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _max_len(cu: Tensor, given: int) -> int:
    """Backends that size grids by the longest sequence get it read here, once, if not given."""
    return given if given >= 0 else int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0


@torch.library.custom_op("asvit::varlen_attention", mutates_args=())
@_autocast.off
def _varlen_attention_op(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                         scale: float, causal: bool, backend: str) -> tuple[Tensor, Tensor]:
    forward, _ = _impl(backend)
    return forward(_last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v), cu_q, cu_k,
                   _max_len(cu_q, max_q), _max_len(cu_k, max_k), scale, causal)


@_varlen_attention_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, backend):
    stat = torch.float64 if q.dtype == torch.float64 and backend == "torch" else torch.float32
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=stat)


@torch.library.custom_op("asvit::varlen_attention_backward", mutates_args=())
@_autocast.off
def _varlen_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                  cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, scale: float,
                                  causal: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    _, backward = _impl(backend)
    c = _last_dim_contiguous
    return backward(c(dout), c(q), c(k), c(v), c(out), lse, cu_q, cu_k, _max_len(cu_q, max_q),
                    _max_len(cu_k, max_k), scale, causal)


@_varlen_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
    ctx.args = (max_q, max_k, scale, causal, backend)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_backward_op(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args)
    return dq, dk, dv, None, None, None, None, None, None, None


_varlen_attention_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- validation

def _check_cu(cu, name: str, device: torch.device) -> Tensor:
    if not isinstance(cu, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be int32 (or int64), got {cu.dtype}")
    if cu.dim() != 1 or cu.numel() < 1:
        raise ValueError(f"{name} must be 1-D (batch + 1,), got shape {tuple(cu.shape)}")
    if cu.device != device:
        raise ValueError(f"{name} is on {cu.device} but q is on {device}")
    return cu


def _check_cu_values(cu: Tensor, name: str, total: int) -> int:
    """One host read: starts at 0, never decreases, ends at the token count. Returns the longest
    length, so a caller that had to read the values gets it for free."""
    steps = cu[1:] - cu[:-1] if cu.numel() > 1 else cu.new_zeros(1)
    first, last, low, longest = torch.stack([cu[0], cu[-1], steps.min(), steps.max()]).tolist()
    if first != 0:
        raise ValueError(f"{name} must start at 0, got {first}")
    if low < 0:
        raise ValueError(f"{name} must be non-decreasing, got {cu.tolist()}")
    if last != total:
        raise ValueError(f"{name}[-1] ({last}) must equal the number of tokens ({total})")
    return longest


def _check_max(v, name: str) -> int:
    if v is None:
        return -1
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TypeError(f"{name} must be None or a non-negative int, got {v!r}")
    return v


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Optional[Tensor] = None,
                     max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, dropout_p: float = 0.0,
                     softmax_scale: Optional[float] = None, causal: bool = False, *,
                     backend: Optional[str] = None, return_lse: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over packed sequences of different lengths, one fused launch per pass.

    Positional order and meaning as flash-attn's ``flash_attn_varlen_func``.

    Args:
        q: ``(total_q, H, D)``; k, v: ``(total_k, H_kv, D)`` with ``H % H_kv == 0`` (GQA/MQA).
            float32/float16/bfloat16 (float64 on the torch backend); any head dim 1..256.
        cu_seqlens_q: int32 (int64 accepted) ``(batch + 1,)`` offsets of each sequence's queries.
        cu_seqlens_k: the same for keys; None means equal to ``cu_seqlens_q``.
        max_seqlen_q, max_seqlen_k: the longest lengths. Passing them avoids a host sync on GPU
            (and then ``cu_seqlens`` values are trusted, as in flash-attn); None reads them, and
            checks the values, with one sync.
        dropout_p: must be 0.0 (dropout is not implemented: NotImplementedError otherwise).
        softmax_scale: defaults to ``D ** -0.5``.
        causal: query i of a sequence sees key j iff ``j <= i + len_k - len_q`` (bottom-right).
        backend: None/"auto", "torch", "triton" or "cuda".
        return_lse: also return the log-sum-exp of each row's scaled scores, ``(H, total_q)``,
            float32 (float64 for float64 input), -inf for a row with no visible key; detached (its
            gradient is not propagated, as in flash-attn).

    Returns:
        ``(total_q, H, D)``. Rows of a sequence with no visible key are 0.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.tensor(t, name, ndim=3)
    q, k, v = _autocast.matmul_inputs(q.device, q, k, v)   # as SDPA under torch.autocast
    _validate.same_device_dtype(q, "q", k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    total_q, H, D = q.shape
    H_kv = k.shape[1]
    if k.shape[2] != D:
        raise ValueError(f"head dims differ: q has {D}, k and v have {k.shape[2]}")
    if not 1 <= D <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {D}")
    if H_kv == 0 or H % H_kv:
        raise ValueError(f"q's heads ({H}) must be a multiple of k/v's heads ({H_kv})")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if dropout_p != 0.0:
        raise NotImplementedError(f"dropout_p={dropout_p}: attention dropout is not implemented; use 0.0")
    if softmax_scale is None:
        softmax_scale = D ** -0.5
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale):
        raise TypeError(f"softmax_scale must be None or a finite float, got {softmax_scale!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    cu_q = _check_cu(cu_seqlens_q, "cu_seqlens_q", q.device)
    cu_k = cu_q if cu_seqlens_k is None else _check_cu(cu_seqlens_k, "cu_seqlens_k", q.device)
    if cu_k.numel() != cu_q.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
                         f"got {cu_q.numel()} and {cu_k.numel()}")
    if cu_seqlens_k is None and k.shape[0] != total_q:
        raise ValueError(f"cu_seqlens_k=None needs as many keys as queries, got {k.shape[0]} and {total_q}")
    max_q, max_k = _check_max(max_seqlen_q, "max_seqlen_q"), _check_max(max_seqlen_k, "max_seqlen_k")
    if cu_seqlens_k is None and max_k < 0:
        max_k = max_q
    # Values need a host read: always on CPU, on GPU only when the lengths were not given anyway.
    if not torch.compiler.is_compiling() and (q.device.type == "cpu" or max_q < 0 or max_k < 0):
        longest_q = _check_cu_values(cu_q, "cu_seqlens_q", total_q)
        longest_k = longest_q if cu_seqlens_k is None else _check_cu_values(cu_k, "cu_seqlens_k", k.shape[0])
        max_q, max_k = (longest_q if max_q < 0 else max_q), (longest_k if max_k < 0 else max_k)
    impl = backends.pick("varlen_attention", q.device, backend, q.dtype, head_dim=D)
    if _transforms.active():
        if return_lse:  # the composite form computes no statistics
            raise NotImplementedError("return_lse=True is not supported under torch.func transforms")
        from ..torch_backend.attention import varlen_composite
        return varlen_composite(q, k, v, cu_q, cu_k, float(softmax_scale), causal)
    out, lse = _varlen_attention_op(q, k, v, cu_q.to(torch.int32), cu_k.to(torch.int32), max_q, max_k,
                                    float(softmax_scale), causal, impl)
    return (out, lse.detach()) if return_lse else out


def attention(q: Tensor, k: Tensor, v: Tensor, seq_lens=None, *, softmax_scale: Optional[float] = None,
              causal: bool = False, backend: Optional[str] = None) -> Tensor:
    """Padded-batch attention ``(B, H, N, D)`` (SDPA layout) with ``seq_lens[b]`` valid tokens per
    sample: keys at or past a sample's length are masked and query rows past it return zeros.
    Runs as one packed varlen launch, so padding costs no compute."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.tensor(t, name, ndim=4)
    if not (q.shape[0] == k.shape[0] == v.shape[0] and q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"q, k and v must share B and N: got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, _, N, _ = q.shape
    lens = [N] * B if seq_lens is None else seq_lens
    (pq, cu, max_len), (pk, _, _), (pv, _, _) = (pack(t.transpose(1, 2), lens) for t in (q, k, v))
    out = varlen_attention(pq, pk, pv, cu, cu, max_len, max_len, 0.0, softmax_scale, causal, backend=backend)
    return unpack(out, cu, N).transpose(1, 2)
