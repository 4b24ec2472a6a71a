"""Varlen attention through PyTorch's built-in FlashAttention-2 kernel: the aten ops that
``torch.nn.attention.varlen.varlen_attn`` wraps (``aten::_flash_attention_forward`` / ``_backward``),
called directly so the forward hands its log-sum-exp to our backward, as the other backends do,
and so the call is the same on torch 2.11 and 2.13 (the public wrapper's signature changed).

What it takes (``capabilities.TABLE["varlen_attention"]["torch_flash"]``): CUDA, fp16/bf16, head dims
that are multiples of 8 up to 256, sm_80 and newer, GQA natively, causal bottom-right as ours;
no window/softcap/alibi/dropout through this backend. Auto-dispatch prefers our Triton kernels
until a GPU measures which is faster. Non-finite isolation inside a sequence is FlashAttention-2's
own (a NaN in a masked value tile may spread within its sequence; never into another, since its
tiles are per sequence); our isolation tests run it when a GPU is present.
"""
from __future__ import annotations

import torch

_FWD = getattr(torch.ops.aten, "_flash_attention_forward", None)
_BWD = getattr(torch.ops.aten, "_flash_attention_backward", None)


def _empty_case(q, k, v):
    return q.shape[0] == 0 or k.shape[0] == 0


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool):
    H, total_q = q.shape[1], q.shape[0]
    if _empty_case(q, k, v):  # no query or no key at all: zero output, lse -inf (the kernel wants work)
        return torch.zeros_like(q), torch.full((H, total_q), float("-inf"), device=q.device)
    out, lse, _rng, _unused, _debug = _FWD(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, causal, False, scale=scale)
    if tuple(lse.shape) != (H, total_q):  # older FlashAttention-2 builds pad it per sequence
        raise RuntimeError(f"torch_flash: this PyTorch's FlashAttention-2 returns its log-sum-exp as "
                           f"{tuple(lse.shape)}, not (heads, total_q) = {(H, total_q)}; use backend='triton'")
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool):
    if _empty_case(q, k, v):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    rng_state = torch.zeros(2, dtype=torch.uint64, device=q.device)  # dropout is 0: the state is unused
    unused = torch.empty(0, device=q.device)
    return _BWD(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, causal, rng_state, unused, scale=scale)
