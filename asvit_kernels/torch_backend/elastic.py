"""Elastic linear and LayerNorm through strided views of the shared parameters.

A range is at most two contiguous runs (``ranges.pieces``); each pair of runs is one BLAS call on
views, so the used weight block is never gathered, and gradients land in views of the full-size
gradient buffers. A single-run range on both sides is exactly dense ``F.linear`` on views (BLAS
takes the weight's row stride as its leading dimension). Several output runs (a qkv weight's q, k
and v blocks) write straight into column slices of one output instead of concatenating.

LayerNorm runs PyTorch's own kernel (``native_layer_norm`` and its backward, as dense
``F.layer_norm`` does) on the range's affine parameters: a view when the range does not wrap, else
a (C,)-sized gather of the two runs; statistics in float32 (float64 for float64 input).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..ranges import Piece, Range, concat_pieces, index_table, pieces


def _sum_rows_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst[:] = src.sum(0), straight into ``dst`` when the dtypes allow it."""
    if dst.dtype == src.dtype:
        torch.sum(src, 0, out=dst)
    else:
        dst.copy_(src.sum(0))


@functools.lru_cache(maxsize=4096)
def _gaps(runs: tuple[Piece, ...], size: int) -> tuple[tuple[int, int], ...]:
    """The [start, end) intervals of ``0..size`` that no run covers (cached: ints only)."""
    out, at = [], 0
    for p in sorted(runs, key=lambda p: p.src):
        if p.src > at:
            out.append((at, p.src))
        at = p.src + p.length
    if at < size:
        out.append((at, size))
    return tuple(out)


def linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   in_ranges: Sequence[Range], out_ranges: Sequence[Range]) -> torch.Tensor:
    C_out, C_in = weight.shape
    in_runs, out_runs = concat_pieces(in_ranges, C_in), concat_pieces(out_ranges, C_out)
    if len(out_runs) == 1 and len(in_runs) == 1:  # first-k, last-k, any non-wrapping range: dense
        o, i = out_runs[0], in_runs[0]
        return F.linear(x, weight[o.src:o.src + o.length, i.src:i.src + i.length],
                        None if bias is None else bias[o.src:o.src + o.length])
    if GATHER_PIECES:
        out_idx = _idx(out_ranges, out_runs, C_out, weight)
        return F.linear(x, _gathered(weight, in_ranges, in_runs, out_idx, out_runs),
                        None if bias is None else _take(bias, out_idx, out_runs))
    y = torch.empty(x.shape[0], sum(o.length for o in out_runs), device=x.device, dtype=x.dtype)
    for o in out_runs:
        rows, dst = weight[o.src:o.src + o.length], y[:, o.dst:o.dst + o.length]
        for n, i in enumerate(in_runs):
            xi, wi = x[:, i.dst:i.dst + i.length], rows[:, i.src:i.src + i.length].t()
            if n:
                dst.addmm_(xi, wi)
            elif bias is None:
                torch.mm(xi, wi, out=dst)
            else:
                torch.addmm(bias[o.src:o.src + o.length], xi, wi, out=dst)
    return y


# A range of several runs (wrapped, or a qkv weight's q/k/v blocks): gather the used block (o x i
# entries, against the T x o x i multiply-adds of each product) and run each product as ONE matmul,
# instead of one small matmul per pair of runs. Measured faster on a CPU (bench/elastic.py wrapped
# rows, the qkv projection of bench/models.py); False runs the per-run products on views. Gathers
# and scatters go through the cached index tables: one indexing op per side whatever the number of
# runs (a cyclic qkv has up to 6 x 2), where slices, cats and copies per run cost ~100 small ops.
GATHER_PIECES = True


def _idx(ranges, runs, size: int, like: torch.Tensor) -> Optional[torch.Tensor]:
    """The int64 index table of several runs; None for one run (a slice serves it)."""
    if len(runs) == 1:
        return None
    return index_table(tuple(tuple(r) for r in ranges), size, like.device, torch.int64)


def _take(t: torch.Tensor, idx: Optional[torch.Tensor], runs, dim: int = 0) -> torch.Tensor:
    """``t``'s entries of the runs along ``dim``, in range order: a view of one run, else a gather."""
    if idx is None:
        return t.narrow(dim, runs[0].src, runs[0].length)
    return t.index_select(dim, idx)


