"""Elastic linear forward and backward on top of ``gather_matmul``."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..ranges import Range, index_table, total_width
from .gather_matmul import gather_matmul


def _access(ranges: Sequence[Range], size: int, device: torch.device) -> tuple[int, Optional[torch.Tensor]]:
    """(base offset, index table): one non-wrapping range is a plain offset; anything else a table,
    built once per (ranges, size, device) and cached (``ranges.index_table``)."""
    if len(ranges) == 1 and ranges[0][0] + ranges[0][1] <= size:
        return ranges[0][0], None
    return 0, index_table(tuple(tuple(r) for r in ranges), size, device)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            in_ranges: Sequence[Range], out_ranges: Sequence[Range]) -> torch.Tensor:
    """``x`` (M, in_width) -> (M, out_width); reads the used weight entries in place."""
    C_out, C_in = weight.shape
    i0, in_tab = _access(in_ranges, C_in, x.device)
    o0, out_tab = _access(out_ranges, C_out, x.device)
    out_width = total_width(out_ranges)
    y = torch.empty(x.shape[0], out_width, device=x.device, dtype=x.dtype)
    w = weight[o0:, i0:]
    return gather_matmul(x, w.t(), y, bk_idx=in_tab, bn_idx=out_tab,
                         bias=None if bias is None else bias[o0:], n=out_width, k=x.shape[1])


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, in_ranges: Sequence[Range],
             out_ranges: Sequence[Range], need_dx: bool, need_dw: bool, need_db: bool):
    """(dx, dweight, dbias): dweight/dbias are full-size, written only at the used channels."""
    C_out, C_in = weight.shape
    i0, in_tab = _access(in_ranges, C_in, x.device)
    o0, out_tab = _access(out_ranges, C_out, x.device)
    dx = dw = db = None
    if need_dx:
        dx = torch.empty_like(x)
        gather_matmul(dy, weight[o0:, i0:], dx, bk_idx=out_tab, bn_idx=in_tab, n=x.shape[1], k=dy.shape[1])
    if need_db:
        db = torch.zeros(C_out, device=dy.device, dtype=weight.dtype)
    if need_dw:
        dw = torch.zeros_like(weight)
        gather_matmul(dy.t(), x, dw[o0:, i0:], cm_idx=out_tab, cn_idx=in_tab,
                      rowsum=None if db is None else db[o0:], n=x.shape[1])
    elif need_db:  # weight frozen, bias trained: a plain column sum
        sums = dy.sum(0, dtype=torch.float32).to(db.dtype)
        if out_tab is None:
            db[o0:o0 + dy.shape[1]].copy_(sums)
        else:
            db.index_copy_(0, out_tab.long(), sums)
    return dx, dw, db
