"""Attention over packed variable-length sequences: forward, and a two-kernel backward (dk/dv per
key tile, dq per query tile), deterministic, one launch each for the whole batch.

Tiles run over *packed* rows, not per sequence: a tile of BLOCK_M consecutive query rows may hold
several short sequences, and a block-diagonal mask inside the tile keeps them apart. A batch of
49-token windows thus fills whole tiles instead of padding each window to a tile of its own. The key
loop covers the union of the tile's sequences (cut at the causal frontier when causal).

Masks: query row r of sequence b (rows qs..qe-1, keys ks..ke-1) may see key c iff ks <= c < ke and,
when causal, c <= r + (ke - qe) (flash-attn's bottom-right alignment). A row that sees no key gets
output 0 and lse -inf. Head dims up to 256 are padded to a power of two in registers only.

Non-finite inputs: a row's output and gradients depend only on what the row sees (its sequence,
cut at the causal frontier); see ``_dot_seen``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .gather_matmul import _input_precision, device_arch, smem_limit

@triton.jit
def _query_tile(SEQ_Q, CU_Q, CU_K, pid_m, total_q, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """Rows of query tile ``pid_m``, the keys each may see ``[ks, k_end)``, and the tile's key loop
    bounds ``[k_lo, k_hi)``: the union over its rows (its sequences, cut at the causal frontier)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < total_q
    b = tl.load(SEQ_Q + rows, mask=rmask, other=0)
    qe = tl.load(CU_Q + b + 1, mask=rmask, other=0)
    ks = tl.load(CU_K + b, mask=rmask, other=0)
    ke = tl.load(CU_K + b + 1, mask=rmask, other=0)
    k_end = ke
    if CAUSAL:
        k_end = tl.minimum(ke, tl.maximum(rows + 1 + ke - qe, ks))
    k_lo = tl.min(tl.where(rmask, ks, 2147483647), axis=0)
    k_hi = tl.max(tl.where(rmask, k_end, 0), axis=0)
    return rows, rmask, ks, k_end, k_lo, k_hi


