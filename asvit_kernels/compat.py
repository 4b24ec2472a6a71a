"""Drop-in replacements for other libraries' entry points, so an existing codebase switches with one
import line: ``from asvit_kernels.compat import flash_attn_varlen_func``."""
from __future__ import annotations

from .ops.attention import varlen_attention


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                           alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2's ``flash_attn_varlen_func``, same signature, on asvit-kernels' varlen attention.

    Any head dim 1..256, float32/float16/bfloat16, every GPU the backends run on (and the CPU). Our
    backward is always deterministic, so ``deterministic`` changes nothing. Options this library
    does not implement raise ``NotImplementedError`` naming the value instead of being ignored:
    local windows, softcap, ALiBi, paged KV (``block_table``), ``return_attn_probs=True`` and
    ``dropout_p > 0``.
    """
    unsupported = [(tuple(window_size) != (-1, -1), f"window_size={tuple(window_size)}"),
                   (softcap != 0.0, f"softcap={softcap}"), (alibi_slopes is not None, "alibi_slopes"),
                   (block_table is not None, "block_table"), (bool(return_attn_probs), "return_attn_probs=True")]
    for bad, what in unsupported:
        if bad:
            raise NotImplementedError(f"asvit_kernels.compat.flash_attn_varlen_func: {what} is not supported")
    return varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                            softmax_scale, causal)
