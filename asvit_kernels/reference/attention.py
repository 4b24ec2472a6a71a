"""Ground truth for attention over packed variable-length sequences: one sequence at a time,
softmax(scale * q k^T) v with flash-attn's masks, in whatever dtype the inputs have (use float64)."""
from __future__ import annotations

from typing import Optional

import torch


def causal_mask(len_q: int, len_k: int, device=None) -> torch.Tensor:
    """(len_q, len_k) bool, True where query i may see key j: ``j <= i + len_k - len_q``
    (bottom-right aligned, as flash-attn >= 2.1)."""
    i = torch.arange(len_q, device=device)[:, None]
    j = torch.arange(len_k, device=device)[None, :]
    return j <= i + (len_k - len_q)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: Optional[torch.Tensor] = None, softmax_scale: Optional[float] = None,
                     causal: bool = False) -> torch.Tensor:
    """q (total_q, H, D), k/v (total_k, H_kv, D) -> (total_q, H, D). A query row with no key it may
    see returns zeros."""
    cu_k = cu_seqlens_q if cu_seqlens_k is None else cu_seqlens_k
    H, H_kv, D = q.shape[1], k.shape[1], q.shape[2]
    scale = D ** -0.5 if softmax_scale is None else softmax_scale
    outs = []
    for b in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_k[b]), int(cu_k[b + 1])
        qb = q[qs:qe].transpose(0, 1)                                      # (H, Lq, D)
        kb = k[ks:ke].transpose(0, 1).repeat_interleave(H // H_kv, dim=0)  # (H, Lk, D)
        vb = v[ks:ke].transpose(0, 1).repeat_interleave(H // H_kv, dim=0)
        outs.append(_sequence(qb, kb, vb, scale, causal).transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def _sequence(qb: torch.Tensor, kb: torch.Tensor, vb: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """One sequence (H, L, D). Query i depends on q_i and the keys/values it may see, nothing else:
    with a non-finite value anywhere, every product runs pairwise with unseen pairs cut out (a plain
    matmul would turn 0 * inf into NaN in rows that never see the value), in the backward too."""
    Lq, Lk = qb.shape[1], kb.shape[1]
    seen = causal_mask(Lq, Lk, qb.device) if causal else torch.ones(Lq, Lk, dtype=torch.bool, device=qb.device)
    finite = all(bool(torch.isfinite(t).all()) for t in (qb, kb, vb))
    if finite:
        s = scale * qb @ kb.transpose(1, 2)
    else:
        pair = seen[..., None]
        s = (torch.where(pair, scale * qb[:, :, None], 0.0) * torch.where(pair, kb[:, None], 0.0)).sum(-1)
    s = s.masked_fill(~seen, float("-inf"))
    # Rows with no visible key are all -inf: their softmax is NaN, and they return 0 by definition.
    p = torch.where(seen.any(-1, keepdim=True), torch.softmax(s, dim=-1), 0.0)
    if finite:
        return p @ vb
    return (p[..., None] * torch.where(seen[..., None], vb[:, None], 0.0)).sum(-2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seq_lens: Optional[torch.Tensor] = None,
              softmax_scale: Optional[float] = None, causal: bool = False) -> torch.Tensor:
    """Padded (B, H, N, D): keys at or past a sample's length are masked; query rows past it are 0."""
    B, H, N, D = q.shape
    lens = [N] * B if seq_lens is None else [int(n) for n in seq_lens]
    out = q.new_zeros(q.shape)
    for b, n in enumerate(lens):
        cu = torch.tensor([0, n])
        out[b, :, :n] = varlen_attention(q[b, :, :n].transpose(0, 1), k[b, :, :n].transpose(0, 1),
                                         v[b, :, :n].transpose(0, 1), cu, cu, softmax_scale,
                                         causal).transpose(0, 1)
    return out