@triton.jit
def _dot_seen(acc, a, seen, x, PRECISION: tl.constexpr):
    """``acc + a @ x`` where ``a`` is 0 at the pairs ``seen`` excludes and ``x`` may hold NaN/inf.

    A tile mixes sequences (and, under causal, rows that do not see every key), so a plain dot
    would turn 0 * inf into NaN in rows that never see the value. The finite part goes through the
    dot; only a tile that holds a non-finite ``x`` (rare) pays three 0/1 dots that count, per output
    element, the NaN / +inf / -inf entries its seen pairs meet, and adds them as IEEE would."""
    fin = (x == x) & (tl.abs(x) < float("inf"))
    acc += tl.dot(a.to(x.dtype), tl.where(fin, x, 0.0).to(x.dtype), input_precision=PRECISION)
    if tl.min(fin.to(tl.int32)) == 0:
        hits = seen.to(x.dtype)
        n_nan = tl.dot(hits, (x != x).to(x.dtype), input_precision=PRECISION)
        n_pos = tl.dot(hits, (x == float("inf")).to(x.dtype), input_precision=PRECISION)
        n_neg = tl.dot(hits, (x == float("-inf")).to(x.dtype), input_precision=PRECISION)
        acc += tl.where(n_nan > 0, float("nan"), 0.0)
        acc += tl.where(n_pos > 0, float("inf"), 0.0)
        acc += tl.where(n_neg > 0, float("-inf"), 0.0)
    return acc


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, SEQ_Q, CU_Q, CU_K, scale,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                total_q, D, GROUP: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # int64: h * stride_qh exceeds int32 for views of >= 2^31 elements
    hk = h // GROUP
    rows, rmask, ks, k_end, k_lo, k_hi = _query_tile(SEQ_Q, CU_Q, CU_K, pid_m, total_q, CAUSAL, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D

    r64 = rows.to(tl.int64)
    q = tl.load(Q + r64[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < k_hi
        c64 = cols.to(tl.int64)
        kt = tl.load(K + c64[:, None] * stride_kt + hk * stride_kh + d[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale
        allowed = (cols[None, :] >= ks[:, None]) & (cols[None, :] < k_end[:, None]) & rmask[:, None]
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(V + c64[:, None] * stride_vt + hk * stride_vh + d[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc = _dot_seen(acc * alpha[:, None], p, allowed, vt, PRECISION)
        m_i = m_new
    # l = 0: no key seen (output 0, lse -inf), or every seen score is -inf, a 0/0 softmax (NaN,
    # as the definition's); l NaN (a non-finite score) stays NaN, in lse too.
    seen = l_i != 0
    undefined = (k_end > ks)[:, None] & ~seen[:, None]
    out = tl.where(undefined, float("nan"), acc / tl.where(seen, l_i, 1.0)[:, None])
    tl.store(O + r64[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(O.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)),
                   tl.where(k_end > ks, float("nan"), float("-inf")))
    tl.store(LSE + h * total_q + r64, lse, mask=rmask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEQ_Q, CU_Q, CU_K, scale,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dot, stride_doh, stride_dqt, stride_dqh,
                   total_q, D, GROUP: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # int64: h * stride_qh exceeds int32 for views of >= 2^31 elements
    hk = h // GROUP
    rows, rmask, ks, k_end, k_lo, k_hi = _query_tile(SEQ_Q, CU_Q, CU_K, pid_m, total_q, CAUSAL, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D

    r64 = rows.to(tl.int64)
    qd_mask = rmask[:, None] & dmask[None, :]
    q = tl.load(Q + r64[:, None] * stride_qt + h * stride_qh + d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + r64[:, None] * stride_dot + h * stride_doh + d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(LSE + h * total_q + r64, mask=rmask, other=float("-inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows that saw no key: p = 0
    delta = tl.load(DELTA + h * total_q + r64, mask=rmask, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < k_hi
        c64 = cols.to(tl.int64)
        kd_mask = cmask[:, None] & dmask[None, :]
        kt = tl.load(K + c64[:, None] * stride_kt + hk * stride_kh + d[None, :], mask=kd_mask, other=0.0)
        vt = tl.load(V + c64[:, None] * stride_vt + hk * stride_vh + d[None, :], mask=kd_mask, other=0.0)
        s = tl.dot(q, tl.trans(kt), input_precision=PRECISION) * scale
        allowed = (cols[None, :] >= ks[:, None]) & (cols[None, :] < k_end[:, None]) & rmask[:, None]
        p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PRECISION)
        ds = tl.where(allowed, p * (dp - delta[:, None]), 0.0)  # dp may be NaN where p = 0
        dq = _dot_seen(dq, ds, allowed, kt, PRECISION)
    tl.store(DQ + r64[:, None] * stride_dqt + h * stride_dqh + d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=qd_mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SEQ_K, CU_Q, CU_K, scale,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     total_q, total_k, D, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                     PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)  # int64 offsets, as in the forward
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < total_k
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    b = tl.load(SEQ_K + cols, mask=cmask, other=0)
    qs = tl.load(CU_Q + b, mask=cmask, other=0)
    qe = tl.load(CU_Q + b + 1, mask=cmask, other=0)
    ke = tl.load(CU_K + b + 1, mask=cmask, other=0)
    # First query row that may see each key; the tile's query range is the union over its keys.
    q_start = qs
    if CAUSAL:
        q_start = tl.maximum(qs, cols - ke + qe)
    q_lo = tl.min(tl.where(cmask, q_start, 2147483647), axis=0)
    q_hi = tl.max(tl.where(cmask, qe, 0), axis=0)

    c64 = cols.to(tl.int64)
    kd_mask = cmask[:, None] & dmask[None, :]
    kt = tl.load(K + c64[:, None] * stride_kt + hk * stride_kh + d[None, :], mask=kd_mask, other=0.0)
    vt = tl.load(V + c64[:, None] * stride_vt + hk * stride_vh + d[None, :], mask=kd_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for g in range(GROUP):  # GQA: every query head sharing this kv head
        h = hk * GROUP + g
        for m0 in range(q_lo, q_hi, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rmask = rows < q_hi
            r64 = rows.to(tl.int64)
            qd_mask = rmask[:, None] & dmask[None, :]
            q = tl.load(Q + r64[:, None] * stride_qt + h * stride_qh + d[None, :], mask=qd_mask, other=0.0)
            do = tl.load(DO + r64[:, None] * stride_dot + h * stride_doh + d[None, :], mask=qd_mask, other=0.0)
            lse = tl.load(LSE + h * total_q + r64, mask=rmask, other=float("inf"))
            lse = tl.where(lse == float("-inf"), float("inf"), lse)
            delta = tl.load(DELTA + h * total_q + r64, mask=rmask, other=0.0)
            # Transposed scores: keys along dim 0, queries along dim 1.
            st = tl.dot(kt, tl.trans(q), input_precision=PRECISION) * scale
            allowed = (rows[None, :] >= q_start[:, None]) & (rows[None, :] < qe[:, None]) & cmask[:, None]
            pt = tl.where(allowed, tl.exp(st - lse[None, :]), 0.0)
            dv = _dot_seen(dv, pt, allowed, do, PRECISION)
            dpt = tl.dot(vt, tl.trans(do), input_precision=PRECISION)
            dst = tl.where(allowed, pt * (dpt - delta[None, :]), 0.0)  # delta of unseen rows may be NaN
            dk = _dot_seen(dk, dst, allowed, q, PRECISION)
    tl.store(DK + c64[:, None] * stride_dkt + hk * stride_dkh + d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kd_mask)
    tl.store(DV + c64[:, None] * stride_dvt + hk * stride_dvh + d[None, :], dv.to(DV.dtype.element_ty),
             mask=kd_mask)


def _seq_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    """Sequence index of every packed row (int32), computed on the device without a host sync."""
    rows = torch.arange(total, device=cu.device, dtype=torch.int32)
    return torch.searchsorted(cu[1:], rows, right=True, out_int32=True)


class AttentionConfig(NamedTuple):
    block_m: int
    block_n: int
    block_d: int
    num_warps: int
    num_stages: int


def _smem_estimate(kernel: str, bm: int, bn: int, bd: int, stages: int, itemsize: int) -> int:
    """Shared memory of one program, bytes, as Triton 3.x allocates it: the tiles loaded once plus
    ``stages - 1`` buffers (at least one) of each tile the loop loads, plus the layout-conversion
    scratch of the score tile (fp32 ieee dots, an FMA loop, also stage a key tile). Calibrated on
    the compiled kernels; tests/test_triton_compile.py checks the real figure."""
    buf = max(1, stages - 1)
    once, loop = {"fwd": (bm, 2 * bn), "dq": (2 * bm, 2 * bn), "dkdv": (2 * bn, 2 * bm)}[kernel]
    scratch = bm * bn * itemsize + (bn * bd * 4 if itemsize == 4 else 512)
    return (once + buf * loop) * bd * itemsize + scratch


# Preferred first: (BLOCK_M, BLOCK_N, num_warps) per padded head dim.
# Register pressure, measured on the compiled fp16/bf16 kernels: 64x64 at head dim <= 64 spills
# (the non-finite branch of _dot_seen holds three more score-sized accumulators), and 64x32 with
# 4 warps still spills a little on sm_86 (bf16) and, at 128, in the dk/dv kernel; 8 warps do not.
_TILES = {64: ((64, 32, 8), (32, 32, 4)),
          128: ((64, 32, 8), (32, 32, 4), (32, 16, 4), (16, 16, 4)),
          256: ((32, 32, 8), (32, 16, 4), (16, 16, 4))}
SMEM_MARGIN = 0.85  # use at most this fraction of the arch's shared memory


def attention_config(dtype: torch.dtype, head_dim: int, arch: Optional[int], kernel: str = "fwd") -> AttentionConfig:
    """Tiles, warps and pipeline stages of ``kernel`` ("fwd", "dq" or "dkdv") for ``dtype`` inputs of
    head dim ``head_dim`` on compute capability ``arch`` (80 for sm_80; None: the CPU interpreter).

    Fixed per (dtype, head dim, arch), since token counts change from call to call. The head dim is
    padded to a power of two (>= 16) in registers. On a GPU the first of the preferred tiles whose
    shared memory, with two pipeline stages (three where it fits), stays within ``SMEM_MARGIN`` of
    the arch's limit; fp32 tiles take twice the bytes of fp16/bf16 ones, so they step down first.
    tests/test_triton_compile.py compiles every case for sm_80/86/90 and checks the fit."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if arch is None:  # interpreter: tiles small enough to keep numpy temporaries cheap
        return AttentionConfig(32, 32, block_d, 4, 1)
    budget = SMEM_MARGIN * smem_limit(arch)
    item = torch.empty((), dtype=dtype).element_size()
    tiles = _TILES[max(64, block_d)]
    for bm, bn, warps in tiles:
        if arch >= 90 and bm >= 64:
            warps = 8  # wgmma tiles: 4 warps spill in fp16 at 64 rows; 8 do not
        for stages in (3, 2):
            if _smem_estimate(kernel, bm, bn, block_d, stages, item) <= budget:
                return AttentionConfig(bm, bn, block_d, warps, stages)
    bm, bn, warps = tiles[-1]
    return AttentionConfig(bm, bn, block_d, warps, 1)


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool):
    total_q, H, D = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(H, total_q, device=q.device, dtype=torch.float32)
    if total_q == 0:
        return out, lse
    cfg = attention_config(q.dtype, D, device_arch(q.device), "fwd")
    _fwd_kernel[(triton.cdiv(total_q, cfg.block_m), H)](
        q, k, v, out, lse, _seq_ids(cu_q, total_q), cu_q, cu_k, scale,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        total_q, D, GROUP=H // k.shape[1], CAUSAL=causal, PRECISION=_input_precision(q.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool):
    total_q, H, D = q.shape
    total_k, H_kv = k.shape[0], k.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if total_k == 0 and total_q == 0:
        return dq, dk, dv
    delta = (dout.float() * out.float()).sum(-1).t().contiguous()  # (H, total_q)
    arch = device_arch(q.device)
    prec = _input_precision(q.dtype)

    def launch(kernel: str) -> tuple[AttentionConfig, dict]:
        cfg = attention_config(q.dtype, D, arch, kernel)
        return cfg, dict(GROUP=H // H_kv, CAUSAL=causal, PRECISION=prec, BLOCK_M=cfg.block_m,
                         BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages)

    if total_q:
        cfg, common = launch("dq")
        _bwd_dq_kernel[(triton.cdiv(total_q, cfg.block_m), H)](
            q, k, v, dout, lse, delta, dq, _seq_ids(cu_q, total_q), cu_q, cu_k, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), total_q, D, **common)
    if total_k:
        cfg, common = launch("dkdv")
        _bwd_dkdv_kernel[(triton.cdiv(total_k, cfg.block_n), H_kv)](
            q, k, v, dout, lse, delta, dk, dv, _seq_ids(cu_k, total_k), cu_q, cu_k, scale,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            total_q, total_k, D, **common)
    return dq, dk, dv
