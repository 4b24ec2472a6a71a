"""Drop-in replacements for flash-attn 2's attention entry points, so an existing codebase switches
with one import line: ``from asvit_kernels.compat import flash_attn_varlen_func``.

Same names, positional order, defaults, layouts and return values as ``flash_attn``:

- ``flash_attn_func(q, k, v, ...)``: q ``(B, N_q, H, D)``, k/v ``(B, N_k, H_kv, D)``;
- ``flash_attn_qkvpacked_func(qkv, ...)``: qkv ``(B, N, 3, H, D)``;
- ``flash_attn_kvpacked_func(q, kv, ...)``: kv ``(B, N_k, 2, H_kv, D)``;
- ``flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)``:
  packed ``(total, H, D)``;
- ``flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, ...)``: qkv ``(total, 3, H, D)``;
- ``flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, ...)``.

Each returns ``out`` shaped like q, or with ``return_attn_probs=True`` ``(out, softmax_lse, None)``:
``softmax_lse`` is ``(B, H, N_q)`` for the padded functions and ``(H, total_q)`` for the varlen ones,
float32 (float64 for float64 input, which flash-attn does not take), detached like flash-attn's
(its gradient is not propagated). The third element, the attention probabilities flash-attn
returns only for testing its dropout, is ``None`` (flash-attn >= 2.6 gives an empty tensor there
when ``dropout_p == 0``).

Scalars are taken in the forms real call sites pass (flash-attn hands them to an op that converts):
``max_seqlen*`` as an int, a numpy integer or a one-element integer tensor (Hugging Face passes
``position_ids.max() + 1``; a CUDA tensor there costs one device-to-host sync, so pass an int when
you have one); ``softmax_scale`` and ``dropout_p`` as any real number or one-element tensor;
``causal`` as a bool, an int, ``np.bool_`` or a one-element tensor. Other types raise ``TypeError``
naming the argument.

flash-attn's features pass through to ``asvit_kernels.varlen_attention`` (see its docstring and
the float64 reference ``reference.attention.varlen_attention_features``): ``window_size``
(left, right) local attention, ``softcap``, ``alibi_slopes`` ((H,) or (batch, H) float32) and
``dropout_p`` in [0, 1) (the seed is drawn from torch's default generator of q's device; the
mask comes from our backend's own RNG, not flash-attn's Philox stream, so outputs under dropout
match flash-attn in distribution, not bit for bit). The CUDA extension and torch_flash implement
none of them: such calls run on Triton or torch. With ``return_attn_probs=True`` and dropout the result
is still ``(out, softmax_lse, None)``: the dropout mask is not returned (flash-attn returns it
for testing only; ``dropout_keep_mask`` of a backend module gives ours).

``deterministic`` is accepted and changes nothing: every backward here is deterministic (no
atomics). ``block_table`` (paged KV) raises ``NotImplementedError``, never ignored.
``flash_attn_with_kvcache`` (decoding-time KV-cache API) is not provided.
"""
from __future__ import annotations

import numbers
from typing import Optional

import numpy as np
import torch

from .ops.attention import varlen_attention

Tensor = torch.Tensor

__all__ = ["flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func"]


# ----------------------------------------------------------------------------- scalar arguments

def _one_element(v, name: str) -> Optional[Tensor]:
    """A tensor scalar as flash-attn's op takes it (one element, any shape), else None."""
    if not isinstance(v, Tensor):
        return None
    if v.numel() != 1:
        raise TypeError(f"{name} must be a scalar, got a tensor of shape {tuple(v.shape)}")
    return v


def _as_int(v, name: str) -> Optional[int]:
    if v is None:
        return None
    t = _one_element(v, name)
    if t is not None:
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer, got a {t.dtype} tensor")
        v = t.item()  # a CUDA tensor: one device-to-host sync
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be None or an integer, got {type(v).__name__}")
    return int(v)


def _as_float(v, name: str) -> float:
    t = _one_element(v, name)
    if t is not None:
        if t.dtype.is_complex:
            raise TypeError(f"{name} must be a real number, got a {t.dtype} tensor")
        v = t.item()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number, got {type(v).__name__}")
    return float(v)


def _as_bool(v, name: str) -> bool:
    t = _one_element(v, name)
    if t is not None:
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise TypeError(f"{name} must be a bool, got a {t.dtype} tensor")
        return bool(t.item())
    if not isinstance(v, (bool, np.bool_, numbers.Integral, np.integer)):
        raise TypeError(f"{name} must be a bool, got {type(v).__name__}")
    return bool(v)


def _as_window(window_size, func: str) -> tuple[int, int]:
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise TypeError(f"{func}: window_size must be a pair of ints (left, right), got {window_size!r}") from None
    return _as_int(left, "window_size"), _as_int(right, "window_size")