def _gathered(weight: torch.Tensor, in_ranges, in_runs, out_idx, out_runs) -> torch.Tensor:
    """``weight[out_idx][:, in_idx]`` (a view when both sides are one run). One column run is
    narrowed first, so the row gather copies only the block."""
    in_idx = _idx(in_ranges, in_runs, weight.shape[1], weight)
    if in_idx is None:
        return _take(_take(weight, None, in_runs, 1), out_idx, out_runs)
    return _take(_take(weight, out_idx, out_runs), in_idx, in_runs, 1)


def _put(dst: torch.Tensor, idx: Optional[torch.Tensor], runs, src: torch.Tensor) -> None:
    """The inverse of ``_take`` (rows) into a zeroed ``dst``."""
    if idx is None:
        dst.narrow(0, runs[0].src, runs[0].length).copy_(src)
    else:
        dst.index_copy_(0, idx, src)


def _weight_grad(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, in_ranges, in_runs, out_idx,
                 out_runs) -> torch.Tensor:
    """Full-size dweight. Gathered: one matmul, then its block placed into zeros (rows by one
    index_copy_, columns by a second one when they are several runs too). Per run: each used block
    written once by its matmul (beta=0 ignores the unwritten memory), only the unused rows and
    columns zeroed."""
    C_out, C_in = weight.shape
    if GATHER_PIECES and len(in_runs) * len(out_runs) > 1:
        g = dy.t().mm(x)  # (out width, in width), range order
        in_idx = _idx(in_ranges, in_runs, C_in, weight)
        dw = torch.zeros_like(weight)
        if in_idx is None:  # one column run: its rows placed
            _put(dw.narrow(1, in_runs[0].src, in_runs[0].length), out_idx, out_runs, g)
        elif out_idx is None:  # one row run: its columns placed
            dw.narrow(0, out_runs[0].src, out_runs[0].length).index_copy_(1, in_idx, g)
        else:  # columns placed into full-width rows, then the rows
            dw.index_copy_(0, out_idx, g.new_zeros(g.shape[0], C_in).index_copy_(1, in_idx, g))
        return dw
    dw = torch.empty_like(weight)
    for a, b in _gaps(out_runs, C_out):
        dw[a:b].zero_()
    col_gaps = _gaps(in_runs, C_in)
    for o in out_runs:
        rows = dw[o.src:o.src + o.length]
        for a, b in col_gaps:
            rows[:, a:b].zero_()
        dyo_t = dy[:, o.dst:o.dst + o.length].t()
        for i in in_runs:
            rows[:, i.src:i.src + i.length].addmm_(dyo_t, x[:, i.dst:i.dst + i.length], beta=0)
    return dw


def linear_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, in_ranges: Sequence[Range],
                    out_ranges: Sequence[Range], need_dx: bool, need_dw: bool, need_db: bool):
    C_out, C_in = weight.shape
    in_runs, out_runs = concat_pieces(in_ranges, C_in), concat_pieces(out_ranges, C_out)
    dx = dw = db = None
    out_idx = _idx(out_ranges, out_runs, C_out, weight) if GATHER_PIECES else None
    if need_dx and GATHER_PIECES:
        dx = dy.mm(_gathered(weight, in_ranges, in_runs, out_idx, out_runs))
    elif need_dx:
        dx = torch.empty_like(x) if len(in_runs) > 1 else None
        for i in in_runs:
            acc = None
            for o in out_runs:
                dyo, wo = dy[:, o.dst:o.dst + o.length], weight[o.src:o.src + o.length, i.src:i.src + i.length]
                if acc is not None:
                    acc.addmm_(dyo, wo)
                elif dx is None:
                    acc = dyo.mm(wo)
                else:
                    acc = torch.mm(dyo, wo, out=dx[:, i.dst:i.dst + i.length])
            dx = acc if dx is None else dx
    if need_dw:
        dw = _weight_grad(dy, x, weight, in_ranges, in_runs, out_idx, out_runs)
    if need_db:
        db = torch.zeros(C_out, device=dy.device, dtype=weight.dtype)
        if out_idx is not None:
            db.index_copy_(0, out_idx, dy.sum(0, dtype=db.dtype))
        else:
            for o in out_runs:
                _sum_rows_into(db[o.src:o.src + o.length], dy[:, o.dst:o.dst + o.length])
    return dx, dw, db


