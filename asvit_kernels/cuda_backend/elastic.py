"""Elastic LayerNorm forward/backward through ``_C``."""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext

_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], offset: int,
                       eps: float):
    rows, width = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    with torch.cuda.device(x.device):
        _ext.C.elastic_layer_norm_fwd(
            x.data_ptr(), weight.data_ptr(), _ptr(bias), y.data_ptr(), mean.data_ptr(), rstd.data_ptr(),
            rows, width, x.stride(0), y.stride(0), weight.shape[0], offset, float(eps),
            _DTYPE_CODE[x.dtype], _stream(x.device))
    return y, mean, rstd


def layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                        mean: torch.Tensor, rstd: torch.Tensor, offset: int, need_dx: bool, need_dwb: bool):
    rows, width = x.shape
    # A null pointer skips that output (and the workspace when no weight gradient is asked for).
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.zeros_like(weight) if need_dwb else None
    db = torch.zeros_like(weight) if need_dwb and has_bias else None
    ws = None
    if need_dwb:
        ws = torch.empty(_ext.C.elastic_layer_norm_bwd_workspace_numel(rows, width), device=x.device,
                         dtype=torch.float32)
    with torch.cuda.device(x.device):
        _ext.C.elastic_layer_norm_bwd(
            dy.data_ptr(), x.data_ptr(), weight.data_ptr(), mean.data_ptr(), rstd.data_ptr(), _ptr(dx),
            _ptr(dw), _ptr(db), _ptr(ws), rows, width, dy.stride(0), x.stride(0),
            width if dx is None else dx.stride(0), weight.shape[0], offset, _DTYPE_CODE[x.dtype],
            _stream(x.device))
    return dx, dw, db
