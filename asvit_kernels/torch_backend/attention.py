"""Varlen attention in plain PyTorch. On CPU each group of sequences of equal (len_q, len_k) runs as
one call of PyTorch's CPU flash-attention kernel (the one behind ``scaled_dot_product_attention``:
``aten::_scaled_dot_product_flash_attention_for_cpu``, which also returns the log-sum-exp, and its
backward) on an ``(n, H, L, D)`` view of the packed tensors: no copy when the group's sequences are
evenly spaced (equal windows, a re-tokenization stage, cycling lengths), no (L, L) score matrix.
Groups the kernel cannot serve exactly take the hand-rolled path: groups holding NaN/inf (its causal
tiles multiply masked zeros by them, and a NaN in q can come out finite, so the inputs are checked,
not the outputs), other devices, and long causal cross-attention with
len_q < len_k (which needs an (Lq, Lk) mask). That path batches each group into matmuls in chunks
of query rows, so its memory is linear in the length too (``_SCORE_BUDGET``). Forward returns the
log-sum-exp for the backward, which recomputes probabilities from it (flash-attention's contract)."""
from __future__ import annotations

import functools
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
    for (Lq, Lk), starts in _groups(cu_q, cu_k).items():
        qi = _rows([s for s, _ in starts], Lq, q.device)
        if Lk == 0:
            yield qi, None, None
            continue
        ki = _rows([s for _, s in starts], Lk, q.device)
        yield (qi, *_exact_forward(q, k, v, qi, ki, len(starts), Lq, Lk, scale, causal, check))


# ------------------------------------------------------------------ the CPU flash kernel, per group

_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


@functools.lru_cache(maxsize=None)
def _native_gqa() -> bool:
    """Whether the CPU flash kernel (forward and backward) takes fewer k/v heads than q heads, query
    head h using kv head h // (H / H_kv) as SDPA's ``enable_gqa``; checked once on tiny inputs
    against repeated heads (else the caller repeats them)."""
    try:
        g = torch.Generator().manual_seed(0)
        q, do = torch.randn(1, 4, 3, 2, generator=g), torch.randn(1, 4, 3, 2, generator=g)
        k, v = torch.randn(1, 2, 3, 2, generator=g), torch.randn(1, 2, 3, 2, generator=g)
        kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
        o, lse = _FLASH(q, k, v, 0.0, True)
        o2, lse2 = _FLASH(q, kr, vr, 0.0, True)
        _, dk, _ = _FLASH_BWD(do, q, k, v, o, lse, 0.0, True)
        _, dk2, _ = _FLASH_BWD(do, q, kr, vr, o2, lse2, 0.0, True)
        return (torch.allclose(o, o2) and dk.shape == k.shape
                and torch.allclose(dk, dk2.view(1, 2, 2, 3, 2).sum(2), atol=1e-6))
    except Exception:  # noqa: BLE001 - any refusal means: repeat the heads
        return False


def _plan(cu_q: torch.Tensor, cu_k: torch.Tensor, causal: bool):
    """[(len_q, len_k, q_starts, k_starts)] per group of equal lengths, non-empty queries only.
    Under causal a sequence with len_q > len_k splits in two: its first len_q - len_k rows see no
    key (a (len, 0) entry: zero output, lse -inf, zero gradient) and its last len_k rows are a
    square causal problem, where top-left and bottom-right alignment agree."""
    groups = defaultdict(lambda: ([], []))
    for qs, qe, ks, ke in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        Lq, Lk = qe - qs, ke - ks
        if Lq == 0:
            continue
        if causal and Lq > Lk > 0:
            g = groups[(Lq - Lk, 0)]
            g[0].append(qs)
            g[1].append(ks)
            qs, Lq = qs + Lq - Lk, Lk
        g = groups[(Lq, Lk)]
        g[0].append(qs)
        g[1].append(ks)
    return [(Lq, Lk, qst, kst) for (Lq, Lk), (qst, kst) in groups.items()]


def _step(starts, length: int):
    """The common spacing of ``starts`` (0 for one start), or None if they are not evenly spaced."""
    if len(starts) == 1:
        return 0
    d = starts[1] - starts[0]
    if d < length or any(b - a != d for a, b in zip(starts[1:], starts[2:])):
        return None
    return d


