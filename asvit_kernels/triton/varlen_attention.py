"""Attention over packed variable-length sequences: forward, and a two-kernel backward (dk/dv per
key tile, dq per query tile), deterministic, one launch each for the whole batch.

Tiling, chosen per launch (``attention_config.choose_tiling``, from the token and sequence counts
alone, so no host sync): *packed* tiles run over consecutive packed rows, and a tile may hold
several short sequences kept apart by a block-diagonal mask: a batch of 16-token sequences fills
whole tiles instead of padding each to a tile of its own. But a packed tile's key loop spans the
union of its sequences' keys, so for longer sequences most of its scores belong to pairs of
different sequences (49-token windows in 64x32 tiles: 1.5x the score entries of per-sequence
tiles, counted by bench/attention.py --useful-work).
*Per-sequence* tiles (grid = sequences x cdiv(max_seqlen, tile), as flash-attn's) cover one
sequence each and loop over its keys only; surplus tiles of shorter sequences exit at once. The
alternative, skipping the key blocks that no row of a packed tile sees, saves nothing here: the
union of a packed tile's sequences is one contiguous key range, every block of which some row sees.
A given ``max_seqlen`` must be at least the longest sequence, as for flash-attn.

Masks: query row r of sequence b (rows qs..qe-1, keys ks..ke-1, diagonal key c0 = r + ke - qe:
flash-attn's bottom-right alignment) may see key c iff ks <= c < ke, c <= c0 when causal, and
c0 - left <= c <= c0 + right for a window (-1: unbounded). A row that sees no key gets output 0
and lse -inf. Head dims up to 256 are padded to a power of two in registers only.

Softmax in base 2: scores are scaled by ``scale * log2(e)`` (one multiply) and exponentiated with
exp2; lse is returned in natural log. Optional features (window, softcap, ALiBi, dropout; see
attention_features.py) are constexpr flags: a launch without them compiles none of their code.

Backward: 7 tile matmuls per (query tile, key block) pair, against FlashAttention-2's 5: dq's
kernel recomputes S = QK^T and dP = dO V^T (and dQ += dS K), and dk/dv's recomputes both again
(and dV += P^T dO, dK += dS^T Q). FlashAttention-2 computes S and dP once, in the dk/dv loop, and
adds each dS K into dq with atomics, whose order of addition varies from run to run. Separate dq
and dk/dv kernels make every gradient a fixed-order sum: bitwise reproducible, which is the
default here (flash-attn's ``deterministic=True`` costs it a similar recomputation).

Tiles are fixed per (dtype, head dim, arch) by ``attention_config``, not autotuned: an autotuner
picks by timing, which would make the tiles (and the bits of the result) vary between runs and
leave the compile test checking configs that might not run.

Non-finite inputs: a row's output and gradients depend only on what the row sees (its sequence,
cut by its mask); see ``_dot_seen``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_config import AttentionConfig, attention_config, choose_tiling  # noqa: F401
from .attention_features import _keep, _tanh, check_features, dropout_keep_mask  # noqa: F401
from .gather_matmul import _input_precision, device_arch

_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _tile_rows(SEQ, CU, pid, total, tiles_per_seq, PER_SEQ: tl.constexpr, BLOCK: tl.constexpr):
    """Packed rows (queries, or keys for dk/dv) of tile ``pid``, which exist, and their sequence."""
    if PER_SEQ:
        b0 = pid // tiles_per_seq
        rows = tl.load(CU + b0) + (pid % tiles_per_seq) * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < tl.load(CU + b0 + 1)
        b = tl.zeros([BLOCK], tl.int32) + b0
    else:
        rows = pid * BLOCK + tl.arange(0, BLOCK)
        rmask = rows < total
        b = tl.load(SEQ + rows, mask=rmask, other=0)
    return rows, rmask, b


@triton.jit
def _span(lo, hi, center, before, after, valid, CUT_BEFORE: tl.constexpr, CUT_AFTER: tl.constexpr,
          HAS_WINDOW: tl.constexpr):
    """``[lo, hi)`` cut to ``[center - before, center + after]`` (a side < 0: not cut; CUT_*: cut
    at the center itself, i.e. causal) per element, and the union ``[u_lo, u_hi)`` over the
    ``valid`` elements whose span is not empty: a tile's loop bounds."""
    if CUT_BEFORE:
        lo = tl.maximum(lo, center)
    if CUT_AFTER:
        hi = tl.minimum(hi, center + 1)
    if HAS_WINDOW:
        lo = tl.where(before >= 0, tl.maximum(lo, center - before), lo)
        hi = tl.where(after >= 0, tl.minimum(hi, center + after + 1), hi)
    hi = tl.maximum(hi, lo)
    live = valid & (hi > lo)
    return lo, hi, tl.min(tl.where(live, lo, 2147483647), axis=0), tl.max(tl.where(live, hi, 0), axis=0)


