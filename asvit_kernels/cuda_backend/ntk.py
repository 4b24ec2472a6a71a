"""One linear layer's empirical-NTK Gram through ``_C``: K[i, j] = <G_i, G_j>_F with the per-sample
weight gradients G_i = g_i^T a_i, never materialised (only 32 x 32 tiles of them, in registers).

Inputs arrive on one CUDA device with a contiguous last dimension (batch and token strides are free);
the checks below are cheap (no host sync) and exist because a wrong layout would otherwise be read
silently. fp32 accumulation whatever the input dtype; deterministic; K is exactly symmetric.

Tile products of G: fp16 on tensor cores (sm_70+), bf16 on tensor cores from sm_80 (fp32 FMA on
sm_70/75), fp32 as tf32 on tensor cores from sm_80 when ``torch.backends.cuda.matmul.allow_tf32``
is set, else the fp32 FMA path."""
from __future__ import annotations

import torch

from .. import _ext

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _check(a: torch.Tensor, g: torch.Tensor) -> None:
    for name, t in (("a", a), ("g", g)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"per_sample_grad_gram: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"per_sample_grad_gram: {name} must be 3-D (B, T, features), got shape "
                             f"{tuple(t.shape)}")
        if t.device.type != "cuda":
            raise ValueError(f"per_sample_grad_gram: {name} must be on a CUDA device, got {t.device}")
        if t.dtype not in _DTYPE_CODE:
            raise TypeError(f"per_sample_grad_gram: {name} must be float32, float16 or bfloat16, got "
                            f"{t.dtype}")
        if t.shape[2] > 1 and t.stride(2) != 1:
            raise ValueError(f"per_sample_grad_gram: {name} must have a contiguous last dimension, got "
                             f"strides {t.stride()}")
    if g.shape[:2] != a.shape[:2]:
        raise ValueError(f"per_sample_grad_gram: g must have a's (B, T) = {tuple(a.shape[:2])}, got "
                         f"{tuple(g.shape[:2])}")
    if g.dtype != a.dtype:
        raise TypeError(f"per_sample_grad_gram: g must have a's dtype {a.dtype}, got {g.dtype}")
    if g.device != a.device:
        raise ValueError(f"per_sample_grad_gram: g must be on a's device {a.device}, got {g.device}")


def per_sample_grad_gram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """float32 (B, B) K with K[i, j] = <g_i^T a_i, g_j^T a_j>_F for a (B, T, D_in), g (B, T, D_out)."""
    _check(a, g)
    B, T, D_in = a.shape
    D_out = g.shape[2]
    if D_in == 0 or D_out == 0:  # every G_i is empty
        return torch.zeros((B, B), device=a.device, dtype=torch.float32)
    out = torch.empty((B, B), device=a.device, dtype=torch.float32)
    ws = torch.empty(_ext.C.per_sample_grad_gram_workspace_numel(B, T, D_in, D_out), device=a.device,
                     dtype=torch.float32)
    with torch.cuda.device(a.device):
        _ext.C.per_sample_grad_gram(
            a.data_ptr(), g.data_ptr(), out.data_ptr(), ws.data_ptr(), B, T, D_in, D_out, a.stride(0),
            a.stride(1), g.stride(0), g.stride(1), _DTYPE_CODE[a.dtype], _stream(a.device),
            bool(torch.backends.cuda.matmul.allow_tf32))
    return out
