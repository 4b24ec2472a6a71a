"""Elastic LayerNorm: normalise each row, scale/shift with a (possibly wrapping) range of a shared
affine weight. Backward is deterministic: per-program partial sums of dweight/dbias, then one
reduction kernel that writes straight into the full-size gradients at the used channels."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

MAX_WIDTH = 65536  # one row lives in registers


@triton.jit
def _wrapped(offset, cols, C):
    idx = offset + cols
    return tl.where(idx >= C, idx - C, idx)


@triton.jit
def _ln_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr,
                   rows, width, stride_x, stride_y, C, offset, eps,
                   HAS_BIAS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    rmask = r < rows
    cmask = cols < width
    mask = rmask[:, None] & cmask[None, :]
    r64 = r.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / width
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / width + eps)
    widx = _wrapped(offset, cols, C)
    w = tl.load(w_ptr + widx, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + widx, mask=cmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + r64[:, None] * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + r, mean, mask=rmask)
    tl.store(rstd_ptr + r, rstd, mask=rmask)


@triton.jit
def _ln_bwd_dx_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, part_w_ptr, part_b_ptr,
                      rows, width, stride_dy, stride_x, stride_dx, C, offset, rows_per_prog,
                      NEED_DX: tl.constexpr, NEED_DWB: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < width
    w = tl.load(w_ptr + _wrapped(offset, cols, C), mask=cmask, other=0.0).to(tl.float32)
    acc_w = tl.zeros((BLOCK_C,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_C,), dtype=tl.float32)
    start = pid * rows_per_prog
    for r0 in range(start, start + rows_per_prog, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = (r < rows) & (r < start + rows_per_prog)
        mask = rmask[:, None] & cmask[None, :]
        r64 = r.to(tl.int64)
        x = tl.load(x_ptr + r64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + r64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + r, mask=rmask, other=0.0)
        rstd = tl.load(rstd_ptr + r, mask=rmask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if NEED_DX:
            g = dy * w[None, :]
            c1 = tl.sum(g, axis=1) / width
            c2 = tl.sum(g * xhat, axis=1) / width
            dx = (g - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
            tl.store(dx_ptr + r64[:, None] * stride_dx + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DWB:
            acc_w += tl.sum(dy * xhat, axis=0)
            acc_b += tl.sum(dy, axis=0)
    if NEED_DWB:
        tl.store(part_w_ptr + pid * width + cols, acc_w, mask=cmask)
        tl.store(part_b_ptr + pid * width + cols, acc_b, mask=cmask)


@triton.jit
def _ln_bwd_reduce_kernel(part_w_ptr, part_b_ptr, dw_ptr, db_ptr, n_parts, width, C, offset,
                          HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < width
    sw = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sb = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        mask = (p < n_parts)[:, None] & cmask[None, :]
        off = p[:, None] * width + cols[None, :]
        sw += tl.sum(tl.load(part_w_ptr + off, mask=mask, other=0.0), axis=0)
        sb += tl.sum(tl.load(part_b_ptr + off, mask=mask, other=0.0), axis=0)
    widx = _wrapped(offset, cols, C)
    tl.store(dw_ptr + widx, sw.to(dw_ptr.dtype.element_ty), mask=cmask)
    if HAS_BIAS:
        tl.store(db_ptr + widx, sb.to(db_ptr.dtype.element_ty), mask=cmask)


def _row_block(width: int, device: torch.device) -> tuple[int, int]:
    block_c = triton.next_power_of_2(width)
    if device.type == "cpu":  # interpreter: many rows per program
        return max(1, min(64, 8192 // block_c)), block_c
    return max(1, min(16, 4096 // block_c)), block_c


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], offset: int, eps: float):
    """``x`` (rows, width), row-strided with unit column stride -> (y, mean, rstd)."""
    rows, width = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(rows, device=x.device, dtype=torch.float32)
    rstd = torch.empty(rows, device=x.device, dtype=torch.float32)
    if rows == 0:
        return y, mean, rstd
    block_r, block_c = _row_block(width, x.device)
    _ln_fwd_kernel[(triton.cdiv(rows, block_r),)](
        x, weight, bias if bias is not None else weight, y, mean, rstd,
        rows, width, x.stride(0), y.stride(0), weight.shape[0], offset, eps,
        HAS_BIAS=bias is not None, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=4 if block_c <= 2048 else 8)
    return y, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, has_bias: bool, mean: torch.Tensor,
             rstd: torch.Tensor, offset: int, need_dx: bool, need_dwb: bool):
    """(dx, dweight, dbias); the weight gradients are full-size and zero outside the range."""
    rows, width = x.shape
    C = weight.shape[0]
    dx = torch.empty_like(x) if need_dx else None
    dw = torch.zeros_like(weight) if need_dwb else None
    db = torch.zeros_like(weight) if need_dwb and has_bias else None
    if rows == 0 or not (need_dx or need_dwb):
        return dx, dw, db
    block_r, block_c = _row_block(width, x.device)
    n_parts = min(triton.cdiv(rows, block_r), 4 * _sm_count(x.device))
    rows_per_prog = triton.cdiv(triton.cdiv(rows, n_parts), block_r) * block_r
    n_parts = triton.cdiv(rows, rows_per_prog)
    part = torch.empty(2, n_parts, width, device=x.device, dtype=torch.float32) if need_dwb else None
    _ln_bwd_dx_kernel[(n_parts,)](
        dy, x, weight, mean, rstd, dx if dx is not None else x,
        part[0] if need_dwb else x, part[1] if need_dwb else x,
        rows, width, dy.stride(0), x.stride(0), dx.stride(0) if dx is not None else 0, C, offset,
        rows_per_prog, NEED_DX=need_dx, NEED_DWB=need_dwb, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=4 if block_c <= 2048 else 8)
    if need_dwb:
        block_cr = min(block_c, 256)
        _ln_bwd_reduce_kernel[(triton.cdiv(width, block_cr),)](
            part[0], part[1], dw, db if db is not None else dw, n_parts, width, C, offset,
            HAS_BIAS=db is not None, BLOCK_P=32, BLOCK_C=block_cr)
    return dx, dw, db


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: a couple of programs exercise the reduction
