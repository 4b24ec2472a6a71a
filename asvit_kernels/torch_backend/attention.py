"""Varlen attention in plain PyTorch. On CPU each group of sequences of equal (len_q, len_k) runs as
one call of PyTorch's CPU flash-attention kernel (the one behind ``scaled_dot_product_attention``:
``aten::_scaled_dot_product_flash_attention_for_cpu``, which also returns the log-sum-exp, and its
backward) on an ``(n, H, L, D)`` view of the packed tensors: no copy when the group's sequences are
evenly spaced (equal windows, a re-tokenization stage, cycling lengths), no (L, L) score matrix.
Groups the kernel cannot serve exactly take the hand-rolled path: groups holding NaN/inf where the
kernel would not put them exactly where the reference does (``_reads``: a NaN/inf in q or k can come
out finite, so the inputs are checked, not the outputs; under causal or a window its tiles multiply
masked zeros by v and the output gradient too), other devices, long causal cross-attention with
len_q < len_k (which needs an (Lq, Lk) mask), and flash-attn's softcap, ALiBi and dropout (a window
alone is an additive mask for the kernel, where it is small and every row sees a key). That path
batches each group into matmuls in chunks of query rows, so its memory is linear in the length too
(``_SCORE_BUDGET``).
Forward returns the log-sum-exp for the backward, which recomputes probabilities from it
(flash-attention's contract). Plain full attention over equal lengths that tile the rows needs
neither: ``full_attention`` leaves its backward to PyTorch's own autograd node for the kernel."""
from __future__ import annotations

import functools
import math
from collections import defaultdict
from typing import NamedTuple, Optional

import torch


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


# Elements of one (n, H, rows, Lk) score block. Query rows are independent, so a group runs in
# chunks of rows (exact, no online softmax) and memory is O(rows * Lk), not O(Lq * Lk): a 20k-token
# head holds 8M-element blocks, not two 400M-element matrices. Groups of short windows stay one call.
_SCORE_BUDGET = 1 << 23


