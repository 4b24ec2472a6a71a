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


def _extras(window_left: int, window_right: int, softcap: float, alibi: Optional[Tensor], dropout_p: float,
            seed: int) -> dict:
    """The backend keywords of flash-attn's features, only when one is used: plain calls reach the
    backends exactly as before (the cuda backend takes none of them)."""
    if (window_left, window_right) == (-1, -1) and softcap == 0.0 and alibi is None and dropout_p == 0.0:
        return {}
    return dict(window=(window_left, window_right), softcap=softcap, alibi=alibi, dropout_p=dropout_p, seed=seed)


def _forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool, backend: str,
             window_left: int = -1, window_right: int = -1, softcap: float = 0.0, alibi: Optional[Tensor] = None,
             dropout_p: float = 0.0, seed: int = 0) -> tuple[Tensor, Tensor]:
    out, lse, _ = _forward_checked(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, backend, window_left,
                                   window_right, softcap, alibi, dropout_p, seed)
    return out, lse


@_autocast.off
def _forward_checked(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool, backend: str,
                     window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                     alibi: Optional[Tensor] = None, dropout_p: float = 0.0, seed: int = 0):
    """(out, lse, inputs_finite): the torch backend says whether it found q, k, v finite, so its
    backward need not read them again (``inputs_finite``); other backends say False."""
    c = _last_dim_contiguous
    args = (c(q), c(k), c(v), cu_q, cu_k, _max_len(cu_q, max_q), _max_len(cu_k, max_k), scale, causal)
    extras = _extras(window_left, window_right, softcap, alibi, dropout_p, seed)
    if backend == "torch":
        from ..torch_backend.attention import varlen_forward_checked
        return varlen_forward_checked(*args, **extras)
    forward, _ = _impl(backend)
    return (*forward(*args, **extras), False)


@_autocast.off
def _backward_body(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool,
                   backend: str, window_left: int = -1, window_right: int = -1, softcap: float = 0.0,
                   alibi: Optional[Tensor] = None, dropout_p: float = 0.0, seed: int = 0,
                   inputs_finite: bool = False):
    _, backward = _impl(backend)
    c = _last_dim_contiguous
    extras = _extras(window_left, window_right, softcap, alibi, dropout_p, seed)
    if inputs_finite:  # only the torch backend reports it (``_forward_checked``)
        extras["inputs_finite"] = True
    return backward(c(dout), c(q), c(k), c(v), c(out), lse, cu_q, cu_k, _max_len(cu_q, max_q),
                    _max_len(cu_k, max_k), scale, causal, **extras)


@_autocast.off
def _full_attention(q, k, v, cu_q, cu_k, scale: float) -> Optional[Tensor]:
    """The torch backend's stock-autograd path for plain full attention (``full_attention``), or
    None where it does not apply."""
    from ..torch_backend.attention import full_attention
    c = _last_dim_contiguous
    return full_attention(c(q), c(k), c(v), cu_q, cu_k, scale)


@torch.library.custom_op("asvit::varlen_attention", mutates_args=())
def _varlen_attention_op(q: Tensor, k: Tensor, v: Tensor, cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int,
                         scale: float, causal: bool, backend: str, window_left: int = -1, window_right: int = -1,
                         softcap: float = 0.0, alibi: Optional[Tensor] = None, dropout_p: float = 0.0,
                         seed: int = 0) -> tuple[Tensor, Tensor]:
    return _forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, backend, window_left, window_right, softcap,
                    alibi, dropout_p, seed)


@_varlen_attention_op.register_fake
def _(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, backend, *extras):
    stat = torch.float64 if q.dtype == torch.float64 and backend == "torch" else torch.float32
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=stat)


