"""Varlen attention in plain PyTorch: sequences of equal (len_q, len_k) are batched into one
matmul each, so many equal windows cost a few large calls; long sequences run in chunks of query
rows, so memory is linear in the length (``_SCORE_BUDGET``). Forward returns the log-sum-exp for the
backward, which recomputes probabilities from it (flash-attention's contract)."""
from __future__ import annotations

from collections import defaultdict

import torch



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


def _mm_seen(a: torch.Tensor, x: torch.Tensor, seen, check: bool = True) -> torch.Tensor:
    """``a @ x`` where ``a`` is 0 at the pairs ``seen`` (Lq, Lk) excludes (None: every pair is seen)
    and ``x`` may hold NaN/inf. A plain matmul would give 0 * inf = NaN in rows that never see the
    value (earlier rows under causal); here a non-finite ``x`` reaches only the rows that see it.
    ``check=False`` (under torch.func, which cannot branch on data) always takes the exact path."""
    if seen is None:
        return a @ x
    fin = torch.isfinite(x)
    if check and bool(fin.all()):
        return a @ x
    out = a @ torch.where(fin, x, 0.0)
    hits = seen.to(x.dtype)
    for bad, value in ((torch.isnan(x), float("nan")), (x == float("inf"), float("inf")),
                       (x == float("-inf"), float("-inf"))):
        out = out + torch.where(hits @ bad.to(x.dtype) > 0, value, 0.0)  # inf + -inf = NaN, as IEEE
    return out


def _probs(qb, kb, lse, scale, seen):
    # lse = +inf: the row's softmax is undefined (NaN, as the forward's output); lse = -inf: the row
    # sees no key, and every one of its entries is masked.
    lse = lse.masked_fill(lse == float("inf"), float("nan"))
    p = torch.exp((qb * scale) @ kb.transpose(-1, -2) - lse[..., None])
    return p if seen is None else p.masked_fill(~seen, 0.0)


# Elements of one (n, H, rows, Lk) score block. Query rows are independent, so a group runs in
# chunks of rows (exact, no online softmax) and memory is O(rows * Lk), not O(Lq * Lk): a 20k-token
# head holds 8M-element blocks, not two 400M-element matrices. Groups of short windows stay one call.
_SCORE_BUDGET = 1 << 23


def _chunks(n: int, H: int, Lq: int, Lk: int, causal: bool, device):
    """(query rows, their causal mask (rows, Lk) or None) per chunk of a group."""
    step = max(1, _SCORE_BUDGET // max(1, n * H * Lk))
    for i0 in range(0, Lq, step):
        rows = slice(i0, min(i0 + step, Lq))
        seen = None
        if causal:  # rows i0.. of causal_mask(Lq, Lk), without building the whole of it
            i = torch.arange(rows.start, rows.stop, device=device)[:, None]
            seen = torch.arange(Lk, device=device)[None, :] <= i + (Lk - Lq)
        yield rows, seen


def _attend(qb, kb, vb, scale: float, seen, check: bool):
    """Output and lse of query rows ``qb`` (n, H, rows, D) over all keys; ``seen`` their mask."""
    s = (qb * scale) @ kb.transpose(-1, -2)  # scaling q touches rows*D values, not rows*Lk
    if seen is not None:
        s = s.masked_fill(~seen, float("-inf"))
    m = torch.logsumexp(s, dim=-1)                                         # (n, H, rows)
    p = torch.softmax(s, dim=-1)
    if seen is not None:  # a row that sees no key is all -inf (softmax NaN) and returns 0
        p = p.masked_fill(~seen.any(-1, keepdim=True), 0.0)
    return _mm_seen(p, vb, seen, check), m


def _group_outputs(q, k, v, cu_q, cu_k, scale: float, causal: bool, check: bool = True):
    """Per group of equal (len_q, len_k): the query rows, their outputs ``(n * Lq, H, D)`` and
    log-sum-exps ``(H, n * Lq)`` in the accumulation dtype, or (rows, None, None) when there are no keys.
    ``check``: see ``_mm_seen``."""
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
        parts = [_attend(qb[:, :, rows], kb, vb, scale, seen, check)
                 for rows, seen in _chunks(n, H, Lq, Lk, causal, q.device)]
        o, m = (torch.cat(t, 2) if len(parts) > 1 else t[0] for t in zip(*parts))
        yield qi, o.transpose(1, 2).reshape(n * Lq, H, -1), m.transpose(0, 1).reshape(H, n * Lq)


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
        delta = (dob * ob).sum(-1, keepdim=True)
        dqb, dkb, dvb = [], torch.zeros_like(kb), torch.zeros_like(vb)
        for rows, seen in _chunks(n, H, Lq, Lk, causal, q.device):  # dk, dv sum over the chunks
            seen_t = None if seen is None else seen.T
            p = _probs(qb[:, :, rows], kb, m[:, :, rows], scale, seen)      # (n, H, rows, Lk)
            dvb += _mm_seen(p.transpose(-1, -2), dob[:, :, rows], seen_t)
            ds = p * (dob[:, :, rows] @ vb.transpose(-1, -2) - delta[:, :, rows])
            if seen is not None:
                ds = ds.masked_fill(~seen, 0.0)  # p = 0 there, but dp may be NaN (an unseen v)
            dqb.append(_mm_seen(ds, kb, seen) * scale)
            dkb += _mm_seen(ds.transpose(-1, -2), qb[:, :, rows], seen_t) * scale
        dqb = torch.cat(dqb, 2) if len(dqb) > 1 else dqb[0]
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
    for qi, o, _ in _group_outputs(q, k, v, cu_q, cu_k, scale, causal, check=False):
        rows.append(qi)
        outs.append(q.new_zeros(qi.numel(), *q.shape[1:]) if o is None else o.to(q.dtype))
    if not outs:
        return q.new_zeros(q.shape)
    # Rows of zero-length query sequences do not exist, so the groups cover every row once.
    return torch.cat(outs).index_select(0, torch.argsort(torch.cat(rows)))
