"""Gram of per-sample weight gradients of one linear layer, tile by tile.

For a tile of (D_out x D_in) and a block of samples, the kernel forms every sample's tile of
G_b = g_b^T a_b (a batched dot over the tokens), flattens it, and adds the tile's contribution to the
Gram, P_i P_j^T, in fp32. Each program walks a strided set of tiles for one pair of sample blocks (bi <= bj:
the Gram is symmetric, so the pair is computed once and written to both blocks) and writes its partial
Gram; the partials are summed in a fixed order, so the result is deterministic.
No per-sample gradient ever leaves registers.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _sample_tiles(a_ptr, g_ptr, b0, B, T, o0, i0, D_in, D_out, sab, sat, sgb, sgt,
                  BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    """(BLOCK_B, BLOCK_O * BLOCK_I): sample b's tile of g_b^T a_b, flattened, for samples b0.."""
    bs = b0 + tl.arange(0, BLOCK_B)
    os = o0 + tl.arange(0, BLOCK_O)
    cs = i0 + tl.arange(0, BLOCK_I)
    bmask = bs < B
    b64 = bs.to(tl.int64)
    acc = tl.zeros((BLOCK_B, BLOCK_O, BLOCK_I), tl.float32)
    for t0 in range(0, T, BLOCK_T):
        ts = t0 + tl.arange(0, BLOCK_T)
        bt_mask = bmask[:, None, None] & (ts < T)[None, :, None]
        t64 = ts.to(tl.int64)
        g = tl.load(g_ptr + b64[:, None, None] * sgb + t64[None, :, None] * sgt + os[None, None, :],
                    mask=bt_mask & (os < D_out)[None, None, :], other=0.0)
        a = tl.load(a_ptr + b64[:, None, None] * sab + t64[None, :, None] * sat + cs[None, None, :],
                    mask=bt_mask & (cs < D_in)[None, None, :], other=0.0)
        acc += tl.dot(tl.permute(g, (0, 2, 1)), a, input_precision="ieee")
    return tl.reshape(acc, (BLOCK_B, BLOCK_O * BLOCK_I))


@triton.jit
def _gram_kernel(a_ptr, g_ptr, part_ptr, pairs_ptr, B, T, D_in, D_out, sab, sat, sgb, sgt, n_blocks, n_groups,
                 BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    # 1-D grid over (block pair, tile group): pairs bi <= bj only (the Gram is symmetric); the
    # transposed block is written by the same program. x grid limit 2^31 - 1, not y's 65535.
    pid = tl.program_id(0)
    pair = pid // n_groups
    group = pid % n_groups
    bi = tl.load(pairs_ptr + 2 * pair)
    bj = tl.load(pairs_ptr + 2 * pair + 1)
    tiles_i = tl.cdiv(D_in, BLOCK_I)
    n_tiles = tl.cdiv(D_out, BLOCK_O) * tiles_i
    acc = tl.zeros((BLOCK_B, BLOCK_B), tl.float32)
    for tile in range(group, n_tiles, n_groups):
        o0 = (tile // tiles_i) * BLOCK_O
        i0 = (tile % tiles_i) * BLOCK_I
        p_i = _sample_tiles(a_ptr, g_ptr, bi * BLOCK_B, B, T, o0, i0, D_in, D_out, sab, sat, sgb, sgt,
                            BLOCK_B, BLOCK_T, BLOCK_O, BLOCK_I)
        p_j = _sample_tiles(a_ptr, g_ptr, bj * BLOCK_B, B, T, o0, i0, D_in, D_out, sab, sat, sgb, sgt,
                            BLOCK_B, BLOCK_T, BLOCK_O, BLOCK_I)
        acc += tl.dot(p_i, tl.trans(p_j), input_precision="ieee")
    r = tl.arange(0, BLOCK_B).to(tl.int64)
    ld = n_blocks * BLOCK_B  # the partials' leading dimension; products below are int64
    base = part_ptr + group.to(tl.int64) * ld * ld
    row_i = bi.to(tl.int64) * BLOCK_B + r
    row_j = bj.to(tl.int64) * BLOCK_B + r
    tl.store(base + row_i[:, None] * ld + row_j[None, :], acc)
    if bi != bj:  # mirror: element (i, j) of this block is element (j, i) of block (bj, bi)
        tl.store(base + row_j[None, :] * ld + row_i[:, None], acc)


def device_arch(device: torch.device) -> Optional[int]:
    """Compute capability as an int (80 for sm_80) of a CUDA device; None for the CPU interpreter."""
    if device.type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


class GramConfig(NamedTuple):
    block_b: int
    block_t: int
    block_o: int
    block_i: int
    num_warps: int
    num_stages: int


def gram_config(dtype: torch.dtype, arch: Optional[int]) -> GramConfig:
    """Tiles for ``dtype`` inputs on compute capability ``arch`` (e.g. 80; None: the CPU
    interpreter). One table for all: the tiles are small (fp32 accumulation of 16x16x16 products),
    so they fit every arch's shared memory without spilling; two stages of the token loop."""
    return GramConfig(16, 16, 16, 16, 4, 2)


def n_tile_groups(B: int, D_in: int, D_out: int, cfg: GramConfig, sms: int) -> int:
    """How many programs split one block pair's tiles: enough programs to fill ``sms`` SMs about
    four deep, at most one per tile."""
    n_blocks = triton.cdiv(B, cfg.block_b)
    n_pairs = n_blocks * (n_blocks + 1) // 2
    n_tiles = triton.cdiv(D_out, cfg.block_o) * triton.cdiv(D_in, cfg.block_i)
    return max(1, min(n_tiles, (4 * sms) // n_pairs))


def grid(B: int, n_groups: int, cfg: GramConfig) -> tuple[int]:
    """The launch grid: one program per (upper-triangle block pair, tile group), all along x."""
    n_blocks = triton.cdiv(B, cfg.block_b)
    return (n_blocks * (n_blocks + 1) // 2 * n_groups,)


def per_sample_grad_gram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """a (B, T, D_in), g (B, T, D_out), unit stride on the last dim -> float32 (B, B)."""
    B, T, D_in = a.shape
    D_out = g.shape[2]
    cfg = gram_config(a.dtype, device_arch(a.device))
    n_blocks = triton.cdiv(B, cfg.block_b)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 1
    n_groups = n_tile_groups(B, D_in, D_out, cfg, sms)
    part = torch.empty(n_groups, n_blocks * cfg.block_b, n_blocks * cfg.block_b, device=a.device,
                       dtype=torch.float32)
    if B and T:
        pairs = torch.triu_indices(n_blocks, n_blocks, device=a.device).t().to(torch.int32).contiguous()
        _gram_kernel[grid(B, n_groups, cfg)](
            a, g, part, pairs, B, T, D_in, D_out, a.stride(0), a.stride(1), g.stride(0), g.stride(1),
            n_blocks, n_groups, BLOCK_B=cfg.block_b, BLOCK_T=cfg.block_t, BLOCK_O=cfg.block_o,
            BLOCK_I=cfg.block_i, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    else:
        part.zero_()
    return part.sum(0)[:B, :B]