@torch.library.custom_op("asvit::varlen_attention_backward", mutates_args=())
def _varlen_attention_backward_op(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                                  cu_q: Tensor, cu_k: Tensor, max_q: int, max_k: int, scale: float,
                                  causal: bool, backend: str, window_left: int = -1, window_right: int = -1,
                                  softcap: float = 0.0, alibi: Optional[Tensor] = None, dropout_p: float = 0.0,
                                  seed: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_body(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, backend, window_left,
                          window_right, softcap, alibi, dropout_p, seed)


@_varlen_attention_backward_op.register_fake
def _(dout, q, k, v, out, lse, *rest):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, backend, wl, wr, softcap, alibi, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi)
    # The same seed: the backward regenerates the forward's dropout mask.
    ctx.args = (max_q, max_k, scale, causal, backend, wl, wr, softcap)
    ctx.dropout = (dropout_p, seed)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi = ctx.saved_tensors
    dq, dk, dv = _varlen_attention_backward_op(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args, alibi, *ctx.dropout)
    return (dq, dk, dv) + (None,) * 13


_varlen_attention_op.register_autograd(_backward, setup_context=_setup)


class _EagerAttention(torch.autograd.Function):
    """The same forward and backward bodies as the custom ops, without their dispatch (plain eager)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, *args):
        out, lse, ctx.inputs_finite = _forward_checked(q, k, v, cu_q, cu_k, *args)
        _setup(ctx, (q, k, v, cu_q, cu_k, *args), (out, lse))
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for lse: nothing reads it
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        if dout is None:  # an undefined output gradient (gradcheck tests for it): zero gradients
            return (None,) * 16
        q, k, v, out, lse, cu_q, cu_k, alibi = ctx.saved_tensors
        dq, dk, dv = _backward_body(dout, q, k, v, out, lse, cu_q, cu_k, *ctx.args, alibi, *ctx.dropout,
                                    ctx.inputs_finite)
        return (dq, dk, dv) + (None,) * 13


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
    length, so a caller that had to read the values gets it for free. (Checked on a Python list:
    one read and no small tensor ops, ~10x cheaper than reducing on the tensor for ViT batches.)"""
    vals = cu.tolist()
    steps = [b - a for a, b in zip(vals, vals[1:])] or [0]
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    if min(steps) < 0:
        raise ValueError(f"{name} must be non-decreasing, got {vals}")
    if vals[-1] != total:
        raise ValueError(f"{name}[-1] ({vals[-1]}) must equal the number of tokens ({total})")
    return max(steps)


def _int32(cu: Tensor) -> Tensor:
    return cu if cu.dtype == torch.int32 else cu.to(torch.int32)   # a no-op .to() still costs a dispatch


def _check_max(v, name: str) -> int:
    if v is None:
        return -1
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise TypeError(f"{name} must be None or a non-negative int, got {v!r}")
    return v


def _check_dropout(p) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {p}")
    return float(p)


def _check_window(window) -> tuple[int, int]:
    if not isinstance(window, (tuple, list)) or len(window) != 2 \
            or any(isinstance(w, bool) or not isinstance(w, int) for w in window):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window!r}")
    if min(window) < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1: unbounded), got {tuple(window)}")
    return int(window[0]), int(window[1])


def _check_softcap(softcap) -> float:
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not 0.0 <= softcap < math.inf:
        raise ValueError(f"softcap must be finite and >= 0 (0: off), got {softcap}")
    return float(softcap)


def _check_alibi(alibi, batch: int, H: int, device: torch.device) -> Optional[Tensor]:
    """flash-attn's (H,) or (batch, H) float32 slopes as (batch, H), contiguous; no gradient."""
    if alibi is None:
        return None
    if not isinstance(alibi, Tensor):
        raise TypeError(f"alibi_slopes must be None or a torch.Tensor, got {type(alibi).__name__}")
    if alibi.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32 (as in flash-attn), got {alibi.dtype}")
    if tuple(alibi.shape) not in ((H,), (batch, H)):
        raise ValueError(f"alibi_slopes must be (H,) = ({H},) or (batch, H) = ({batch}, {H}), "
                         f"got {tuple(alibi.shape)}")
    if alibi.device != device:
        raise ValueError(f"alibi_slopes is on {alibi.device} but q is on {device}")
    return alibi.detach().expand(batch, H).contiguous()


