"""Elastic linear and LayerNorm through strided views of the shared parameters.

A range is at most two contiguous runs (``ranges.pieces``); each pair of runs is one BLAS call on
views, so the used weight block is never gathered, and gradients land in views of the full-size
gradient buffers.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..ranges import Range, concat_pieces, pieces


def _sum_rows_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[:] = src.sum(0), straight into ``dst`` when the dtypes allow it."""
    if dst.dtype == src.dtype:
        torch.sum(src, 0, out=dst)
    else:
        dst.copy_(src.sum(0))


def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   in_ranges: Sequence[Range], out_ranges: Sequence[Range]) -> torch.Tensor:
    C_out, C_in = weight.shape
    in_runs = concat_pieces(in_ranges, C_in)
    outs = []
    for o in concat_pieces(out_ranges, C_out):
        rows = weight[o.src:o.src + o.length]
        b = None if bias is None else bias[o.src:o.src + o.length]
        y = None
        for i in in_runs:
            xi, wi = x[:, i.dst:i.dst + i.length], rows[:, i.src:i.src + i.length]
            y = F.linear(xi, wi, b) if y is None else y.addmm_(xi, wi.t())
        outs.append(y)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)


def linear_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, in_ranges: Sequence[Range],
                    out_ranges: Sequence[Range], need_dx: bool, need_dw: bool, need_db: bool):
    C_out, C_in = weight.shape
    in_runs, out_runs = concat_pieces(in_ranges, C_in), concat_pieces(out_ranges, C_out)
    dx = dw = db = None
    if need_dx:
        parts = []
        for i in in_runs:
            acc = None
            for o in out_runs:
                dyo, wo = dy[:, o.dst:o.dst + o.length], weight[o.src:o.src + o.length, i.src:i.src + i.length]
                acc = dyo.mm(wo) if acc is None else acc.addmm_(dyo, wo)
            parts.append(acc)
        dx = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    if need_dw:
        dw = torch.zeros_like(weight)
        for o in out_runs:
            dyo_t = dy[:, o.dst:o.dst + o.length].t()
            for i in in_runs:
                dw[o.src:o.src + o.length, i.src:i.src + i.length].addmm_(dyo_t, x[:, i.dst:i.dst + i.length])
    if need_db:
        db = torch.zeros(C_out, device=dy.device, dtype=weight.dtype)
        for o in out_runs:
            _sum_rows_into(db[o.src:o.src + o.length], dy[:, o.dst:o.dst + o.length])
    return dx, dw, db


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], offset: int,
                       eps: float):
    """``x`` (rows, width) -> (y, mean, rstd); statistics in float32 (float64 for float64 input)."""
    runs = pieces((offset, x.shape[1]), weight.shape[0])
    xf = x.to(_stat_dtype(x.dtype))
    var, mean = torch.var_mean(xf, dim=1, correction=0)
    rstd = torch.rsqrt(var + eps)
    xhat = (xf - mean[:, None]) * rstd[:, None]
    y = torch.empty_like(x)
    for p in runs:
        cols = slice(p.dst, p.dst + p.length)
        w = weight[p.src:p.src + p.length]
        yp = xhat[:, cols] * w if bias is None else torch.addcmul(bias[p.src:p.src + p.length], xhat[:, cols], w)
        y[:, cols] = yp
    return y, mean, rstd


def layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                        mean: torch.Tensor, rstd: torch.Tensor, offset: int, need_dx: bool, need_dwb: bool):
    runs = pieces((offset, x.shape[1]), weight.shape[0])
    acc = mean.dtype
    xhat = (x.to(acc) - mean[:, None]) * rstd[:, None]
    dyf = dy.to(acc)
    dx = dw = db = None
    if need_dx:
        g = dyf.clone()
        for p in runs:
            g[:, p.dst:p.dst + p.length] *= weight[p.src:p.src + p.length]
        c1 = g.mean(1, keepdim=True)
        c2 = (g * xhat).mean(1, keepdim=True)
        dx = ((g - c1 - xhat * c2) * rstd[:, None]).to(x.dtype)
    if need_dwb:
        dw = torch.zeros_like(weight)
        db = torch.zeros_like(weight) if has_bias else None
        dyx = dyf * xhat
        for p in runs:
            cols, dst = slice(p.dst, p.dst + p.length), slice(p.src, p.src + p.length)
            _sum_rows_into(dw[dst], dyx[:, cols])
            if db is not None:
                _sum_rows_into(db[dst], dyf[:, cols])
    return dx, dw, db