def _seqs(t: torch.Tensor, starts, length: int) -> torch.Tensor:
    """Rows ``s:s + length`` for each s in ``starts`` of a packed (total, h, D) tensor, as
    (n, h, length, D): a strided view when the starts are evenly spaced, else a gathered copy."""
    n, (_, h, D) = len(starts), t.shape
    d = _step(starts, length)
    if d is None:
        return t.index_select(0, _rows(starts, length, t.device)).view(n, length, h, D).transpose(1, 2)
    st = t.stride()
    return t.as_strided((n, length, h, D), (d * st[0], st[0], st[1], st[2]),
                        t.storage_offset() + starts[0] * st[0]).transpose(1, 2)


def _put(dst: torch.Tensor, starts, length: int, src) -> None:
    """Writes (n, h, length, D) ``src`` (or a scalar) into those rows of packed ``dst``."""
    if _step(starts, length) is not None:
        view = _seqs(dst, starts, length)
        if isinstance(src, torch.Tensor):
            view.copy_(src)
        else:
            view.fill_(src)
        return
    rows = _rows(starts, length, dst.device)
    if isinstance(src, torch.Tensor):
        dst.index_copy_(0, rows, src.transpose(1, 2).reshape(-1, *dst.shape[1:]))
    else:
        dst.index_fill_(0, rows, src)


def _lse_rows(lse: torch.Tensor) -> torch.Tensor:
    """(H, total) lse as a packed (total, H, 1) view, for ``_seqs`` / ``_put``."""
    return lse.transpose(0, 1).unsqueeze(-1)


def _finite(*ts: torch.Tensor) -> bool:
    """True only if every element is finite: a sum over a NaN or an inf is never finite (a finite
    sum that overflows says False, which costs only the exact path). One pass, one host read."""
    sums = [t.sum(dtype=_acc_dtype(t.dtype)) for t in ts if t.numel()]
    return not sums or bool(torch.isfinite(torch.stack(sums)).all())


def _use_flash(t: torch.Tensor) -> bool:
    return _FLASH is not None and _FLASH_BWD is not None and t.device.type == "cpu"


def _flash_serves(Lq: int, Lk: int, causal: bool) -> bool:
    """Causal with len_q < len_k needs an (Lq, Lk) mask (bottom-right): only while it is small."""
    return not (causal and Lq < Lk and Lq * Lk > _SCORE_BUDGET)


def _flash_args(q: torch.Tensor, Lq: int, Lk: int, causal: bool):
    """(is_causal, attn_mask) for the kernel: top-left causal on square problems, an additive mask
    for len_q < len_k (len_q > len_k was split off by ``_plan``)."""
    if not causal or Lq == Lk:
        return causal, None
    i = torch.arange(Lq, device=q.device)[:, None]
    seen = torch.arange(Lk, device=q.device)[None, :] <= i + (Lk - Lq)
    return False, torch.zeros(Lq, Lk, dtype=q.dtype, device=q.device).masked_fill_(~seen, float("-inf"))


def _kv_for(kb: torch.Tensor, vb: torch.Tensor, H: int):
    if kb.shape[1] == H or _native_gqa():
        return kb, vb, False
    g = H // kb.shape[1]
    return kb.repeat_interleave(g, 1), vb.repeat_interleave(g, 1), True


def varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale: float, causal: bool):
    H = q.shape[1]
    acc = _acc_dtype(q.dtype)
    plan = _plan(cu_q, cu_k, causal)
    flash = _use_flash(q)
    clean = flash and _finite(q, k, v)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)   # the groups cover every row
    lse = torch.empty((H, q.shape[0]), dtype=acc, device=q.device)
    for Lq, Lk, qst, kst in plan:
        if Lk == 0:  # no keys: zero output, lse -inf
            _put(out, qst, Lq, 0.0)
            _put(_lse_rows(lse), qst, Lq, float("-inf"))
            continue
        if flash and _flash_serves(Lq, Lk, causal):
            qb, kb, vb = _seqs(q, qst, Lq), _seqs(k, kst, Lk), _seqs(v, kst, Lk)
            if clean or _finite(qb, kb, vb):
                kb, vb, _ = _kv_for(kb, vb, H)
                is_causal, mask = _flash_args(q, Lq, Lk, causal)
                o, m = _FLASH(qb, kb, vb, 0.0, is_causal, attn_mask=mask, scale=scale)
                if len(plan) == 1:  # one group holds every row: the kernel's (n, L, H, D) is `out`
                    out = o.transpose(1, 2).reshape(q.shape)
                else:
                    _put(out, qst, Lq, o)
                _put(_lse_rows(lse), qst, Lq, m.unsqueeze(-1))
                continue
        qi, ki = _rows(qst, Lq, q.device), _rows(kst, Lk, q.device)
        o, m = _exact_forward(q, k, v, qi, ki, len(qst), Lq, Lk, scale, causal, True)
        out.index_copy_(0, qi, o.to(q.dtype))
        lse[:, qi] = m
    return out, lse


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale: float, causal: bool):
    H = q.shape[1]
    plan = _plan(cu_q, cu_k, causal)
    flash = _use_flash(q)
    clean = flash and _finite(dout, q, k, v)
    keys_seen = sum(len(kst) * Lk for _, Lk, _, kst in plan)  # keys of query-less sequences get 0
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    alloc = torch.empty if keys_seen == k.shape[0] else torch.zeros
    dk, dv = (alloc(t.shape, dtype=t.dtype, device=t.device) for t in (k, v))
    for Lq, Lk, qst, kst in plan:
        if Lk == 0:
            _put(dq, qst, Lq, 0.0)
            continue
        if flash and _flash_serves(Lq, Lk, causal):
            qb, dob = _seqs(q, qst, Lq), _seqs(dout, qst, Lq)
            kb, vb = _seqs(k, kst, Lk), _seqs(v, kst, Lk)
            if clean or _finite(qb, kb, vb, dob):
                ob, m = _seqs(out, qst, Lq), _seqs(_lse_rows(lse), qst, Lq).squeeze(-1)
                kx, vx, repeated = _kv_for(kb, vb, H)
                is_causal, mask = _flash_args(q, Lq, Lk, causal)
                gq, gk, gv = _FLASH_BWD(dob, qb, kx, vx, ob, m.to(_acc_dtype(q.dtype)), 0.0, is_causal,
                                        attn_mask=mask, scale=scale)
                if repeated:  # a kv head's gradient sums over the query heads that share it
                    gk = gk.unflatten(1, (k.shape[1], -1)).sum(2)
                    gv = gv.unflatten(1, (k.shape[1], -1)).sum(2)
                if len(plan) == 1:
                    dq = gq.transpose(1, 2).reshape(q.shape)
                else:
                    _put(dq, qst, Lq, gq)
                if len(plan) == 1 and keys_seen == k.shape[0]:
                    dk, dv = gk.transpose(1, 2).reshape(k.shape), gv.transpose(1, 2).reshape(v.shape)
                else:
                    _put(dk, kst, Lk, gk)
                    _put(dv, kst, Lk, gv)
                continue
        qi, ki = _rows(qst, Lq, q.device), _rows(kst, Lk, q.device)
        dqb, dkb, dvb = _exact_backward(dout, q, k, v, out, lse, qi, ki, len(qst), Lq, Lk, scale, causal)
        dq.index_copy_(0, qi, dqb.to(q.dtype))
        dk.index_copy_(0, ki, dkb.to(k.dtype))
        dv.index_copy_(0, ki, dvb.to(v.dtype))
    return dq, dk, dv


# ------------------------------------------------------------------------- the exact hand-rolled path

def _exact_forward(q, k, v, qi, ki, n: int, Lq: int, Lk: int, scale: float, causal: bool, check: bool):
    """One group (rows ``qi``, keys ``ki``, Lk > 0): outputs ``(n * Lq, H, D)`` and log-sum-exps
    ``(H, n * Lq)`` in the accumulation dtype. ``check``: see ``_mm_seen``."""
    H = q.shape[1]
    acc = _acc_dtype(q.dtype)
    qb = _gather(q, qi, n, Lq, H).to(acc)
    kb, vb = _gather(k, ki, n, Lk, H).to(acc), _gather(v, ki, n, Lk, H).to(acc)
    parts = [_attend(qb[:, :, rows], kb, vb, scale, seen, check)
             for rows, seen in _chunks(n, H, Lq, Lk, causal, q.device)]
    o, m = (torch.cat(t, 2) if len(parts) > 1 else t[0] for t in zip(*parts))
    return o.transpose(1, 2).reshape(n * Lq, H, -1), m.transpose(0, 1).reshape(H, n * Lq)


def _exact_backward(dout, q, k, v, out, lse, qi, ki, n: int, Lq: int, Lk: int, scale: float, causal: bool):
    """One group's (dq (n * Lq, H, D), dk, dv (n * Lk, H_kv, D)) in the accumulation dtype."""
    H, H_kv = q.shape[1], k.shape[1]
    acc = _acc_dtype(q.dtype)
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
    return (dqb.transpose(1, 2).reshape(n * Lq, H, -1), dkb.transpose(1, 2).reshape(n * Lk, H_kv, -1),
            dvb.transpose(1, 2).reshape(n * Lk, H_kv, -1))


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
