"""Variable-length (packed, flash-attn varlen) attention forward/backward through ``_C``.

Inputs arrive on one CUDA device with a contiguous last dimension (token and head strides are
free) and int32 contiguous ``cu_seqlens``; validation of shapes and dtypes is the caller's job.
``max_q`` / ``max_k`` bound the sequence lengths and only size the kernel grids.

Tile products: fp16 on tensor cores (sm_70+); bf16 on tensor cores from sm_80 (fp32 FMA on
sm_70/75); fp32 as tf32 on tensor cores from sm_80 when ``torch.backends.cuda.matmul.allow_tf32``
is set (as torch's own fp32 matmuls; not the backward at head dim > 128), else the fp32 FMA path.
Softmax, lse and accumulation are fp32 in every case."""
from __future__ import annotations

from typing import Tuple

import torch

from .. import _ext

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _allow_tf32() -> bool:
    """fp32 products in tf32 exactly when torch's fp32 matmuls may use it."""
    return bool(torch.backends.cuda.matmul.allow_tf32)


def _th(t: torch.Tensor) -> Tuple[int, int]:
    """(token stride, head stride) of a (tokens, heads, D) tensor."""
    return t.stride(0), t.stride(1)


def varlen_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                   cu_k: torch.Tensor, max_q: int, max_k: int, scale: float,
                   causal: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """out (total_q, H, D) like q, lse float32 (H, total_q)."""
    total_q, H, D = q.shape
    total_k, H_kv, _ = k.shape
    out = torch.empty_like(q)  # any non-overlapping layout works; empty_like matches the fake impl
    lse = torch.empty((H, total_q), device=q.device, dtype=torch.float32)
    with torch.cuda.device(q.device):
        _ext.C.varlen_attention_fwd(
            q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
            cu_q.data_ptr(), cu_k.data_ptr(), cu_q.shape[0] - 1, total_q, total_k, H, H_kv, D,
            *_th(q), *_th(k), *_th(v), *_th(out), int(max_q), int(max_k), float(scale), bool(causal),
            _DTYPE_CODE[q.dtype], _stream(q.device), _allow_tf32())
    return out, lse


def varlen_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    out: torch.Tensor, lse: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                    max_q: int, max_k: int, scale: float,
                    causal: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq like q, dk and dv like k (total_k, H_kv, D). Deterministic."""
    total_q, H, D = q.shape
    total_k, H_kv, _ = k.shape
    lse = lse.contiguous()  # the kernels read lse as a contiguous (H, total_q) array
    # The kernels write every element (0 where no gradient flows), so uninitialised memory is enough.
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    ws = torch.empty(_ext.C.varlen_attention_bwd_workspace_numel(H, total_q), device=q.device,
                     dtype=torch.float32)
    with torch.cuda.device(q.device):
        _ext.C.varlen_attention_bwd(
            dout.data_ptr(), q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), lse.data_ptr(),
            dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), ws.data_ptr(), cu_q.data_ptr(),
            cu_k.data_ptr(), cu_q.shape[0] - 1, total_q, total_k, H, H_kv, D, *_th(dout), *_th(q),
            *_th(k), *_th(v), *_th(out), *_th(dq), *_th(dk), *_th(dv), int(max_q), int(max_k),
            float(scale), bool(causal), _DTYPE_CODE[q.dtype], _stream(q.device), _allow_tf32())
    return dq, dk, dv