def _chunks(n: int, H: int, Lq: int, Lk: int, window, device):
    """(query rows, their visibility mask (rows, Lk) or None when every key is seen) per chunk of a
    group; ``window`` is flash-attn's (left, right) with causal folded in (right = 0)."""
    step = max(1, _SCORE_BUDGET // max(1, n * H * Lk))
    left, right = window
    for i0 in range(0, Lq, step):
        rows = slice(i0, min(i0 + step, Lq))
        seen = None
        if left >= 0 or right >= 0:
            seen = _visible(rows.start, rows.stop, Lq, Lk, window, device)
        yield rows, seen


def _visible(i0: int, i1: int, Lq: int, Lk: int, window, device) -> torch.Tensor:
    """Rows i0..i1 of the reference's ``visible_mask`` (window (left, right), causal folded in),
    without building the whole of it."""
    left, right = window
    i = torch.arange(i0, i1, device=device)[:, None] + (Lk - Lq)
    j = torch.arange(Lk, device=device)[None, :]
    seen = torch.ones(i1 - i0, Lk, dtype=torch.bool, device=device)
    if left >= 0:
        seen &= j >= i - left
    if right >= 0:
        seen &= j <= i + right
    return seen


def _scores(qb, kb, scale: float, x: Optional["_ChunkExtras"]):
    """Scores of rows ``qb`` over keys ``kb`` with softcap and ALiBi applied; and tanh of the
    capped scores (the backward's softcap factor), or None."""
    s = (qb * scale) @ kb.transpose(-1, -2)  # scaling q touches rows*D values, not rows*Lk
    t = None
    if x is not None and x.softcap > 0:
        t = torch.tanh(s / x.softcap)
        s = x.softcap * t
    if x is not None and x.bias is not None:
        s = s + x.bias
    return s, t


def _probs(qb, kb, lse, scale, seen, x=None):
    """The forward's probabilities (before dropout) from its lse, and ``_scores``' tanh."""
    # lse = +inf: the row's softmax is undefined (NaN, as the forward's output); lse = -inf: the row
    # sees no key, and every one of its entries is masked.
    lse = lse.masked_fill(lse == float("inf"), float("nan"))
    s, t = _scores(qb, kb, scale, x)
    p = torch.exp(s - lse[..., None])
    return (p if seen is None else p.masked_fill(~seen, 0.0)), t


def _attend(qb, kb, vb, scale: float, seen, check: bool, x=None):
    """Output and lse of query rows ``qb`` (n, H, rows, D) over all keys; ``seen`` their mask."""
    s, _ = _scores(qb, kb, scale, x)
    if seen is not None:
        s = s.masked_fill(~seen, float("-inf"))
    m = torch.logsumexp(s, dim=-1)                                         # (n, H, rows)
    p = torch.softmax(s, dim=-1)
    if seen is not None:  # a row that sees no key is all -inf (softmax NaN) and returns 0
        p = p.masked_fill(~seen.any(-1, keepdim=True), 0.0)
    if x is not None and x.keep is not None:
        p = p * x.keep
    return _mm_seen(p, vb, seen, check), m


def _group_outputs(q, k, v, cu_q, cu_k, scale: float, causal: bool, check: bool = True, features=None):
    """Per group of equal (len_q, len_k): the query rows, their outputs ``(n * Lq, H, D)`` and
    log-sum-exps ``(H, n * Lq)`` in the accumulation dtype, or (rows, None, None) when there are no keys.
    ``check``: see ``_mm_seen``."""
    for g in _plan(cu_q, cu_k, causal):
        qi = _rows(g.q_starts, g.Lq, q.device)
        if g.Lk == 0:
            yield qi, None, None
            continue
        yield (qi, *_exact_forward(q, k, v, g, scale, causal, check, features))


# ------------------------------------------------- flash-attn's features: window, softcap, ALiBi, dropout

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x * c mod 2**32`` for int64 ``x`` in [0, 2**32), in halves so no product overflows int64."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons' hash prospector): a bijection of 32-bit values with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _keep_bits(seed: int, dropout_p: float, H: int, rows: torch.Tensor, Lk: int) -> torch.Tensor:
    """Dropout keep mask (n, H, rows, Lk) for global query rows ``rows`` (n, rows): a counter-based
    hash of (seed, head, global query row, local key index), so any chunk regenerates exactly the
    same bits (the backward's mask is the forward's) with no generator state; kept with
    probability 1 - dropout_p to within 2**-32."""
    dev = rows.device
    heads = _mix32(torch.arange(H, device=dev, dtype=torch.int64) ^ int(_mix32(torch.tensor(seed))))
    per_row = _mix32(heads[None, :, None] ^ rows.to(torch.int64)[:, None, :])         # (n, H, rows)
    bits = _mix32(per_row[..., None] ^ torch.arange(Lk, device=dev, dtype=torch.int64))
    return bits >= int(dropout_p * 2 ** 32)


def dropout_keep_mask(seed: int, dropout_p: float, cu_q: torch.Tensor, cu_k: torch.Tensor, H: int,
                      device=None) -> list:
    """The keep mask this backend's dropout uses, one (H, len_q, len_k) bool tensor per sequence,
    for tests: query head h, local row i and local key j of sequence b are kept iff the hash of
    (seed, h, cu_q[b] + i, j) clears dropout_p. The Triton kernels draw theirs from Philox, so the
    masks (and dropout outputs) differ between backends; each matches its own forward and backward."""
    masks = []
    for qs, qe, ks, ke in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), cu_k[:-1].tolist(), cu_k[1:].tolist()):
        rows = torch.arange(qs, qe, device=device)[None]
        masks.append(_keep_bits(seed, dropout_p, H, rows, ke - ks)[0])
    return masks


class _ChunkExtras(NamedTuple):
    """What the features add to one chunk's (n, H, rows, Lk) score block."""
    softcap: float
    bias: Optional[torch.Tensor]   # ALiBi's -slope * |i' - j|
    keep: Optional[torch.Tensor]   # dropout's keep / (1 - dropout_p)


