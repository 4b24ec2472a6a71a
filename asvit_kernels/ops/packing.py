"""Between padded ``(B, N, ...)`` batches with per-sample lengths and packed ``(total, ...)`` form
with flash-attn style ``cu_seqlens``. Both directions are differentiable (plain indexing)."""
from __future__ import annotations

from typing import Sequence, Union

import torch

Lengths = Union[torch.Tensor, Sequence[int]]


def _lengths(seq_lens: Lengths, B: int, N: int, device) -> torch.Tensor:
    lens = torch.as_tensor(seq_lens, device=device)
    if lens.dim() != 1 or lens.numel() != B:
        raise ValueError(f"seq_lens must be 1-D with one length per sample ({B}), got shape {tuple(lens.shape)}")
    if lens.is_floating_point() or lens.is_complex() or lens.dtype == torch.bool:
        raise TypeError(f"seq_lens must hold integers, got {lens.dtype}")
    if B and (int(lens.min()) < 0 or int(lens.max()) > N):
        raise ValueError(f"seq_lens must lie in [0, {N}] (the padded length), got {lens.tolist()}")
    return lens.long()


def cu_seqlens_from_lengths(seq_lens: Lengths, device=None) -> torch.Tensor:
    """int32 ``(B + 1,)``: 0 followed by the running sum of the lengths."""
    lens = torch.as_tensor(seq_lens, device=device).long()
    return torch.cat([lens.new_zeros(1), lens.cumsum(0)]).to(torch.int32)


def pack(x: torch.Tensor, seq_lens: Lengths) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``x`` (B, N, ...) and B valid lengths -> (packed (total, ...), cu_seqlens int32 (B+1,), max_len)."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise TypeError("x must be a tensor of shape (B, N, ...)")
    B, N = x.shape[:2]
    lens = _lengths(seq_lens, B, N, x.device)
    keep = torch.arange(N, device=x.device)[None, :] < lens[:, None]
    return x[keep], cu_seqlens_from_lengths(lens), int(lens.max()) if B else 0


def unpack(packed: torch.Tensor, cu_seqlens: torch.Tensor, max_len: int) -> torch.Tensor:
    """Packed (total, ...) -> (B, max_len, ...), zeros past each sample's length."""
    if not isinstance(packed, torch.Tensor) or packed.dim() < 1:
        raise TypeError("packed must be a tensor of shape (total, ...)")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise TypeError("cu_seqlens must be a 1-D integer tensor (B + 1,)")
    if cu_seqlens.is_floating_point() or cu_seqlens.is_complex() or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must hold integers, got {cu_seqlens.dtype}")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0:
        raise ValueError(f"max_len must be a non-negative int, got {max_len!r}")
    cu = cu_seqlens.long().to(packed.device)
    lens = cu[1:] - cu[:-1]
    steps = lens if lens.numel() else cu.new_zeros(1)
    first, last, low, longest = torch.stack([cu[0], cu[-1], steps.min(), steps.max()]).tolist()  # one host read
    # The order matters: a decreasing cu has negative lengths, which no max_len can explain.
    if first != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu.tolist()}")
    if low < 0:
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu.tolist()}")
    if last != packed.shape[0]:
        raise ValueError(f"cu_seqlens[-1] ({last}) must equal the number of packed rows ({packed.shape[0]})")
    if longest > max_len:
        raise ValueError(f"max_len ({max_len}) is shorter than the longest sequence ({longest})")
    keep = torch.arange(max_len, device=packed.device)[None, :] < lens[:, None]
    out = packed.new_zeros(lens.numel(), max_len, *packed.shape[1:])
    return out.index_put((keep,), packed)