def _options(func: str, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
             return_attn_probs, block_table=None) -> tuple[dict, bool]:
    """The op's keyword arguments (scalars normalized) and return_attn_probs; paged KV refused."""
    if block_table is not None:
        raise NotImplementedError(f"asvit_kernels.compat.{func}: block_table (paged KV) is not supported")
    left, right = _as_window(window_size, func)
    if left is None or right is None:
        raise TypeError(f"{func}: window_size must be a pair of ints (left, right), got {window_size!r}")
    scale = None if softmax_scale is None else _as_float(softmax_scale, "softmax_scale")
    kw = dict(dropout_p=_as_float(dropout_p, "dropout_p"), softmax_scale=scale, causal=_as_bool(causal, "causal"),
              window_size=(left, right), softcap=_as_float(softcap, "softcap"), alibi_slopes=alibi_slopes,
              deterministic=_as_bool(deterministic, "deterministic"))
    return kw, _as_bool(return_attn_probs, "return_attn_probs")


def _check_layout(t, name: str, shape: str, ndim: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {shape}, got shape {tuple(t.shape)}")
    return t


def _packed(t: Tensor, name: str, axis: int, count: int) -> tuple[Tensor, ...]:
    if t.shape[axis] != count:
        raise ValueError(f"{name} must have size {count} at dim {axis} (packed), got shape {tuple(t.shape)}")
    return t.unbind(axis)


# ----------------------------------------------------------------------------- varlen

def _varlen(func, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size, softcap,
            alibi_slopes, deterministic, return_attn_probs, block_table=None):
    kw, probs = _options(func, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                         deterministic, return_attn_probs, block_table)
    res = varlen_attention(q, k, v, cu_q, cu_k, _as_int(max_q, "max_seqlen_q"), _as_int(max_k, "max_seqlen_k"),
                           return_lse=probs, **kw)
    return (res[0], res[1], None) if probs else res


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn's ``flash_attn_varlen_func``: q ``(total_q, H, D)``, k/v ``(total_k, H_kv, D)``,
    int32 ``cu_seqlens_*`` ``(batch + 1,)``. Returns ``(total_q, H, D)`` (see the module docstring
    for ``return_attn_probs`` and the accepted scalar types). Any head dim 1..256, GQA, causal
    bottom-right aligned."""
    return _varlen("flash_attn_varlen_func", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                   dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs, block_table)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash-attn's ``flash_attn_varlen_qkvpacked_func``: qkv ``(total, 3, H, D)`` -> ``(total, H, D)``."""
    q, k, v = _packed(_check_layout(qkv, "qkv", "(total, 3, H, D)", 4), "qkv", 1, 3)
    return _varlen("flash_attn_varlen_qkvpacked_func", q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                   dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                   return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_varlen_kvpacked_func``: q ``(total_q, H, D)``, kv
    ``(total_k, 2, H_kv, D)`` -> ``(total_q, H, D)``."""
    k, v = _packed(_check_layout(kv, "kv", "(total_k, 2, H_kv, D)", 4), "kv", 1, 2)
    return _varlen("flash_attn_varlen_kvpacked_func", q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                   max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                   deterministic, return_attn_probs)


# ----------------------------------------------------------------------------- padded (B, N, H, D)

def _padded(func, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
            return_attn_probs):
    """(B, N, H, D) batches run as B equal-length packed sequences: uniform offsets, no host sync."""
    kw, probs = _options(func, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                         deterministic, return_attn_probs)
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_layout(t, name, "(batch, seqlen, heads, head_dim)", 4)
    (B, N, H, D), N_k = q.shape, k.shape[1]
    if k.shape[0] != B or v.shape[0] != B:
        raise ValueError(f"q, k and v must have the same batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}")
    offsets = torch.arange(B + 1, device=q.device, dtype=torch.int32)
    cu_q, cu_k = offsets * N, offsets * N_k
    res = varlen_attention(q.reshape(B * N, H, D), k.reshape(B * N_k, *k.shape[2:]), v.reshape(B * N_k, *v.shape[2:]),
                           cu_q, cu_k, N, N_k, return_lse=probs, **kw)
    if not probs:
        return res.reshape(B, N, H, D)
    out, lse = res
    return out.reshape(B, N, H, D), lse.reshape(H, B, N).transpose(0, 1), None


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_func``: q ``(B, N_q, H, D)``, k/v ``(B, N_k, H_kv, D)`` ->
    ``(B, N_q, H, D)``; ``softmax_lse`` (with ``return_attn_probs``) is ``(B, H, N_q)``."""
    return _padded("flash_attn_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                   alibi_slopes, deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_qkvpacked_func``: qkv ``(B, N, 3, H, D)`` -> ``(B, N, H, D)``."""
    q, k, v = _packed(_check_layout(qkv, "qkv", "(batch, seqlen, 3, heads, head_dim)", 5), "qkv", 2, 3)
    return _padded("flash_attn_qkvpacked_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                   alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash-attn's ``flash_attn_kvpacked_func``: q ``(B, N_q, H, D)``, kv ``(B, N_k, 2, H_kv, D)``
    -> ``(B, N_q, H, D)``."""
    k, v = _packed(_check_layout(kv, "kv", "(batch, seqlen_k, 2, heads_k, head_dim)", 5), "kv", 2, 2)
    return _padded("flash_attn_kvpacked_func", q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                   alibi_slopes, deterministic, return_attn_probs)