class Features(NamedTuple):
    """flash-attn 2.6+'s optional features as the op layer passes them (see the reference's
    ``varlen_attention_features``): ``window`` (left, right), -1 unbounded, causal folded in
    (right = 0); ``softcap`` (> 0: ``s = softcap * tanh(s / softcap)``); ``alibi`` (batch, H)
    float32 slopes (``s -= slope * |i + len_k - len_q - j|``); dropout on the probabilities with
    this backend's keep mask (``dropout_keep_mask``), the lse taken before it."""
    window: tuple
    softcap: float
    alibi: Optional[torch.Tensor]
    dropout_p: float
    seed: int

    @staticmethod
    def of(causal: bool, window, softcap, alibi, dropout_p, seed) -> Optional["Features"]:
        """The features of a call, or None when it uses none (a plain, possibly causal, call)."""
        w = _window(causal, window)
        if w == _window(causal) and not softcap > 0 and alibi is None and not dropout_p > 0:
            return None
        return Features(w, float(softcap), alibi, float(dropout_p), int(seed))

    @property
    def window_only(self) -> bool:
        """Only a window: the CPU flash kernel serves it with an additive mask (exact)."""
        return not self.softcap > 0 and self.alibi is None and not self.dropout_p > 0

    def chunk(self, g: "_Group", rows: slice, H: int, acc: torch.dtype, device) -> _ChunkExtras:
        bias = keep = None
        if self.alibi is not None:
            i = torch.arange(rows.start, rows.stop, device=device)[:, None] + (g.Lk - g.Lq)
            dist = (i - torch.arange(g.Lk, device=device)[None, :]).abs().to(acc)
            slopes = self.alibi.index_select(0, torch.tensor(g.seqs, device=device)).to(acc)
            bias = -(slopes[:, :, None, None] * dist)
        if self.dropout_p > 0:
            starts = torch.tensor(g.q_starts, device=device)[:, None]
            global_rows = starts + torch.arange(rows.start, rows.stop, device=device)
            keep = _keep_bits(self.seed, self.dropout_p, H, global_rows, g.Lk).to(acc) / (1.0 - self.dropout_p)
        return _ChunkExtras(self.softcap, bias, keep)


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


class _Group(NamedTuple):
    """Sequences of equal (len_q, len_k): their first query and key rows, batch indices, and the
    common spacing of those first rows (``_step``; None when uneven: the rows are gathered)."""
    Lq: int
    Lk: int
    q_starts: tuple
    k_starts: tuple
    seqs: tuple
    q_step: Optional[int]
    k_step: Optional[int]


def _plan(cu_q: torch.Tensor, cu_k: torch.Tensor, causal: bool) -> tuple:
    """``_plan_of`` the offsets: one host read of each (the plan is cached on their values)."""
    offsets = tuple(cu_q.tolist())
    return _plan_of(offsets, offsets if cu_k is cu_q else tuple(cu_k.tolist()), causal)


@functools.lru_cache(maxsize=256)
def _plan_of(cu_q: tuple, cu_k: tuple, causal: bool) -> tuple:
    """(_Group, ...) per group of equal lengths, non-empty queries only; cached, because a model
    calls attention with the same offsets in every block and step (the backward too).
    Under causal a sequence with len_q > len_k splits in two: its first len_q - len_k rows see no
    key (a (len, 0) entry: zero output, lse -inf, zero gradient) and its last len_k rows are a
    square causal problem, where top-left and bottom-right alignment agree (so do a window's and
    ALiBi's ``i + len_k - len_q``, and dropout's global rows)."""
    groups = defaultdict(lambda: ([], [], []))
    for b, (qs, qe, ks, ke) in enumerate(zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:])):
        Lq, Lk = qe - qs, ke - ks
        if Lq == 0:
            continue
        if causal and Lq > Lk > 0:
            for lst, val in zip(groups[(Lq - Lk, 0)], (qs, ks, b)):
                lst.append(val)
            qs, Lq = qs + Lq - Lk, Lk
        for lst, val in zip(groups[(Lq, Lk)], (qs, ks, b)):
            lst.append(val)
    return tuple(_Group(Lq, Lk, tuple(qst), tuple(kst), tuple(b), _step(qst, Lq), _step(kst, Lk))
                 for (Lq, Lk), (qst, kst, b) in groups.items())


def _step(starts, length: int):
    """The common spacing of ``starts`` (0 for one start), or None if they are not evenly spaced."""
    if len(starts) == 1:
        return 0
    d = starts[1] - starts[0]
    if d < length or any(b - a != d for a, b in zip(starts[1:], starts[2:])):
        return None
    return d


