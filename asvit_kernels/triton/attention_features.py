"""flash-attn's optional attention features for the Triton varlen kernels: local windows, softcap,
ALiBi and dropout. The jit helpers here are inlined by the kernels in varlen_attention.py, each
behind a constexpr flag, so a kernel without a feature compiles without its code.

Dropout draws one Philox number per score entry, keyed by (seed, query head, global query row,
local key index): counters (j, row, h, 0) under key ``seed``. Every tile of the forward and of
both backward kernels regenerates the same bit for the same entry, whatever the tiling, and
``dropout_keep_mask`` writes it out for tests.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    """tanh from exp (libdevice's has no interpreter implementation); exact to ~1 ulp of 1."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _keep(seed, h, rows, keys, dropout_p):
    """Keep bits of dropout for query head ``h``, global query rows ``rows`` and local key indices
    ``keys`` (broadcast against each other): Philox uniform >= dropout_p."""
    zero = (rows + keys) * 0
    r0, _, _, _ = tl.philox(seed, (keys + zero).to(tl.int32), (rows + zero).to(tl.int32),
                            (zero + h).to(tl.int32), zero.to(tl.int32))
    return tl.uint_to_uniform_float(r0) >= dropout_p


@triton.jit
def _keep_mask_kernel(OUT, seed, dropout_p, q_start, len_q, len_k,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    h = tl.program_id(2)
    i = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(seed, h, q_start + i[:, None], j[None, :], dropout_p)
    offs = (h * len_q + i[:, None]).to(tl.int64) * len_k + j[None, :]
    tl.store(OUT + offs, keep.to(tl.int8), mask=(i[:, None] < len_q) & (j[None, :] < len_k))


def dropout_keep_mask(seed: int, dropout_p: float, cu_q: torch.Tensor, cu_k: torch.Tensor, H: int,
                      device) -> list[torch.Tensor]:
    """The keep mask the kernels apply: one (H, len_q, len_k) bool tensor per sequence (for tests:
    it reads the lengths on the host and launches once per sequence)."""
    check_features(window=(-1, -1), softcap=0.0, alibi=None, dropout_p=dropout_p, seed=seed,
                   n_seq=cu_q.numel() - 1, H=H, device=torch.device(device))
    bq, bk = cu_q.tolist(), cu_k.tolist()
    masks = []
    for b in range(len(bq) - 1):
        lq, lk = bq[b + 1] - bq[b], bk[b + 1] - bk[b]
        out = torch.zeros(H, lq, lk, dtype=torch.int8, device=device)
        if H and lq and lk:
            grid = (triton.cdiv(lq, 32), triton.cdiv(lk, 32), H)
            _keep_mask_kernel[grid](out, seed, float(dropout_p), bq[b], lq, lk, BLOCK_M=32, BLOCK_N=32)
        masks.append(out.bool())
    return masks


def check_features(window, softcap, alibi: Optional[torch.Tensor], dropout_p, seed, n_seq: int, H: int,
                   device: torch.device) -> None:
    """ValueError/TypeError naming the argument, before any launch."""
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window)):
        raise TypeError(f"window must be a pair of ints (left, right), got {window!r}")
    if any(w < -1 for w in window):
        raise ValueError(f"window entries must be >= 0, or -1 for unbounded, got {tuple(window)}")
    if not isinstance(softcap, numbers.Real) or isinstance(softcap, bool):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not (softcap >= 0 and softcap < float("inf")):
        raise ValueError(f"softcap must be finite and >= 0 (0 disables it), got {softcap}")
    if not isinstance(dropout_p, numbers.Real) or isinstance(dropout_p, bool):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2 ** 31:
        raise ValueError(f"seed must be in [0, 2**31), got {seed}")
    if alibi is not None:
        if not isinstance(alibi, torch.Tensor):
            raise TypeError(f"alibi must be a tensor or None, got {type(alibi).__name__}")
        if alibi.dtype != torch.float32 or tuple(alibi.shape) != (n_seq, H) or not alibi.is_contiguous():
            raise ValueError(f"alibi must be a contiguous float32 tensor of shape (batch, H) = {(n_seq, H)}, "
                             f"got {alibi.dtype} {tuple(alibi.shape)}"
                             f"{'' if alibi.is_contiguous() else ' (not contiguous)'}")
        if alibi.device != device:
            raise ValueError(f"alibi must be on {device}, got {alibi.device}")
