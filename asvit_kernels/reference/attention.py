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


def visible_mask(len_q: int, len_k: int, causal: bool = False, window: tuple[int, int] = (-1, -1),
                 device=None) -> torch.Tensor:
    """(len_q, len_k) bool, True where query i may see key j under flash-attn's ``window_size``
    (left, right) and ``causal`` (which folds into right = 0), bottom-right aligned:
    ``i' = i + len_k - len_q``, visible iff ``i' - left <= j <= i' + right`` (-1: unbounded)."""
    left, right = window
    if causal:
        right = 0
    i = torch.arange(len_q, device=device)[:, None] + (len_k - len_q)
    j = torch.arange(len_k, device=device)[None, :]
    seen = torch.ones(len_q, len_k, dtype=torch.bool, device=device)
    if left >= 0:
        seen &= j >= i - left
    if right >= 0:
        seen &= j <= i + right
    return seen


def varlen_attention_features(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor,
                              cu_k: Optional[torch.Tensor] = None, scale: Optional[float] = None,
                              causal: bool = False, window: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                              alibi: Optional[torch.Tensor] = None, keep_masks=None, dropout_p: float = 0.0,
                              *, return_lse: bool = False):
    """flash-attn 2.6+'s varlen attention with its optional features, one sequence at a time:
    scores ``s = scale * q k^T``; ``softcap > 0``: ``s = softcap * tanh(s / softcap)``; ``alibi``
    ((H,) or (batch, H) slopes): ``s -= slope * |i' - j|``; then the ``visible_mask`` window;
    ``p = softmax(s)`` (lse before dropout); with ``keep_masks`` (one (H, Lq, Lk) bool per
    sequence, e.g. a backend's ``dropout_keep_mask``) ``p * keep / (1 - dropout_p)``; ``p @ v``.
    q (total_q, H, D), k/v (total_k, H_kv, D) -> (total_q, H, D) [, lse (H, total_q)]. A row
    that sees no key returns zeros and lse -inf. Non-finite values reach only the rows that see
    them (unseen pairs are cut out of every product)."""
    cu_k = cu_q if cu_k is None else cu_k
    H, H_kv, D = q.shape[1], k.shape[1], q.shape[2]
    scale = D ** -0.5 if scale is None else scale
    if alibi is not None and alibi.dim() == 1:
        alibi = alibi.expand(cu_q.numel() - 1, H)
    outs, lses = [], []
    for b in range(cu_q.numel() - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        qb = q[qs:qe].transpose(0, 1)                                      # (H, Lq, D)
        kb = k[ks:ke].transpose(0, 1).repeat_interleave(H // H_kv, dim=0)  # (H, Lk, D)
        vb = v[ks:ke].transpose(0, 1).repeat_interleave(H // H_kv, dim=0)
        slopes = None if alibi is None else alibi[b].to(q.dtype)
        keep = None if keep_masks is None else keep_masks[b]
        o, m = _sequence_features(qb, kb, vb, scale, causal, window, softcap, slopes, keep, dropout_p)
        outs.append(o.transpose(0, 1))
        lses.append(m)
    out = torch.cat(outs) if outs else q.new_zeros(q.shape)
    if not return_lse:
        return out
    return out, (torch.cat(lses, 1) if lses else q.new_zeros(H, 0))


def _sequence_features(qb, kb, vb, scale, causal, window, softcap, slopes, keep, dropout_p):
    """One sequence (H, L, D) -> output (H, Lq, D), lse (H, Lq)."""
    Lq, Lk = qb.shape[1], kb.shape[1]
    seen = visible_mask(Lq, Lk, causal, window, qb.device)
    pair = seen[..., None]
    finite = all(bool(torch.isfinite(t).all()) for t in (qb, kb, vb))
    if finite:
        s = scale * qb @ kb.transpose(1, 2)
    else:
        s = (torch.where(pair, scale * qb[:, :, None], 0.0) * torch.where(pair, kb[:, None], 0.0)).sum(-1)
    if softcap > 0:
        s = softcap * torch.tanh(s / softcap)
    if slopes is not None:
        i = torch.arange(Lq, device=qb.device)[:, None] + (Lk - Lq)
        j = torch.arange(Lk, device=qb.device)[None, :]
        s = s - slopes[:, None, None] * (i - j).abs().to(s.dtype)
    s = s.masked_fill(~seen, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)                                           # (H, Lq)
    # A row with no visible key has lse -inf: subtract 0 instead, so its (all masked) p is 0, not NaN.
    p = torch.exp(s - torch.where(lse == float("-inf"), 0.0, lse)[..., None])
    if keep is not None and dropout_p > 0:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    if finite:
        return p @ vb, lse
    return (p[..., None] * torch.where(pair, vb[:, None], 0.0)).sum(-2), lse