def _seqs(t: torch.Tensor, starts, length: int, step: Optional[int]) -> torch.Tensor:
    """Rows ``s:s + length`` for each s in ``starts`` of a packed (total, h, D) tensor, as
    (n, h, length, D): a strided view when the starts are evenly spaced (``step``, their spacing
    from ``_step``, the group's ``q_step`` / ``k_step``), else (None) a gathered copy."""
    n, (_, h, D) = len(starts), t.shape
    if step is None:
        return t.index_select(0, _rows(starts, length, t.device)).view(n, length, h, D).transpose(1, 2)
    st = t.stride()  # one as_strided, not a view and a transpose: each op costs µs per call
    return t.as_strided((n, h, length, D), (step * st[0], st[1], st[0], st[2]), t.storage_offset() + starts[0] * st[0])


def _put(dst: torch.Tensor, starts, length: int, src, step: Optional[int]) -> None:
    """Writes (n, h, length, D) ``src`` (or a scalar) into those rows of packed ``dst``; ``step``
    as ``_seqs``'."""
    if step is not None:
        view = _seqs(dst, starts, length, step)
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


def _packed(o: torch.Tensor, shape) -> torch.Tensor:
    """The kernel's (n, H, L, D) result as packed (n * L, H, D): a view when it is laid out as
    (n, L, H, D), as the CPU kernel writes it (checked, not assumed), else a copy."""
    n, H, L, D = o.shape
    if o.stride() == (L * H * D, D, H * D, 1):
        return o.as_strided(shape, (H * D, D, 1))
    return o.transpose(1, 2).reshape(shape)


def _packed_lse(m: torch.Tensor) -> torch.Tensor:
    """The kernel's (n, H, L) lse as (H, n * L), a view when laid out as (n, L, H) (as written)."""
    n, H, L = m.shape
    if m.stride() == (L * H, 1, H):
        return m.as_strided((H, n * L), (1, H))
    return m.transpose(0, 1).reshape(H, -1)


def _lse_seqs(lse: torch.Tensor, starts, length: int, step: Optional[int], dtype: torch.dtype) -> torch.Tensor:
    """The (n, H, length) lse of those rows, from (H, total) ``lse``, in ``dtype`` (a view when the
    starts are evenly spaced and ``lse`` is in ``dtype`` already, as the forward leaves it)."""
    if lse.dtype != dtype:
        lse = lse.to(dtype)
    if step is None:
        return _seqs(_lse_rows(lse), starts, length, None).squeeze(-1)
    st = lse.stride()
    return lse.as_strided((len(starts), lse.shape[0], length), (step * st[1], st[0], st[1]),
                          lse.storage_offset() + starts[0] * st[1])


def _lse_rows(lse: torch.Tensor) -> torch.Tensor:
    """(H, total) lse as a packed (total, H, 1) view, for ``_seqs`` / ``_put``."""
    return lse.transpose(0, 1).unsqueeze(-1)


def _finite(*ts: torch.Tensor) -> bool:
    """True only if every element is finite: a sum over a NaN or an inf is never finite (a finite
    sum that overflows says False, which costs only the exact path; so does inf + -inf = NaN in
    the Python sum). One pass over each tensor (``_to_read``); on a CPU reading the scalars back
    costs nothing."""
    return math.isfinite(sum(t.sum(dtype=_acc_dtype(t.dtype)).item() for t in _to_read(ts) if t.numel()))


def _to_read(ts) -> tuple:
    """Tensors whose elements include every element of ``ts``: views of one contiguous base that
    holds no more elements than they do together (q, k, v unbound from one qkv projection) are
    read as that base, once; a CPU sum over such a strided view runs ~3x slower per element than
    over contiguous memory. Otherwise ``ts`` itself."""
    base = ts[0]._base
    if base is None or len(ts) < 2 or not base.is_contiguous():
        return ts
    total = 0
    for t in ts:
        if t._base is not base or t.dtype != base.dtype:
            return ts
        total += t.numel()
    if base.numel() > total:
        return ts
    lo = base.storage_offset()
    hi = lo + base.numel()
    for t in ts:  # every element a view addresses lies in the base's own span of the storage
        first = last = t.storage_offset()
        for size, stride in zip(t.shape, t.stride()):
            if stride < 0:
                return ts
            last += (size - 1) * stride
        if first < lo or last >= hi:
            return ts
    return (base,)


