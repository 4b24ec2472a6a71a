"""Tile configuration of the Triton varlen attention kernels, the per-call choice between packed
and per-sequence tiles, and an exact count of the score entries each choice computes.

Pure Python: the launchers, tests/test_triton_compile.py and bench/attention.py all read the tiles
from here, so there is one table and one tiling rule.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import torch
import triton

from .gather_matmul import smem_limit


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
# (the non-finite branch of _dot_seen holds more score-sized temporaries), and 64x32 with 4 warps
# still spills a little on sm_86 (bf16) and, at 128, in the dk/dv kernel; 8 warps do not.
# Above 128 the tiles keep 32 rows (no wgmma on sm_90, which needs 64): 64x32 at padded head dim
# 256 fits shared memory on every arch, but spills on each (bf16/fp16, compiled: fwd 16-152 B,
# dq 0-248 B, dk/dv 184-320 B per thread with 8 warps; 16 warps cap registers at 128 and spill
# 296-464 B), since the 64x256 fp32 accumulator alone takes 64 registers per thread.
_TILES = {64: ((64, 32, 8), (32, 32, 4)),
          128: ((64, 32, 8), (32, 32, 4), (32, 16, 4), (16, 16, 4)),
          256: ((32, 32, 8), (32, 16, 4), (16, 16, 4))}
SMEM_MARGIN = 0.85  # use at most this fraction of the arch's shared memory


def attention_config(dtype: torch.dtype, head_dim: int, arch: Optional[int], kernel: str = "fwd",
                     dropout: bool = False) -> AttentionConfig:
    """Tiles, warps and pipeline stages of ``kernel`` ("fwd", "dq" or "dkdv") for ``dtype`` inputs of
    head dim ``head_dim`` on compute capability ``arch`` (80 for sm_80; None: the CPU interpreter).

    Fixed per (dtype, head dim, arch), since token counts change from call to call. The head dim is
    padded to a power of two (>= 16) in registers. On a GPU the first of the preferred tiles whose
    shared memory, with two pipeline stages (three where it fits), stays within ``SMEM_MARGIN`` of
    the arch's limit; fp32 tiles take twice the bytes of fp16/bf16 ones, so they step down first.
    tests/test_triton_compile.py compiles every case for sm_80/86/90 and checks the fit.

    ``dropout``: smaller score tiles on a GPU, since Philox holds four 32-bit words per score entry.
    Compiled with every feature on (bf16): at the plain tiles fwd/dq spilled 32-40 B (head dim 64,
    sm_80), dq 16 B and dk/dv 8 B at 128; with the forward and dq at half BLOCK_N, dq at <= 32 rows
    from head dim 128, and dk/dv at half BLOCK_M from 128, none did, except dk/dv at 256 on sm_86
    (8 B at 16x32).

    Not ``triton.autotune``: it would pick the config by timing on the first call, so the tiles
    (hence the summation order and the bits of the result) could differ from run to run and
    machine to machine, and the compile test could no longer check the configs that actually run."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    if arch is None:  # interpreter: tiles small enough to keep numpy temporaries cheap
        return AttentionConfig(32, 32, block_d, 4, 1)
    budget = SMEM_MARGIN * smem_limit(arch)
    item = torch.empty((), dtype=dtype).element_size()
    tiles = _TILES[max(64, block_d)]
    for bm, bn, warps in tiles:
        if arch >= 90 and bm >= 64:
            warps = 8  # wgmma tiles: 4 warps spill in fp16 at 64 rows; 8 do not
        if dropout and kernel == "dkdv":
            bm = max(16, bm // 2) if block_d >= 128 else bm
        elif dropout:
            bn = max(16, bn // 2)
            bm = min(bm, 32) if kernel == "dq" and block_d >= 128 else bm
        for stages in (3, 2):
            if _smem_estimate(kernel, bm, bn, block_d, stages, item) <= budget:
                return AttentionConfig(bm, bn, block_d, warps, stages)
    bm, bn, warps = tiles[-1]
    return AttentionConfig(bm, bn, block_d, warps, 1)


# ------------------------------------------------------------------------------ tiling per call

def choose_tiling(total_q: int, total_k: int, n_seq: int, max_q: int, max_k: int, tile_rows: int,
                  tile_keys: int) -> str:
    """"packed" or "per_seq" for one launch, from sizes known without reading the lengths.

    ``tile_rows`` is the tile's extent along the launch's grid axis (BLOCK_M for the forward and
    dq, BLOCK_N for dk/dv, whose grid runs over keys: pass the key side as ``*_q`` there) and
    ``tile_keys`` the extent of its loop. Packed: a tile meets about ``(tile_rows - 1) / len_q + 1``
    sequences of the mean lengths and loops over all of their keys. Per-sequence: every sequence
    padded to whole tiles of the longest one (an upper bound; exact for equal lengths). The smaller
    estimate wins; ties and unknown maxima go to packed (it needs no max_seqlen)."""
    if n_seq == 0 or total_q == 0 or total_k == 0 or max_q <= 0 or max_k <= 0:
        return "packed"
    lq, lk = total_q / n_seq, total_k / n_seq
    span = min(total_k, ((tile_rows - 1) / lq + 1) * lk)
    packed = math.ceil(total_q / tile_rows) * tile_rows * math.ceil(span / tile_keys) * tile_keys
    per_seq = n_seq * math.ceil(max_q / tile_rows) * tile_rows * math.ceil(max_k / tile_keys) * tile_keys
    return "per_seq" if per_seq < packed else "packed"


def _visible_ranges(lens_q: Sequence[int], lens_k: Sequence[int], causal: bool, window: tuple[int, int]):
    """Per packed query row the global keys [lo, hi) it may see, and per key the query rows
    [q_lo, q_hi) that see it, as the kernels' masks compute them."""
    import numpy as np

    lq, lk = np.asarray(lens_q, np.int64), np.asarray(lens_k, np.int64)
    cu_q, cu_k = np.concatenate([[0], np.cumsum(lq)]), np.concatenate([[0], np.cumsum(lk)])
    left, right = window
    if causal:
        right = 0 if right < 0 else min(right, 0)

    b = np.repeat(np.arange(len(lq)), lq)
    ks, ke, qe = cu_k[b], cu_k[b + 1], cu_q[b + 1]
    diag = np.arange(int(cu_q[-1])) + ke - qe  # the key on the row's bottom-right diagonal
    lo = np.maximum(ks, diag - left) if left >= 0 else ks
    hi = np.minimum(ke, diag + right + 1) if right >= 0 else ke

    b = np.repeat(np.arange(len(lk)), lk)
    qs, qe, ke = cu_q[b], cu_q[b + 1], cu_k[b + 1]
    row = np.arange(int(cu_k[-1])) - ke + qe  # the row whose diagonal is this key
    q_lo = np.maximum(qs, row - right) if right >= 0 else qs
    q_hi = np.minimum(qe, row + left + 1) if left >= 0 else qe
    return cu_q, cu_k, lo, np.maximum(hi, lo), q_lo, np.maximum(q_hi, q_lo)


def _tile_entries(starts, ends, lo, hi, rows: int, keys: int) -> int:
    """Score entries computed by tiles over [starts, ends) (their own rows) whose loop spans the
    union of the rows' [lo, hi) in blocks of ``keys``: rows x blocks x keys per tile."""
    total = 0
    for s, e in zip(starts, ends):
        seen = hi[s:e] > lo[s:e]
        if e > s and seen.any():
            span = int(hi[s:e][seen].max() - lo[s:e][seen].min())
            total += rows * -(-span // keys) * keys
    return total


def computed_score_entries(lens_q: Sequence[int], lens_k: Sequence[int], block_m: int, block_n: int,
                           tiling: str, causal: bool = False, window: tuple[int, int] = (-1, -1)) -> dict:
    """Exact score entries the three kernels compute for these lengths and tiles, and the useful
    (visible) ones: {"useful", "fwd", "dkdv"} (dq's tiles are the forward's). Mirrors the kernels'
    loop bounds: a tile's loop runs from the least first visible key (row) of its rows (keys) to
    the greatest last, in whole blocks from there."""
    import numpy as np

    cu_q, cu_k, lo, hi, q_lo, q_hi = _visible_ranges(lens_q, lens_k, causal, window)
    useful = int((hi - lo).sum())
    total_q, total_k = int(cu_q[-1]), int(cu_k[-1])

    def tiles(cu, total, size):
        if tiling == "packed":
            starts = np.arange(0, total, size)
            return starts, np.minimum(starts + size, total)
        starts = np.concatenate([np.arange(a, b, size) for a, b in zip(cu[:-1], cu[1:])] or [np.zeros(0, np.int64)])
        ends = np.concatenate([np.minimum(np.arange(a, b, size) + size, b) for a, b in zip(cu[:-1], cu[1:])]
                              or [np.zeros(0, np.int64)])
        return starts.astype(np.int64), ends.astype(np.int64)

    fwd = _tile_entries(*tiles(cu_q, total_q, block_m), lo, hi, block_m, block_n)
    dkdv = _tile_entries(*tiles(cu_k, total_k, block_n), q_lo, q_hi, block_n, block_m)
    return {"useful": useful, "fwd": fwd, "dkdv": dkdv}
