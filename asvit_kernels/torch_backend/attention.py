"""Varlen attention in plain PyTorch: sequences of equal (len_q, len_k) are batched into one
matmul each, so many equal windows cost a few large calls. Forward returns the log-sum-exp for the
backward, which recomputes probabilities from it (flash-attention's contract)."""
from __future__ import annotations

from collections import defaultdict

import torch

from ..reference.attention import causal_mask


def _groups(cu_q: torch.Tensor, cu_k: torch.Tensor):
    """{(len_q, len_k): [(q_start, k_start), ...]} over the non-empty-query sequences."""
    groups = defaultdict(list)
    for qs, qe, ks, ke in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        if qe > qs:
            groups[(qe - qs, ke - ks)].append((qs, ks))
    return groups


def _rows(starts, length: int, device) -> torch.Tensor:
    return (torch.tensor(starts, device=device)[:, None] + torch.arange(length, device=device)).reshape(-1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather(t: torch.Tensor, idx: torch.Tensor, n: int, length: int, heads: int) -> torch.Tensor:
    """Rows ``idx`` of a packed (total, h, D) tensor as (n, heads, length, D), kv heads repeated."""
    g = t.index_select(0, idx).view(n, length, t.shape[1], t.shape[2]).transpose(1, 2)
    return g.repeat_interleave(heads // t.shape[1], dim=1) if heads != t.shape[1] else g


def _probs(qb, kb, lse, scale, causal, Lq, Lk):
    p = torch.exp((qb * scale) @ kb.transpose(-1, -2) - lse[..., None])
    if causal:  # masked entries, and rows with no visible key (lse = -inf), are 0
        p = p.masked_fill(~causal_mask(Lq, Lk, qb.device), 0.0).nan_to_num(0.0)
    return p


def _group_outputs(q, k, v, cu_q, cu_k, scale: float, causal: bool):
    """Per group of equal (len_q, len_k): the query rows, their outputs ``(n * Lq, H, D)`` and
    log-sum-exps ``(H, n * Lq)`` in the accumulation dtype, or (rows, None, None) when there are no keys."""
    H = q.shape[1]
    acc = _acc_dtype(q.dtype)
    for (Lq, Lk), starts in _groups(cu_q, cu_k).items():
        n = len(starts)
        qi = _rows([s for s, _ in starts], Lq, q.device)
        if Lk == 0:
            yield qi, None, None
            continue
        ki = _rows([s for _, s in starts], Lk, q.device)
        qb = _gather(q, qi, n, Lq, H).to(acc)
        kb, vb = _gather(k, ki, n, Lk, H).to(acc), _gather(v, ki, n, Lk, H).to(acc)
        s = (qb * scale) @ kb.transpose(-1, -2)  # scaling q touches Lq*D values, not Lq*Lk
        if causal:
            s = s.masked_fill(~causal_mask(Lq, Lk, q.device), float("-inf"))
        m = torch.logsumexp(s, dim=-1)                                     # (n, H, Lq)
        p = torch.softmax(s, dim=-1)
        if causal:
            p = p.nan_to_num(0.0)  # a row with no visible key is all -inf
        yield qi, (p @ vb).transpose(1, 2).reshape(n * Lq, H, -1), m.transpose(0, 1).reshape(H, n * Lq)


def varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale: float, causal: bool):
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), device=q.device, dtype=_acc_dtype(q.dtype))
    for qi, o, m in _group_outputs(q, k, v, cu_q, cu_k, scale, causal):
        if o is not None:  # no keys: zero output, lse -inf
            out.index_copy_(0, qi, o.to(q.dtype))
            lse[:, qi] = m
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale: float, causal: bool):
    H, H_kv = q.shape[1], k.shape[1]
    acc = _acc_dtype(q.dtype)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for (Lq, Lk), starts in _groups(cu_q, cu_k).items():
        if Lk == 0:
            continue
        n = len(starts)
        qi = _rows([s for s, _ in starts], Lq, q.device)
        ki = _rows([s for _, s in starts], Lk, q.device)
        qb, dob, ob = (_gather(t, qi, n, Lq, H).to(acc) for t in (q, dout, out))
        kb, vb = _gather(k, ki, n, Lk, H).to(acc), _gather(v, ki, n, Lk, H).to(acc)
        m = lse[:, qi].to(acc).view(H, n, Lq).transpose(0, 1)
        p = _probs(qb, kb, m, scale, causal, Lq, Lk)                       # (n, H, Lq, Lk)
        dvb = p.transpose(-1, -2) @ dob
        dp = dob @ vb.transpose(-1, -2)
        ds = p * (dp - (dob * ob).sum(-1, keepdim=True))
        dqb = (ds @ kb) * scale
        dkb = (ds.transpose(-1, -2) @ qb) * scale
        # GQA: a kv head's gradient sums over the query heads that share it.
        dkb = dkb.view(n, H_kv, H // H_kv, Lk, -1).sum(2)
        dvb = dvb.view(n, H_kv, H // H_kv, Lk, -1).sum(2)
        dq.index_copy_(0, qi, dqb.transpose(1, 2).reshape(n * Lq, H, -1).to(q.dtype))
        dk.index_copy_(0, ki, dkb.transpose(1, 2).reshape(n * Lk, H_kv, -1).to(k.dtype))
        dv.index_copy_(0, ki, dvb.transpose(1, 2).reshape(n * Lk, H_kv, -1).to(v.dtype))
    return dq, dk, dv


def varlen_composite(q, k, v, cu_q, cu_k, scale: float, causal: bool) -> torch.Tensor:
    """The forward as differentiable composite PyTorch ops with no in-place writes, for callers
    under ``torch.func`` transforms (vmap, grad, jvp), which cannot see through a custom op."""
    rows, outs = [], []
    for qi, o, _ in _group_outputs(q, k, v, cu_q, cu_k, scale, causal):
        rows.append(qi)
        outs.append(q.new_zeros(qi.numel(), *q.shape[1:]) if o is None else o.to(q.dtype))
    if not outs:
        return q.new_zeros(q.shape)
    # Rows of zero-length query sequences do not exist, so the groups cover every row once.
    return torch.cat(outs).index_select(0, torch.argsort(torch.cat(rows)))