def _sees_all(causal: bool, window) -> bool:
    """Every query sees every key of its sequence (no causal mask, no window)."""
    return not causal and window is None


def _reads(sees_all: bool, q, k, v, dout=None) -> tuple:
    """The tensors whose finiteness decides whether the kernel is exact on them. Its scores' max and
    exp can turn a NaN/inf of q or k into a finite row, so q and k are always read. v and the output
    gradient enter only its matmuls, where a NaN/inf reaches every row that multiplies it; so
    where every query sees every key (``sees_all``) the kernel's non-finite elements of out, lse,
    dq, dk and dv are the reference's (no mismatch in 4800 random plantings of NaN/inf in v and
    dout, lengths 1..1100, cross-attention included, against ~50% of trials with a mismatch for
    plantings in q and k; tests/test_nonfinite.py), while under causal or a window its tiles
    multiply masked zeros by them and leak NaN into rows that do not see them."""
    if sees_all:
        return (q, k)
    return (q, k, v) if dout is None else (q, k, v, dout)


def _inputs_finite(q, k, v, sees_all: bool = False) -> bool:
    """``_finite`` of ``_reads(sees_all, q, k, v)``, reading a base they share (q, k, v of one qkv
    projection: one contiguous read beats two strided views) or that k and v share (a separate kv
    projection) once."""
    if q._base is not None and q._base is k._base:
        return _finite(q, k, v)
    if not sees_all or (k._base is not None and k._base is v._base):
        return _finite(q) and _finite(k, v)
    return _finite(q) and _finite(k)


def _use_flash(t: torch.Tensor) -> bool:
    return _FLASH is not None and _FLASH_BWD is not None and t.device.type == "cpu"


def _flash_args(q: torch.Tensor, Lq: int, Lk: int, causal: bool, window=None):
    """(is_causal, attn_mask) for the kernel on one group, or None where it cannot serve it
    exactly: top-left causal on square problems; else an additive (Lq, Lk) mask (causal len_q <
    len_k, bottom-right; a ``window``, causal folded in), only while the mask is small and every
    row sees a key (a fully masked row is not the kernel's zero; len_q > len_k causal rows that see
    none were split off by ``_plan``)."""
    if window is None:
        if not causal or Lq == Lk:
            return causal, None
        window = (-1, 0)
    if Lq * Lk > _SCORE_BUDGET:
        return None
    seen = _visible(0, Lq, Lq, Lk, window, q.device)
    if not bool(seen.any(-1).all()):
        return None
    return False, torch.zeros(Lq, Lk, dtype=q.dtype, device=q.device).masked_fill_(~seen, float("-inf"))


def _kv_for(kb: torch.Tensor, vb: torch.Tensor, H: int):
    if kb.shape[1] == H or _native_gqa():
        return kb, vb, False
    g = H // kb.shape[1]
    return kb.repeat_interleave(g, 1), vb.repeat_interleave(g, 1), True


def _window(causal: bool, window=(-1, -1)) -> tuple:
    """flash-attn's window with causal folded in (causal => right = 0)."""
    return (int(window[0]), 0) if causal else (int(window[0]), int(window[1]))


def varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale: float, causal: bool, *, window=(-1, -1),
                   softcap: float = 0.0, alibi=None, dropout_p: float = 0.0, seed: int = 0):
    """Output (total_q, H, D) and lse (H, total_q). The keywords are flash-attn's features (see
    ``Features``): a window alone keeps the CPU flash kernel (an additive mask) where
    ``_flash_args`` allows; softcap, ALiBi or dropout run every group on the exact path."""
    out, lse, _ = varlen_forward_checked(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, window=window,
                                         softcap=softcap, alibi=alibi, dropout_p=dropout_p, seed=seed)
    return out, lse