@triton.jit
def _row_keys(rows, rmask, b, CU_Q, CU_K, win_left, win_right, CAUSAL: tl.constexpr,
              HAS_WINDOW: tl.constexpr):
    """Per query row: its sequence's first key ``ks``, the keys it sees ``[lo, hi)``, its diagonal
    key; and the tile's key loop ``[k_lo, k_hi)``: the union over the rows that see any key."""
    qe = tl.load(CU_Q + b + 1, mask=rmask, other=0)
    ks = tl.load(CU_K + b, mask=rmask, other=0)
    ke = tl.load(CU_K + b + 1, mask=rmask, other=0)
    diag = rows + ke - qe
    lo, hi, k_lo, k_hi = _span(ks, ke, diag, win_left, win_right, rmask, False, CAUSAL, HAS_WINDOW)
    return ks, lo, hi, diag, k_lo, k_hi


@triton.jit
def _scores(qk, scale, softcap, bias, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Scores in base 2 (log2(e) * the definition's s) from q.k, and tanh(q.k * scale / softcap)
    for the backward (q.k itself without softcap). ``bias``: the ALiBi term slope * |distance|."""
    if HAS_SOFTCAP:
        t = _tanh(qk * (scale / softcap))
        s = t * (softcap * _LOG2E)
    else:
        t = qk
        s = qk * (scale * _LOG2E)
    if HAS_ALIBI:
        s -= bias * _LOG2E
    return s, t


@triton.jit
def _tile_scores(q, kt, cols, lo, hi, rmask, diag, slope, scale, softcap, PRECISION: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """A query tile's base-2 scores against key block ``cols`` (see ``_scores``), and which pairs
    its rows see (forward and dq; dk/dv has the transposed form)."""
    bias = 0.0
    if HAS_ALIBI:
        bias = slope[:, None] * tl.abs(diag[:, None] - cols[None, :]).to(tl.float32)
    s, t = _scores(tl.dot(q, tl.trans(kt), input_precision=PRECISION), scale, softcap, bias,
                   HAS_SOFTCAP, HAS_ALIBI)
    allowed = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None]) & rmask[:, None]
    return s, t, allowed


@triton.jit
def _dot_seen(acc, a, seen, x, PRECISION: tl.constexpr):
    """``acc + a @ x`` where ``a`` is 0 at the pairs ``seen`` excludes and ``x`` may hold NaN/inf.

    A tile mixes sequences (and rows whose masks differ), so a plain dot would turn 0 * inf into
    NaN in rows that never see the value. The finite part goes through the dot; only a tile that
    holds a non-finite ``x`` (rare) pays three 0/1 dots that count, per output element, the NaN /
    +inf / -inf entries its seen pairs meet, and adds them as IEEE would (one at a time: fewer
    live accumulator-sized temporaries)."""
    fin = (x == x) & (tl.abs(x) < float("inf"))
    acc += tl.dot(a.to(x.dtype), tl.where(fin, x, 0.0).to(x.dtype), input_precision=PRECISION)
    if tl.min(fin.to(tl.int32)) == 0:
        hits = seen.to(x.dtype)
        acc += tl.where(tl.dot(hits, (x != x).to(x.dtype), input_precision=PRECISION) > 0, float("nan"), 0.0)
        acc += tl.where(tl.dot(hits, (x == float("inf")).to(x.dtype), input_precision=PRECISION) > 0,
                        float("inf"), 0.0)
        acc += tl.where(tl.dot(hits, (x == float("-inf")).to(x.dtype), input_precision=PRECISION) > 0,
                        float("-inf"), 0.0)
    return acc


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, SEQ_Q, CU_Q, CU_K, ALIBI, scale, softcap, win_left, win_right, dropout_p, seed,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                total_q, D, tiles_per_seq, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, PER_SEQ: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # int64: h * stride_qh exceeds int32 for views of >= 2^31 elements
    hk = h // GROUP
    rows, rmask, b = _tile_rows(SEQ_Q, CU_Q, pid_m, total_q, tiles_per_seq, PER_SEQ, BLOCK_M)
    ks, lo, hi, diag, k_lo, k_hi = _row_keys(rows, rmask, b, CU_Q, CU_K, win_left, win_right, CAUSAL, HAS_WINDOW)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D

    r64 = rows.to(tl.int64)
    q = tl.load(Q + r64[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * tl.num_programs(1) + h, mask=rmask, other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < k_hi
        c64 = cols.to(tl.int64)
        kt = tl.load(K + c64[:, None] * stride_kt + hk * stride_kh + d[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        s, t, allowed = _tile_scores(q, kt, cols, lo, hi, rmask, diag, slope, scale, softcap, PRECISION,
                                     HAS_SOFTCAP, HAS_ALIBI)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if HAS_DROPOUT:  # the normalizer (and lse) count every visible key; only the output drops
            keep = _keep(seed, h, rows[:, None], cols[None, :] - ks[:, None], dropout_p)
            p = p * (keep.to(tl.float32) / (1.0 - dropout_p))
        vt = tl.load(V + c64[:, None] * stride_vt + hk * stride_vh + d[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        acc = _dot_seen(acc * alpha[:, None], p, allowed, vt, PRECISION)
        m_i = m_new
    # l = 0: no key seen (output 0, lse -inf), or every seen score is -inf, a 0/0 softmax (NaN,
    # as the definition's); l NaN (a non-finite score) stays NaN, in lse too.
    seen = l_i != 0
    sees_keys = hi > lo
    undefined = sees_keys[:, None] & ~seen[:, None]
    out = tl.where(undefined, float("nan"), acc / tl.where(seen, l_i, 1.0)[:, None])
    tl.store(O + r64[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(O.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * _LN2,
                   tl.where(sees_keys, float("nan"), float("-inf")))
    tl.store(LSE + h * total_q + r64, lse, mask=rmask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, SEQ_Q, CU_Q, CU_K, ALIBI, scale, softcap, win_left, win_right,
                   dropout_p, seed, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                   stride_dot, stride_doh, stride_dqt, stride_dqh,
                   total_q, D, tiles_per_seq, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                   HAS_DROPOUT: tl.constexpr, PER_SEQ: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # int64: h * stride_qh exceeds int32 for views of >= 2^31 elements
    hk = h // GROUP
    rows, rmask, b = _tile_rows(SEQ_Q, CU_Q, pid_m, total_q, tiles_per_seq, PER_SEQ, BLOCK_M)
    ks, lo, hi, diag, k_lo, k_hi = _row_keys(rows, rmask, b, CU_Q, CU_K, win_left, win_right, CAUSAL, HAS_WINDOW)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D

    r64 = rows.to(tl.int64)
    qd_mask = rmask[:, None] & dmask[None, :]
    q = tl.load(Q + r64[:, None] * stride_qt + h * stride_qh + d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + r64[:, None] * stride_dot + h * stride_doh + d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(LSE + h * total_q + r64, mask=rmask, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * _LOG2E  # rows that saw no key: p = 0
    delta = tl.load(DELTA + h * total_q + r64, mask=rmask, other=0.0)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * tl.num_programs(1) + h, mask=rmask, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(k_lo, k_hi, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        cmask = cols < k_hi
        c64 = cols.to(tl.int64)
        kd_mask = cmask[:, None] & dmask[None, :]
        kt = tl.load(K + c64[:, None] * stride_kt + hk * stride_kh + d[None, :], mask=kd_mask, other=0.0)
        vt = tl.load(V + c64[:, None] * stride_vt + hk * stride_vh + d[None, :], mask=kd_mask, other=0.0)
        s, t, allowed = _tile_scores(q, kt, cols, lo, hi, rmask, diag, slope, scale, softcap, PRECISION,
                                     HAS_SOFTCAP, HAS_ALIBI)
        p = tl.where(allowed, tl.exp2(s - lse2[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(vt), input_precision=PRECISION)
        if HAS_DROPOUT:  # the forward's keep bits, regenerated
            keep = _keep(seed, h, rows[:, None], cols[None, :] - ks[:, None], dropout_p)
            dp = dp * (keep.to(tl.float32) / (1.0 - dropout_p))
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:  # d softcap*tanh(x/softcap) / dx
            ds = ds * (1.0 - t * t)
        ds = tl.where(allowed, ds, 0.0)  # dp, t may be NaN where p = 0 (an unseen non-finite value)
        dq = _dot_seen(dq, ds, allowed, kt, PRECISION)
    tl.store(DQ + r64[:, None] * stride_dqt + h * stride_dqh + d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=qd_mask)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, SEQ_K, CU_Q, CU_K, ALIBI, scale, softcap, win_left,
                     win_right, dropout_p, seed, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_dot, stride_doh, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                     total_q, total_k, D, tiles_per_seq, GROUP: tl.constexpr, CAUSAL: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                     HAS_DROPOUT: tl.constexpr, PER_SEQ: tl.constexpr, PRECISION: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_n = tl.program_id(0)
    hk = tl.program_id(1).to(tl.int64)  # int64 offsets, as in the forward
    cols, cmask, b = _tile_rows(SEQ_K, CU_K, pid_n, total_k, tiles_per_seq, PER_SEQ, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    qs = tl.load(CU_Q + b, mask=cmask, other=0)
    qe = tl.load(CU_Q + b + 1, mask=cmask, other=0)
    ks = tl.load(CU_K + b, mask=cmask, other=0)
    ke = tl.load(CU_K + b + 1, mask=cmask, other=0)
    # The query rows that see each key [q_start, q_end) (the forward's masks, transposed), around
    # the row whose diagonal key this is; the tile's query loop is their union.
    drow = cols - ke + qe
    q_start, q_end, q_lo, q_hi = _span(qs, qe, drow, win_right, win_left, cmask, CAUSAL, False, HAS_WINDOW)

    c64 = cols.to(tl.int64)
    kd_mask = cmask[:, None] & dmask[None, :]
    kt = tl.load(K + c64[:, None] * stride_kt + hk * stride_kh + d[None, :], mask=kd_mask, other=0.0)
    vt = tl.load(V + c64[:, None] * stride_vt + hk * stride_vh + d[None, :], mask=kd_mask, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for g in range(GROUP):  # GQA: every query head sharing this kv head
        h = hk * GROUP + g
        if HAS_ALIBI:
            slope = tl.load(ALIBI + b * (tl.num_programs(1) * GROUP) + h, mask=cmask, other=0.0)
        for m0 in range(q_lo, q_hi, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            rmask = rows < q_hi
            r64 = rows.to(tl.int64)
            qd_mask = rmask[:, None] & dmask[None, :]
            q = tl.load(Q + r64[:, None] * stride_qt + h * stride_qh + d[None, :], mask=qd_mask, other=0.0)
            do = tl.load(DO + r64[:, None] * stride_dot + h * stride_doh + d[None, :], mask=qd_mask, other=0.0)
            lse = tl.load(LSE + h * total_q + r64, mask=rmask, other=float("inf"))
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse) * _LOG2E
            delta = tl.load(DELTA + h * total_q + r64, mask=rmask, other=0.0)
            # Transposed scores: keys along dim 0, queries along dim 1.
            bias = 0.0
            if HAS_ALIBI:
                bias = slope[:, None] * tl.abs(rows[None, :] - drow[:, None]).to(tl.float32)
            st, t = _scores(tl.dot(kt, tl.trans(q), input_precision=PRECISION), scale, softcap, bias,
                            HAS_SOFTCAP, HAS_ALIBI)
            allowed = (rows[None, :] >= q_start[:, None]) & (rows[None, :] < q_end[:, None]) & cmask[:, None]
            pt = tl.where(allowed, tl.exp2(st - lse2[None, :]), 0.0)
            dpt = tl.dot(vt, tl.trans(do), input_precision=PRECISION)
            if HAS_DROPOUT:
                kept = _keep(seed, h, rows[None, :], (cols - ks)[:, None], dropout_p).to(tl.float32)
                kept = kept / (1.0 - dropout_p)
                dv = _dot_seen(dv, pt * kept, allowed, do, PRECISION)
                dpt = dpt * kept
            else:
                dv = _dot_seen(dv, pt, allowed, do, PRECISION)
            dst = pt * (dpt - delta[None, :])
            if HAS_SOFTCAP:
                dst = dst * (1.0 - t * t)
            dst = tl.where(allowed, dst, 0.0)  # delta, dpt, t of unseen pairs may be NaN
            dk = _dot_seen(dk, dst, allowed, q, PRECISION)
    tl.store(DK + c64[:, None] * stride_dkt + hk * stride_dkh + d[None, :], (dk * scale).to(DK.dtype.element_ty),
             mask=kd_mask)
    tl.store(DV + c64[:, None] * stride_dvt + hk * stride_dvh + d[None, :], dv.to(DV.dtype.element_ty),
             mask=kd_mask)


def _seq_ids(cu: torch.Tensor, total: int) -> torch.Tensor:
    """Sequence index of every packed row (int32), computed on the device without a host sync."""
    rows = torch.arange(total, device=cu.device, dtype=torch.int32)
    return torch.searchsorted(cu[1:], rows, right=True, out_int32=True)


def _tiling(cu: torch.Tensor, total: int, total_other: int, max_len: int, max_other: int, tile: int,
            tile_other: int):
    """(grid size, per-sequence?, tiles per sequence) of a launch whose grid runs over ``total``
    rows in tiles of ``tile`` and whose loop runs over the other side in tiles of ``tile_other``."""
    n_seq = cu.numel() - 1
    if choose_tiling(total, total_other, n_seq, max_len, max_other, tile, tile_other) == "per_seq":
        tiles = triton.cdiv(max_len, tile)
        return n_seq * tiles, True, tiles
    return triton.cdiv(total, tile), False, 1


def _features(q, cu_q, window, softcap, alibi, dropout_p, seed) -> tuple[tuple, dict]:
    """The kernels' feature arguments (runtime values, constexpr flags), after checking them."""
    check_features(window, softcap, alibi, dropout_p, seed, cu_q.numel() - 1, q.shape[1], q.device)
    left, right = (int(w) for w in window)
    flags = dict(HAS_WINDOW=(left, right) != (-1, -1), HAS_SOFTCAP=softcap > 0, HAS_ALIBI=alibi is not None,
                 HAS_DROPOUT=dropout_p > 0)
    # A feature that is off gets neutral values (its code is compiled out); alibi's pointer a dummy.
    values = (q if alibi is None else alibi, float(softcap) if softcap > 0 else 1.0, left, right,
              float(dropout_p), int(seed))
    return values, flags


def varlen_forward(q, k, v, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool, *,
                   window: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi=None,
                   dropout_p: float = 0.0, seed: int = 0):
    """(out, lse (H, total_q) in natural log). Extras as the feature interface of
    asvit_kernels.ops.attention (flash-attn 2.6 semantics)."""
    total_q, H, D = q.shape
    feats, flags = _features(q, cu_q, window, softcap, alibi, dropout_p, seed)
    out = torch.empty_like(q)
    lse = torch.empty(H, total_q, device=q.device, dtype=torch.float32)
    if total_q == 0:
        return out, lse
    cfg = attention_config(q.dtype, D, device_arch(q.device), "fwd", flags["HAS_DROPOUT"])
    grid, per_seq, tiles = _tiling(cu_q, total_q, k.shape[0], max_q, max_k, cfg.block_m, cfg.block_n)
    _fwd_kernel[(grid, H)](
        q, k, v, out, lse, _seq_ids(cu_q, total_q), cu_q, cu_k, feats[0], scale, *feats[1:],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), out.stride(0), out.stride(1),
        total_q, D, tiles, GROUP=H // k.shape[1], CAUSAL=causal, PER_SEQ=per_seq,
        PRECISION=_input_precision(q.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags)
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, scale: float, causal: bool, *,
                    window: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi=None,
                    dropout_p: float = 0.0, seed: int = 0):
    """(dq, dk, dv); the extras must be the forward's (dropout regenerates its keep mask from seed)."""
    total_q, H, D = q.shape
    total_k, H_kv = k.shape[0], k.shape[1]
    feats, flags = _features(q, cu_q, window, softcap, alibi, dropout_p, seed)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if total_k == 0 and total_q == 0:
        return dq, dk, dv
    delta = (dout.float() * out.float()).sum(-1).t().contiguous()  # (H, total_q)
    arch = device_arch(q.device)
    prec = _input_precision(q.dtype)

    def launch(kernel: str) -> tuple[AttentionConfig, dict]:
        cfg = attention_config(q.dtype, D, arch, kernel, flags["HAS_DROPOUT"])
        return cfg, dict(GROUP=H // H_kv, CAUSAL=causal, PRECISION=prec, BLOCK_M=cfg.block_m,
                         BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
                         num_stages=cfg.num_stages, **flags)

    if total_q:
        cfg, common = launch("dq")
        grid, per_seq, tiles = _tiling(cu_q, total_q, total_k, max_q, max_k, cfg.block_m, cfg.block_n)
        _bwd_dq_kernel[(grid, H)](
            q, k, v, dout, lse, delta, dq, _seq_ids(cu_q, total_q), cu_q, cu_k, feats[0], scale, *feats[1:],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), total_q, D, tiles, PER_SEQ=per_seq,
            **common)
    if total_k:
        cfg, common = launch("dkdv")
        grid, per_seq, tiles = _tiling(cu_k, total_k, total_q, max_k, max_q, cfg.block_n, cfg.block_m)
        _bwd_dkdv_kernel[(grid, H_kv)](
            q, k, v, dout, lse, delta, dk, dv, _seq_ids(cu_k, total_k), cu_q, cu_k, feats[0], scale, *feats[1:],
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            total_q, total_k, D, tiles, PER_SEQ=per_seq, **common)
    return dq, dk, dv
