"""Gram of per-sample weight gradients of one linear layer, tile by tile.

For a tile of (D_out x D_in) and a block of samples, the kernel forms every sample's tile of
G_b = g_b^T a_b (a batched dot over the tokens), flattens it, and adds the tile's contribution to the
Gram, P_i P_j^T, in fp32. Each program walks a strided set of tiles for one pair of sample blocks and
writes its partial Gram; the partials are summed in a fixed order, so the result is deterministic.
No per-sample gradient ever leaves registers.
"""
from __future__ import annotations

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
def _gram_kernel(a_ptr, g_ptr, part_ptr, B, T, D_in, D_out, sab, sat, sgb, sgt, n_blocks, n_groups,
                 BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    group = tl.program_id(0)
    pair = tl.program_id(1)
    bi = pair // n_blocks
    bj = pair % n_blocks
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
    r = tl.arange(0, BLOCK_B)
    out = part_ptr + ((group * n_blocks + bi) * BLOCK_B + r[:, None]).to(tl.int64) * (n_blocks * BLOCK_B) \
        + bj * BLOCK_B + r[None, :]
    tl.store(out, acc)


def per_sample_grad_gram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """a (B, T, D_in), g (B, T, D_out), unit stride on the last dim -> float32 (B, B)."""
    B, T, D_in = a.shape
    D_out = g.shape[2]
    BLOCK_B, BLOCK_T, BLOCK_O, BLOCK_I = 16, 16, 16, 16
    n_blocks = triton.cdiv(B, BLOCK_B)
    n_tiles = triton.cdiv(D_out, BLOCK_O) * triton.cdiv(D_in, BLOCK_I)
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 1
    n_groups = max(1, min(n_tiles, (4 * sms) // (n_blocks * n_blocks) or 1))
    part = torch.empty(n_groups, n_blocks * BLOCK_B, n_blocks * BLOCK_B, device=a.device, dtype=torch.float32)
    if B and T:
        _gram_kernel[(n_groups, n_blocks * n_blocks)](
            a, g, part, B, T, D_in, D_out, a.stride(0), a.stride(1), g.stride(0), g.stride(1),
            n_blocks, n_groups, BLOCK_B=BLOCK_B, BLOCK_T=BLOCK_T, BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I)
    else:
        part.zero_()
    return part.sum(0)[:B, :B]
