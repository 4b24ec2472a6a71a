"""One matmul kernel for every product of an elastic linear layer.

``C[cm(m), cn(n)] = sum_k A[m, k] * B[bk(k), bn(n)] (+ bias[bn(n)])`` where each of ``bk``, ``bn``,
``cm``, ``cn`` is either the identity or a lookup in an int32 index table. With the shared weight as
``B`` (forward, input gradient) or as ``C`` (weight gradient), a channel range that wraps, or several
concatenated ranges, are read or written in place: no sliced copy of the weight is ever made.
Non-wrapping ranges need no table at all: the caller offsets the base pointer instead, which keeps
the loads affine (vectorizable).

When the output has fewer tiles than the GPU has SMs (a weight gradient: C_out x C_in is small, the
token count K is large), K is split over several programs whose fp32 partials a second kernel sums
in a fixed order (``split_k_for``): deterministic, no atomics.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _store_tile(acc, rowsum, offs_m, offs_n, mask_m, mask_n, first_n, bias_ptr, c_ptr, rowsum_ptr, bn,
                cm_idx_ptr, cn_idx_ptr, stride_cm, stride_cn,
                HAS_BIAS: tl.constexpr, HAS_ROWSUM: tl.constexpr, GATHER_CM: tl.constexpr,
                GATHER_CN: tl.constexpr):
    """The epilogue of a finished (BLOCK_M, BLOCK_N) tile: bias, then the store through the tables."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + bn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if GATHER_CM:
        cm = tl.load(cm_idx_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    else:
        cm = offs_m.to(tl.int64)
    if GATHER_CN:
        cn = tl.load(cn_idx_ptr + offs_n, mask=mask_n, other=0).to(tl.int64)
    else:
        cn = offs_n.to(tl.int64)
    tl.store(c_ptr + cm[:, None] * stride_cm + cn[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
    # The row sums of A (the bias gradient, when A is dy^T) are complete in every column block;
    # the first one writes them.
    if HAS_ROWSUM:
        if first_n:
            tl.store(rowsum_ptr + cm, rowsum.to(rowsum_ptr.dtype.element_ty), mask=mask_m)


@triton.jit
def _gather_matmul_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr, rowsum_ptr,
    bk_idx_ptr, bn_idx_ptr, cm_idx_ptr, cn_idx_ptr, ws_ptr, ws_rowsum_ptr,
    M, N, K, k_per_split,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, HAS_ROWSUM: tl.constexpr,
    GATHER_BK: tl.constexpr, GATHER_BN: tl.constexpr, GATHER_CM: tl.constexpr, GATHER_CN: tl.constexpr,
    SPLIT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Grouped launch order: neighbouring programs share B tiles in L2.
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * grid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    # Split-K: program (pid, s) sums K slice s; SPLIT_K == 1 is the whole K.
    k_lo = tl.program_id(1) * k_per_split
    k_hi = min(K, k_lo + k_per_split)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    if GATHER_BN:
        bn = tl.load(bn_idx_ptr + offs_n, mask=mask_n, other=0)
    else:
        bn = offs_n
    rows_a = offs_m.to(tl.int64) * stride_am

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_hi
        if GATHER_BK:
            bk = tl.load(bk_idx_ptr + offs_k, mask=mask_k, other=0)
        else:
            bk = offs_k
        a = tl.load(a_ptr + rows_a[:, None] + offs_k[None, :].to(tl.int64) * stride_ak,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        b = tl.load(b_ptr + bk[:, None].to(tl.int64) * stride_bk + bn[None, :].to(tl.int64) * stride_bn,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        if HAS_ROWSUM:
            rowsum += tl.sum(a.to(tl.float32), axis=1)

    if SPLIT_K == 1:
        _store_tile(acc, rowsum, offs_m, offs_n, mask_m, mask_n, pid_n == 0, bias_ptr, c_ptr, rowsum_ptr, bn,
                    cm_idx_ptr, cn_idx_ptr, stride_cm, stride_cn, HAS_BIAS, HAS_ROWSUM, GATHER_CM, GATHER_CN)
    else:
        # fp32 partials to the (SPLIT_K, M, N) workspace; _split_k_reduce_kernel finishes the tile.
        s = tl.program_id(1).to(tl.int64)
        m64 = offs_m.to(tl.int64)
        tl.store(ws_ptr + (s * M + m64)[:, None] * N + offs_n[None, :], acc,
                 mask=mask_m[:, None] & mask_n[None, :])
        if HAS_ROWSUM:
            if pid_n == 0:
                tl.store(ws_rowsum_ptr + s * M + m64, rowsum, mask=mask_m)


@triton.jit
def _split_k_reduce_kernel(
    ws_ptr, ws_rowsum_ptr, bias_ptr, c_ptr, rowsum_ptr, bn_idx_ptr, cm_idx_ptr, cn_idx_ptr,
    M, N, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, HAS_ROWSUM: tl.constexpr,
    GATHER_BN: tl.constexpr, GATHER_CM: tl.constexpr, GATHER_CN: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Sum the split-K partials in the fixed order 0..SPLIT_K-1 (deterministic, no atomics)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    m64 = offs_m.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    rowsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + (s * M + m64)[:, None] * N + offs_n[None, :],
                       mask=mask_m[:, None] & mask_n[None, :], other=0.0)
        if HAS_ROWSUM:
            if pid_n == 0:
                rowsum += tl.load(ws_rowsum_ptr + s * M + m64, mask=mask_m, other=0.0)
    if GATHER_BN:
        bn = tl.load(bn_idx_ptr + offs_n, mask=mask_n, other=0)
    else:
        bn = offs_n
    _store_tile(acc, rowsum, offs_m, offs_n, mask_m, mask_n, pid_n == 0, bias_ptr, c_ptr, rowsum_ptr, bn,
                cm_idx_ptr, cn_idx_ptr, stride_cm, stride_cn, HAS_BIAS, HAS_ROWSUM, GATHER_CM, GATHER_CN)


def _input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s precision for ``dtype``: fp32 follows ``torch.backends.cuda.matmul.allow_tf32``
    (tf32 tensor cores when True, ieee fp32 FMA otherwise, read at every call as torch's own matmul
    reads it), so "fp32" means what it means in ``F.linear``; fp16/bf16 are always tensor-core."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


class MatmulConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int


# Max shared memory per block (opt-in) by compute capability, bytes (CUDA programming guide).
SMEM_LIMIT = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}


def smem_limit(arch: int) -> int:
    """Per-block shared memory of compute capability ``arch`` (e.g. 86); unknown newer archs get
    sm_90's, unknown older ones the smallest."""
    if arch in SMEM_LIMIT:
        return SMEM_LIMIT[arch]
    return SMEM_LIMIT[90] if arch > 90 else SMEM_LIMIT[75]


def device_arch(device: torch.device) -> Optional[int]:
    """Compute capability as an int (80 for sm_80) of a CUDA device; None for the CPU interpreter."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def matmul_config(M: int, N: int, K: int, dtype: torch.dtype, arch: Optional[int]) -> MatmulConfig:
    """Tiles, warps and pipeline stages for an (M, N, K) product of ``dtype`` on compute capability
    ``arch`` (None: the CPU interpreter). A fixed table, no autotuning, because token counts vary from
    call to call and each new shape would re-tune. Stages are sized so that the A and B tiles of
    every stage take at most about 2/3 of the arch's shared memory (the epilogue's layout conversion
    reuses the same space): tests/test_triton_compile.py compiles each entry for sm_80/86/90."""
    if arch is None:  # interpreter: fewer, larger programs run faster
        return MatmulConfig(64, 64, 64, 4, 1, 8)
    bm, bn, bk, warps = (128, 128, 32, 8) if M >= 128 and N >= 128 else (64, 64, 32, 4)
    per_stage = (bm + bn) * bk * dtype.itemsize
    stages = max(2, min(4, (2 * smem_limit(arch) // 3) // per_stage))
    return MatmulConfig(bm, bn, bk, warps, stages, 8)


# Split-K: only when the output tiles leave SMs idle, and only with enough K per split to amortise
# the fp32 workspace round trip (an estimate, not tuned on a GPU).
MIN_K_PER_SPLIT = 256
MAX_SPLIT_K = 16


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the interpreter (no split unless asked)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_k_for(M: int, N: int, K: int, cfg: MatmulConfig, sms: int) -> int:
    """How many K slices an (M, N, K) product runs as: 1 when its output tiles fill the ``sms`` SMs,
    else enough slices to reach about one program per SM (a 768x384 weight gradient is 18 tiles of
    128x128; over 12608 tokens on 132 SMs it runs as 8 slices, 144 programs)."""
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    if tiles >= sms:
        return 1
    return max(1, min(triton.cdiv(sms, tiles), K // MIN_K_PER_SPLIT, MAX_SPLIT_K))


def gather_matmul(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, *,
                  bk_idx: Optional[torch.Tensor] = None, bn_idx: Optional[torch.Tensor] = None,
                  cm_idx: Optional[torch.Tensor] = None, cn_idx: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, rowsum: Optional[torch.Tensor] = None,
                  n: Optional[int] = None, k: Optional[int] = None, split_k: Optional[int] = None) -> torch.Tensor:
    """Write ``a @ b[bk, bn] (+ bias[bn])`` into ``c[cm, cn]``; optionally ``rowsum[cm] = a.sum(1)``.

    ``a`` is ``(M, K)`` (any strides); ``b`` is indexed as ``b[bk(k), bn(n)]`` and ``c`` as
    ``c[cm(m), cn(n)]`` with the identity where no table is given. ``n``/``k`` give N and K when a
    table does not imply them. Index tables are int32 on ``a``'s device. fp32 runs in tf32 exactly
    when ``torch.backends.cuda.matmul.allow_tf32`` is True (as torch's matmuls do), else ieee fp32.

    ``split_k``: K slices (None: ``split_k_for``). With more than one, each slice writes fp32
    partials to a workspace and a second kernel sums them in slice order: deterministic, no atomics.
    """
    M, K = a.shape
    K = k if k is not None else (bk_idx.numel() if bk_idx is not None else K)
    N = n if n is not None else (bn_idx.numel() if bn_idx is not None else b.shape[1])
    if M == 0 or N == 0:
        return c
    cfg = matmul_config(M, N, K, a.dtype, device_arch(a.device))
    if split_k is None:
        split_k = split_k_for(M, N, K, cfg, sm_count(a.device))
    # Whole K blocks per slice; recount so that no slice is empty.
    k_per_split = triton.cdiv(triton.cdiv(max(K, 1), split_k), cfg.block_k) * cfg.block_k
    split_k = max(1, triton.cdiv(K, k_per_split))
    ws = ws_rowsum = c  # stand-ins for absent pointers, never dereferenced
    if split_k > 1:
        ws = torch.empty(split_k, M, N, device=a.device, dtype=torch.float32)
        if rowsum is not None:
            ws_rowsum = torch.empty(split_k, M, device=a.device, dtype=torch.float32)
    grid = (triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n), split_k)
    dummy = c
    flags = dict(HAS_BIAS=bias is not None, HAS_ROWSUM=rowsum is not None, GATHER_BN=bn_idx is not None,
                 GATHER_CM=cm_idx is not None, GATHER_CN=cn_idx is not None)
    bias_p, rowsum_p = (bias if bias is not None else dummy), (rowsum if rowsum is not None else dummy)
    bn_p, cm_p, cn_p = (t if t is not None else dummy for t in (bn_idx, cm_idx, cn_idx))
    _gather_matmul_kernel[grid](
        a, b, bias_p, c, rowsum_p, bk_idx if bk_idx is not None else dummy, bn_p, cm_p, cn_p, ws, ws_rowsum,
        M, N, K, k_per_split,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1),
        GATHER_BK=bk_idx is not None, SPLIT_K=split_k, INPUT_PRECISION=_input_precision(a.dtype),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )
    if split_k > 1:
        rb = reduce_config(device_arch(a.device))
        _split_k_reduce_kernel[(triton.cdiv(M, rb), triton.cdiv(N, rb))](
            ws, ws_rowsum, bias_p, c, rowsum_p, bn_p, cm_p, cn_p, M, N, c.stride(0), c.stride(1),
            SPLIT_K=split_k, BLOCK_M=rb, BLOCK_N=rb, num_warps=4, **flags)
    return c


def reduce_config(arch: Optional[int]) -> int:
    """Square tile side of the split-K reduction (a memory-bound sum: small tiles, many programs)."""
    return 64 if arch is None else 32