def varlen_forward_checked(q, k, v, cu_q, cu_k, max_q, max_k, scale: float, causal: bool, *, window=(-1, -1),
                           softcap: float = 0.0, alibi=None, dropout_p: float = 0.0, seed: int = 0):
    """``varlen_forward`` and whether it found the inputs it reads (``_reads``) finite, its one
    check of them: the backward of the same call, passed ``inputs_finite=True``, then checks only
    dout, and not even that where every query sees every key."""
    features = Features.of(causal, window, softcap, alibi, dropout_p, seed)
    H = q.shape[1]
    acc = _acc_dtype(q.dtype)
    plan = _plan(cu_q, cu_k, causal)
    flash = _use_flash(q) and (features is None or features.window_only)
    window = None if features is None else features.window
    sees_all = _sees_all(causal, window)
    clean = flash and _inputs_finite(q, k, v, sees_all)
    if len(plan) == 1:   # one group holds every row: the kernel's (n, L, H, D) output is `out`
        out = lse = None
    else:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)   # the groups cover every row
        lse = torch.empty((H, q.shape[0]), dtype=acc, device=q.device)
    for g in plan:
        Lq, Lk, qst, kst = g.Lq, g.Lk, g.q_starts, g.k_starts
        if Lk == 0:  # no keys: zero output, lse -inf
            if out is None:
                return (q.new_zeros(q.shape), torch.full((H, q.shape[0]), float("-inf"), dtype=acc,
                                                         device=q.device), clean)
            _put(out, qst, Lq, 0.0, g.q_step)
            _put(_lse_rows(lse), qst, Lq, float("-inf"), g.q_step)
            continue
        args = _flash_args(q, Lq, Lk, causal, window) if flash else None
        if args is not None:
            qb, kb, vb = _seqs(q, qst, Lq, g.q_step), _seqs(k, kst, Lk, g.k_step), _seqs(v, kst, Lk, g.k_step)
            if clean or _finite(*_reads(sees_all, qb, kb, vb)):
                kb, vb, _ = _kv_for(kb, vb, H)
                is_causal, mask = args
                o, m = _FLASH(qb, kb, vb, 0.0, is_causal, attn_mask=mask, scale=scale)
                if out is None:
                    return _packed(o, q.shape), _packed_lse(m), clean
                _put(out, qst, Lq, o, g.q_step)
                _put(_lse_rows(lse), qst, Lq, m.unsqueeze(-1), g.q_step)
                continue
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            lse = torch.empty((H, q.shape[0]), dtype=acc, device=q.device)
        qi = _rows(qst, Lq, q.device)
        o, m = _exact_forward(q, k, v, g, scale, causal, True, features)
        out.index_copy_(0, qi, o.to(q.dtype))
        lse[:, qi] = m
    return out, lse, clean


def full_attention(q, k, v, cu_q, cu_k, scale: float) -> Optional[torch.Tensor]:
    """Non-causal attention without features whose sequences are all one length and tile the
    packed rows in order (ViT images, As-ViT windows, a re-tokenization stage): the output of
    the CPU flash kernel on (n, H, L, D) views, differentiated by PyTorch's own autograd node for
    it, whose C++ backward replaces this module's Python one (``varlen_backward``) and its per-call
    cost. Exact for NaN/inf: where every query sees every key only q and k need reading
    (``_reads``), and the backward reads nothing. None when the call does not qualify (other
    devices, GQA, several groups or gaps) or q or k is non-finite: then the general path runs."""
    if not _use_flash(q) or k.shape[1] != q.shape[1]:
        return None
    plan = _plan(cu_q, cu_k, False)
    if len(plan) != 1:
        return None
    g = plan[0]
    n = len(g.q_starts)
    if g.Lk == 0 or n * g.Lq != q.shape[0] or n * g.Lk != k.shape[0] or g.q_starts[0] or g.k_starts[0] \
            or (n > 1 and (g.q_step != g.Lq or g.k_step != g.Lk)):
        return None
    if not _inputs_finite(q, k, v, sees_all=True):
        return None
    # view + transpose: their backward is a view too (as_strided's would copy through zeros)
    qb, kb, vb = (t.view(n, L, t.shape[1], t.shape[2]).transpose(1, 2)
                  for t, L in ((q, g.Lq), (k, g.Lk), (v, g.Lk)))
    o, _ = _FLASH(qb, kb, vb, 0.0, False, scale=scale)
    return o.transpose(1, 2).reshape(q.shape)


def varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale: float, causal: bool, *,
                    window=(-1, -1), softcap: float = 0.0, alibi=None, dropout_p: float = 0.0, seed: int = 0,
                    inputs_finite: bool = False):
    """(dq, dk, dv); the keywords as ``varlen_forward``'s (dropout regenerates its keep mask).
    ``inputs_finite``: the forward (``varlen_forward_checked``) found the inputs it reads finite,
    so only dout is checked, where ``_reads`` needs it (autograd refuses a backward whose saved
    inputs were changed in place)."""
    features = Features.of(causal, window, softcap, alibi, dropout_p, seed)
    H = q.shape[1]
    plan = _plan(cu_q, cu_k, causal)
    flash = _use_flash(q) and (features is None or features.window_only)
    window = None if features is None else features.window
    sees_all = _sees_all(causal, window)
    clean = flash and (sees_all or _finite(dout)) and (inputs_finite or _inputs_finite(q, k, v, sees_all))
    keys_seen = sum(len(g.k_starts) * g.Lk for g in plan)  # keys of query-less sequences get 0
    # One group holding every query and key: the kernel's gradients are dq, dk, dv (views).
    whole = len(plan) == 1 and keys_seen == k.shape[0]
    dq = dk = dv = None
    if not whole:
        dq, dk, dv = _grad_buffers(q, k, v, keys_seen)
    for g in plan:
        Lq, Lk, qst, kst = g.Lq, g.Lk, g.q_starts, g.k_starts
        args = _flash_args(q, Lq, Lk, causal, window) if flash and Lk else None
        if args is not None:
            qb, dob = _seqs(q, qst, Lq, g.q_step), _seqs(dout, qst, Lq, g.q_step)
            kb, vb = _seqs(k, kst, Lk, g.k_step), _seqs(v, kst, Lk, g.k_step)
            if clean or _finite(*_reads(sees_all, qb, kb, vb, dob)):
                ob, m = _seqs(out, qst, Lq, g.q_step), _lse_seqs(lse, qst, Lq, g.q_step, _acc_dtype(q.dtype))
                kx, vx, repeated = _kv_for(kb, vb, H)
                is_causal, mask = args
                gq, gk, gv = _FLASH_BWD(dob, qb, kx, vx, ob, m, 0.0, is_causal, attn_mask=mask, scale=scale)
                if repeated:  # a kv head's gradient sums over the query heads that share it
                    gk = gk.unflatten(1, (k.shape[1], -1)).sum(2)
                    gv = gv.unflatten(1, (k.shape[1], -1)).sum(2)
                if whole:
                    return _packed(gq, q.shape), _packed(gk, k.shape), _packed(gv, v.shape)
                _put(dq, qst, Lq, gq, g.q_step)
                _put(dk, kst, Lk, gk, g.k_step)
                _put(dv, kst, Lk, gv, g.k_step)
                continue
        if dq is None:
            dq, dk, dv = _grad_buffers(q, k, v, keys_seen)
        if Lk == 0:
            _put(dq, qst, Lq, 0.0, g.q_step)
            continue
        qi, ki = _rows(qst, Lq, q.device), _rows(kst, Lk, q.device)
        dqb, dkb, dvb = _exact_backward(dout, q, k, v, out, lse, g, scale, causal, features)
        dq.index_copy_(0, qi, dqb.to(q.dtype))
        dk.index_copy_(0, ki, dkb.to(k.dtype))
        dv.index_copy_(0, ki, dvb.to(v.dtype))
    return dq, dk, dv


def _grad_buffers(q, k, v, keys_seen: int):
    """dq, dk, dv for the groups to write into: every query row is written; keys of query-less
    sequences are not (their gradient is 0)."""
    alloc = torch.empty if keys_seen == k.shape[0] else torch.zeros
    return (torch.empty(q.shape, dtype=q.dtype, device=q.device),
            *(alloc(t.shape, dtype=t.dtype, device=t.device) for t in (k, v)))


# ------------------------------------------------------------------------- the exact hand-rolled path