def _draw_seed(generator, device: torch.device) -> int:
    """The dropout seed, an int in [0, 2**31), from ``generator`` (default: the default generator of
    q's device; on CUDA reading it costs one device-to-host sync)."""
    if generator is not None:
        device = generator.device
    if device.type == "meta":  # shapes only: no mask is ever drawn
        return 0
    return int(torch.randint(0, 2 ** 31, (1,), device=device, generator=generator).item())


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Optional[Tensor] = None,
                     max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None, dropout_p: float = 0.0,
                     softmax_scale: Optional[float] = None, causal: bool = False,
                     window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                     alibi_slopes: Optional[Tensor] = None, deterministic: bool = False, *,
                     backend: Optional[str] = None, return_lse: bool = False,
                     generator: Optional[torch.Generator] = None) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over packed sequences of different lengths, one fused launch per pass.

    Positional order and meaning as flash-attn's ``flash_attn_varlen_func`` (up to
    ``deterministic``); the features follow flash-attn >= 2.6 (the float64 reference is
    ``asvit_kernels.reference.attention.varlen_attention_features``). Per sequence, with
    ``i' = i + len_k - len_q`` (bottom-right alignment):

    Args:
        q: ``(total_q, H, D)``; k, v: ``(total_k, H_kv, D)`` with ``H % H_kv == 0`` (GQA/MQA).
            float32/float16/bfloat16 (float64 on the torch backend); any head dim 1..256.
        cu_seqlens_q: int32 (int64 accepted) ``(batch + 1,)`` offsets of each sequence's queries.
        cu_seqlens_k: the same for keys; None means equal to ``cu_seqlens_q``.
        max_seqlen_q, max_seqlen_k: the longest lengths. Passing them avoids a host sync on GPU
            (and then ``cu_seqlens`` values are trusted, as in flash-attn); None reads them, and
            checks the values, with one sync.
        dropout_p: in [0, 1): each probability is kept with probability ``1 - dropout_p`` and
            scaled by ``1 / (1 - dropout_p)``; the backward regenerates the same mask from the
            same seed. The mask comes from each backend's own RNG (torch: a counter-based hash,
            Triton: Philox), so dropout outputs differ between backends; each backend's
            ``dropout_keep_mask`` returns it, for tests.
        softmax_scale: defaults to ``D ** -0.5``.
        causal: query i of a sequence sees key j iff ``j <= i'``. Folds into the window as
            ``right = 0`` (and a ``(-1, 0)`` window is causal), as in flash-attn.
        window_size: ``(left, right)`` local attention: key j is seen iff
            ``i' - left <= j <= i' + right``; -1 leaves that side unbounded.
        softcap: > 0 caps the scaled scores: ``s = softcap * tanh(s / softcap)``; 0 is off.
        alibi_slopes: float32 ``(H,)`` or ``(batch, H)`` on q's device: ``s -= slope * |i' - j|``
            (after softcap). No gradient flows to them (as in flash-attn).
        deterministic: accepted for flash-attn compatibility; changes nothing, because every
            backward here is deterministic (no atomics).
        backend: None/"auto", "torch", "triton", "cuda" or "torch_flash". The cuda extension
            and torch_flash implement none of the features: a call using one skips them under
            auto and raises ``RuntimeError`` naming the feature when one is asked for explicitly.
        return_lse: also return the log-sum-exp of each row's scores (after softcap and ALiBi,
            before dropout), ``(H, total_q)``, float32 (float64 for float64 input), -inf for a
            row with no visible key; detached (its gradient is not propagated, as in flash-attn).
        generator: the ``torch.Generator`` the dropout seed is drawn from (one int per call, only
            when ``dropout_p > 0``); default: the default generator of q's device, which on CUDA
            costs one device-to-host sync.

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
    dropout_p = _check_dropout(dropout_p)
    if softmax_scale is None:
        softmax_scale = D ** -0.5
    elif isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale):
        raise TypeError(f"softmax_scale must be None or a finite float, got {softmax_scale!r}")
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    left, right = _check_window(window_size)
    softcap = _check_softcap(softcap)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be None or a torch.Generator, got {type(generator).__name__}")
    cu_q = _check_cu(cu_seqlens_q, "cu_seqlens_q", q.device)
    same_cu = cu_seqlens_k is None or cu_seqlens_k is cu_seqlens_q   # self-attention: checked once
    cu_k = cu_q if same_cu else _check_cu(cu_seqlens_k, "cu_seqlens_k", q.device)
    if cu_k.numel() != cu_q.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1), "
                         f"got {cu_q.numel()} and {cu_k.numel()}")
    if cu_seqlens_k is None and k.shape[0] != total_q:
        raise ValueError(f"cu_seqlens_k=None needs as many keys as queries, got {k.shape[0]} and {total_q}")
    alibi = _check_alibi(alibi_slopes, cu_q.numel() - 1, H, q.device)
    max_q, max_k = _check_max(max_seqlen_q, "max_seqlen_q"), _check_max(max_seqlen_k, "max_seqlen_k")
    if cu_seqlens_k is None and max_k < 0:
        max_k = max_q
    # Values need a host read: always on CPU, on GPU only when the lengths were not given anyway.
    if not torch.compiler.is_compiling() and (q.device.type == "cpu" or max_q < 0 or max_k < 0):
        longest_q = _check_cu_values(cu_q, "cu_seqlens_q", total_q)
        longest_k = longest_q if same_cu and k.shape[0] == total_q else \
            _check_cu_values(cu_k, "cu_seqlens_k", k.shape[0])
        max_q, max_k = (longest_q if max_q < 0 else max_q), (longest_k if max_k < 0 else max_k)
    # flash-attn: causal means right = 0, and a (-1, 0) window is causal.
    right = 0 if causal else right
    causal = causal or (left, right) == (-1, 0)
    window = (left, right) if (left, right) != ((-1, 0) if causal else (-1, -1)) else (-1, -1)
    used = [name for name, on in (("window", window != (-1, -1)), ("softcap", softcap > 0),
                                  ("alibi", alibi is not None), ("dropout", dropout_p > 0)) if on]
    if used and window == (-1, -1) and causal:
        window = (-1, 0)  # the backends get the folded window whenever a feature is used
    impl = backends.pick("varlen_attention", q.device, backend, q.dtype, head_dim=D, features=used)
    seed = _draw_seed(generator, q.device) if dropout_p > 0 else 0
    if _transforms.active():
        if return_lse:  # the composite form computes no statistics
            raise NotImplementedError("return_lse=True is not supported under torch.func transforms")
        from ..torch_backend.attention import varlen_composite
        return varlen_composite(q, k, v, cu_q, cu_k, float(softmax_scale), causal,
                                **_extras(*window, softcap, alibi, dropout_p, seed))
    if impl == "torch" and not (causal or used or return_lse) and _transforms.plain_eager():
        out = _full_attention(q, k, v, cu_q, cu_k, float(softmax_scale))
        if out is not None:
            return out
    # meta tensors (shape-only passes) need the custom op's fake implementation
    call = _EagerAttention.apply if _transforms.plain_eager() and q.device.type != "meta" else _varlen_attention_op
    out, lse = call(q, k, v, _int32(cu_q), _int32(cu_k), max_q, max_k, float(softmax_scale), causal,
                    impl, *window, softcap, alibi, dropout_p, seed)
    return (out, lse.detach()) if return_lse else out


