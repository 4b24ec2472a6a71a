"""FLOP formulas of the custom ops for ``torch.utils.flop_counter.FlopCounterMode``, which sees a
custom op as one opaque call: without these, a model's attention and elastic layers count 0.

FLOPs here are 2 per multiply-add, as FlopCounterMode counts matmuls.
"""
from __future__ import annotations

import math

import torch
from torch.utils.flop_counter import register_flop_formula

from ..ranges import total_width
from .elastic import _pairs


def _pair_products(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, max_k: int) -> int:
    """sum over sequences of len_q * len_k; ``total_q * max_k`` (an upper bound) when the offsets
    have no values to read (fake tensors under torch.compile)."""
    try:
        lq, lk = (cu_q[1:] - cu_q[:-1]).tolist(), (cu_k[1:] - cu_k[:-1]).tolist()
    except (RuntimeError, NotImplementedError):
        return total_q * max(max_k, 0)
    return sum(a * b for a, b in zip(lq, lk))


@register_flop_formula(torch.ops.asvit.varlen_attention, get_raw=True)
def _attention_flops(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, backend, out_val=None, **_):
    # QK^T and PV: 2 matmuls of len_q x len_k x head_dim per head (causal masking not discounted).
    return 2 * 2 * q.shape[1] * q.shape[2] * _pair_products(cu_q, cu_k, q.shape[0], max_k)


@register_flop_formula(torch.ops.asvit.varlen_attention_backward, get_raw=True)
def _attention_backward_flops(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale, causal, backend,
                              out_val=None, **_):
    # Recompute QK^T, then dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q: 5 matmuls.
    return 5 * 2 * q.shape[1] * q.shape[2] * _pair_products(cu_q, cu_k, q.shape[0], max_k)


def _linear_macs(x: torch.Tensor, in_range, out_ranges) -> int:
    return math.prod(x.shape[:-1]) * in_range[1] * total_width(_pairs(out_ranges))


@register_flop_formula(torch.ops.asvit.elastic_linear, get_raw=True)
def _linear_flops(x, weight, bias, in_range, out_ranges, backend, out_val=None, **_):
    return 2 * _linear_macs(x, in_range, out_ranges)


@register_flop_formula(torch.ops.asvit.elastic_linear_backward, get_raw=True)
def _linear_backward_flops(dy, x, weight, in_range, out_ranges, backend, need_dx, need_dw, need_db,
                           out_val=None, **_):
    return 2 * _linear_macs(x, in_range, out_ranges) * (int(need_dx) + int(need_dw))