def _stat_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the dispatch when it is one already (per-call overhead counts here)."""
    return t if t.dtype == dtype else t.to(dtype)


def _affine(p: Optional[torch.Tensor], runs) -> Optional[torch.Tensor]:
    """The range's entries of a (C,) affine parameter: a view of one run, else the runs concatenated."""
    if p is None:
        return None
    if len(runs) == 1:
        return p[runs[0].src:runs[0].src + runs[0].length]
    return torch.cat([p[r.src:r.src + r.length] for r in runs])


def layer_norm_composite(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], offset: int,
                         eps: float) -> torch.Tensor:
    """``F.layer_norm`` over ``x``'s last dim with the range's affine entries as autograd views (an
    index_select through the cached table for a wrapping range): the gradients reach the full-size
    parameters through PyTorch's own backward, with no Python in the backward pass."""
    width, C = x.shape[-1], weight.shape[0]
    if width == C and offset == 0:  # the parameters themselves: dense LayerNorm exactly
        w, b = weight, bias
    elif offset + width <= C:
        w = weight[offset:offset + width]
        b = None if bias is None else bias[offset:offset + width]
    else:  # one gather per parameter (two slices and a cat would accumulate two full-size grads)
        idx = index_table(((offset, width),), C, weight.device, torch.int64)
        w = weight.index_select(0, idx)
        b = None if bias is None else bias.index_select(0, idx)
    # torch.layer_norm is what F.layer_norm calls (and handles __torch_function__ itself), minus
    # the Python wrapper's ~2 us.
    return torch.layer_norm(x, (width,), w, b, eps)


def layer_norm_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], offset: int,
                       eps: float):
    """``x`` (rows, width) -> (y, mean, rstd); statistics in float32 (float64 for float64 input)."""
    width = x.shape[1]
    runs = pieces((offset, width), weight.shape[0])
    acc = _stat_dtype(x.dtype)
    # PyTorch's CPU kernel keeps half-precision statistics in the input dtype: run those in float32.
    xs = _as(x, acc)
    w, b = (None if p is None else _as(p, acc) for p in (_affine(weight, runs), _affine(bias, runs)))
    if width == 1:  # x - mean is exactly 0 (NaN for non-finite x); the kernel's form leaves noise
        mean, rstd = xs[:, 0], torch.full((x.shape[0],), (eps ** -0.5), device=x.device, dtype=acc)
        y = (xs - xs) * w if b is None else torch.addcmul(b, xs - xs, w)
        return _as(y, x.dtype), mean, rstd
    y, mean, rstd = torch.native_layer_norm(xs, [width], w, b, eps)
    return _as(y, x.dtype), mean.view(-1), rstd.view(-1)


def layer_norm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool,
                        mean: torch.Tensor, rstd: torch.Tensor, offset: int, need_dx: bool, need_dwb: bool):
    width = x.shape[1]
    runs = pieces((offset, width), weight.shape[0])
    acc = mean.dtype
    w = _as(_affine(weight, runs), acc)
    b = w if has_bias else None  # only its presence matters to the kernel's bias-gradient output
    if width == 1:  # exactly: dx = 0 and dweight = 0 where finite, dbias = sum(dy)
        xhat, dyf = (x.to(acc) - mean[:, None]) * rstd[:, None], dy.to(acc)
        dx = (dyf * w - (dyf * w)) * xhat if need_dx else None
        dw_r, db_r = (dyf * xhat).sum(0), dyf.sum(0)
    else:
        dx, dw_r, db_r = torch.ops.aten.native_layer_norm_backward(
            _as(dy, acc), _as(x, acc), [width], mean, rstd, w, b, [need_dx, need_dwb, need_dwb and has_bias])
    if dx is not None:
        dx = _as(dx, x.dtype)
    dw = db = None
    if need_dwb:
        dw = _scatter_runs(dw_r, runs, weight)
        db = _scatter_runs(db_r, runs, weight) if has_bias else None
    return dx, dw, db


def _scatter_runs(g: torch.Tensor, runs, like: torch.Tensor) -> torch.Tensor:
    """A full-size (C,) gradient holding ``g`` (the range's entries, in range order) at its channels,
    zero elsewhere: one op for one run (a pad), two for a wrapping range."""
    C, width = like.shape[0], g.shape[0]
    g = g if g.dtype == like.dtype else g.to(like.dtype)
    if len(runs) == 1:
        return F.pad(g, (runs[0].src, C - runs[0].src - width)) if width < C else g
    first = runs[0].length  # runs[0] ends at C, runs[1] starts at 0
    return torch.cat([g[first:], g.new_zeros(C - width), g[:first]])