def attention(q: Tensor, k: Tensor, v: Tensor, seq_lens=None, *, softmax_scale: Optional[float] = None,
              causal: bool = False, backend: Optional[str] = None) -> Tensor:
    """Padded-batch attention ``(B, H, N, D)`` (SDPA layout) with ``seq_lens[b]`` valid tokens per
    sample: keys at or past a sample's length are masked and query rows past it return zeros.
    Runs as one packed varlen launch, so padding costs no compute. flash-attn's features
    (window, softcap, ALiBi, dropout) are not offered here: use ``varlen_attention`` or
    ``asvit_kernels.compat.flash_attn_func``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _validate.tensor(t, name, ndim=4)
    if not (q.shape[0] == k.shape[0] == v.shape[0] and q.shape[2] == k.shape[2] == v.shape[2]):
        raise ValueError(f"q, k and v must share B and N: got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, _, N, _ = q.shape
    lens = [N] * B if seq_lens is None else seq_lens
    (pq, cu, max_len), (pk, _, _), (pv, _, _) = (pack(t.transpose(1, 2), lens) for t in (q, k, v))
    out = varlen_attention(pq, pk, pv, cu, cu, max_len, max_len, 0.0, softmax_scale, causal, backend=backend)
    return unpack(out, cu, N).transpose(1, 2)