def _exact_forward(q, k, v, g: _Group, scale: float, causal: bool, check: bool, features=None):
    """One group (Lk > 0): outputs ``(n * Lq, H, D)`` and log-sum-exps ``(H, n * Lq)`` in the
    accumulation dtype. ``check``: see ``_mm_seen``."""
    H, n, Lq, Lk = q.shape[1], len(g.q_starts), g.Lq, g.Lk
    acc = _acc_dtype(q.dtype)
    qi, ki = _rows(g.q_starts, Lq, q.device), _rows(g.k_starts, Lk, q.device)
    qb = _gather(q, qi, n, Lq, H).to(acc)
    kb, vb = _gather(k, ki, n, Lk, H).to(acc), _gather(v, ki, n, Lk, H).to(acc)
    window = _window(causal) if features is None else features.window
    parts = []
    for rows, seen in _chunks(n, H, Lq, Lk, window, q.device):
        x = None if features is None else features.chunk(g, rows, H, acc, q.device)
        parts.append(_attend(qb[:, :, rows], kb, vb, scale, seen, check, x))
    o, m = (torch.cat(t, 2) if len(parts) > 1 else t[0] for t in zip(*parts))
    return o.transpose(1, 2).reshape(n * Lq, H, -1), m.transpose(0, 1).reshape(H, n * Lq)


def _exact_backward(dout, q, k, v, out, lse, g: _Group, scale: float, causal: bool, features=None):
    """One group's (dq (n * Lq, H, D), dk, dv (n * Lk, H_kv, D)) in the accumulation dtype."""
    H, H_kv, n, Lq, Lk = q.shape[1], k.shape[1], len(g.q_starts), g.Lq, g.Lk
    acc = _acc_dtype(q.dtype)
    qi, ki = _rows(g.q_starts, Lq, q.device), _rows(g.k_starts, Lk, q.device)
    qb, dob, ob = (_gather(t, qi, n, Lq, H).to(acc) for t in (q, dout, out))
    kb, vb = _gather(k, ki, n, Lk, H).to(acc), _gather(v, ki, n, Lk, H).to(acc)
    m = lse[:, qi].to(acc).view(H, n, Lq).transpose(0, 1)
    delta = (dob * ob).sum(-1, keepdim=True)  # = sum_j p_ij dp_ij with dropout too (ob is dropped)
    window = _window(causal) if features is None else features.window
    dqb, dkb, dvb = [], torch.zeros_like(kb), torch.zeros_like(vb)
    for rows, seen in _chunks(n, H, Lq, Lk, window, q.device):  # dk, dv sum over the chunks
        x = None if features is None else features.chunk(g, rows, H, acc, q.device)
        seen_t = None if seen is None else seen.T
        p, t = _probs(qb[:, :, rows], kb, m[:, :, rows], scale, seen, x)    # (n, H, rows, Lk)
        dp = dob[:, :, rows] @ vb.transpose(-1, -2)
        if x is not None and x.keep is not None:  # the forward's mask, regenerated
            dvb += _mm_seen((p * x.keep).transpose(-1, -2), dob[:, :, rows], seen_t)
            dp = dp * x.keep
        else:
            dvb += _mm_seen(p.transpose(-1, -2), dob[:, :, rows], seen_t)
        ds = p * (dp - delta[:, :, rows])
        if t is not None:  # d(c tanh(s / c)) / ds
            ds = ds * (1.0 - t * t)
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


def varlen_composite(q, k, v, cu_q, cu_k, scale: float, causal: bool, *, window=(-1, -1), softcap: float = 0.0,
                     alibi=None, dropout_p: float = 0.0, seed: int = 0) -> torch.Tensor:
    """The forward as differentiable composite PyTorch ops with no in-place writes, for callers
    under ``torch.func`` transforms (vmap, grad, jvp), which cannot see through a custom op."""
    features = Features.of(causal, window, softcap, alibi, dropout_p, seed)
    rows, outs = [], []
    for qi, o, _ in _group_outputs(q, k, v, cu_q, cu_k, scale, causal, False, features):
        rows.append(qi)
        outs.append(q.new_zeros(qi.numel(), *q.shape[1:]) if o is None else o.to(q.dtype))
    if not outs:
        return q.new_zeros(q.shape)
    # Rows of zero-length query sequences do not exist, so the groups cover every row once.
    return torch.cat(outs).index_select(0, torch.argsort(torch.cat(rows)))
