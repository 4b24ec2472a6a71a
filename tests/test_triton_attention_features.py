"""The Triton varlen attention kernels' optional features (flash-attn 2.6+ semantics: window_size,
softcap, ALiBi, dropout) against the float64 reference ``reference.attention.varlen_attention_features``
given the same keep mask, forward (output and lse) and backward (dq, dk, dv), in the interpreter.

The kernels are called directly (``varlen_forward`` / ``varlen_backward``, with the extras the op
layer passes). Inputs: mixed lengths with an empty and a one-token sequence, GQA (4 query heads on
2 kv heads), head dim 45 (padded to 64 in registers), fp32 and fp16; both tilings (packed
multi-sequence tiles and per-sequence tiles) where the masks differ between them.

Low-precision criterion (flash-attn's, as test_ops_attention): the error against float64 may be at
most 2x (forward) / 3x (gradients) that of the same computation done by PyTorch in that dtype.
"""
import math

import pytest
import torch

import asvit_kernels as ak
from asvit_kernels.reference.attention import varlen_attention_features
from asvit_kernels.triton import varlen_attention as va

from _util import TOL, rel_err

LENS = [23, 0, 1, 41, 30]          # several sequences per 32-row tile, one over two tiles
H, H_KV, D = 4, 2, 45
DTYPES = [torch.float32, torch.float16]


def force_tiling(monkeypatch, mode: str) -> None:
    """Make every launch use ``mode`` ("packed" or "per_seq") whatever the lengths."""
    monkeypatch.setattr(va, "choose_tiling", lambda *a, **k: mode)


def _inputs(lens_q, lens_k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    # Values representable in ``dtype``, so float64 sees exactly the kernel's inputs.
    q, k, v = (torch.randn(n, h, D, generator=g, dtype=torch.float64).to(dtype).double()
               for n, h in ((tq, H), (tk, H_KV), (tk, H_KV)))
    dout = torch.randn(tq, H, D, generator=g, dtype=torch.float64).to(dtype).double()
    alibi = (0.05 + 0.45 * torch.rand(len(lens_q), H, generator=g)).float()
    return q, k, v, dout, alibi


def _reference(q, k, v, dout, cu_q, cu_k, dtype, causal, extras, keep):
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v)]
    out, lse = varlen_attention_features(
        *leaves, cu_q, cu_k, D ** -0.5, causal, extras.get("window", (-1, -1)), extras.get("softcap", 0.0),
        extras.get("alibi"), keep, extras.get("dropout_p", 0.0), return_lse=True)
    out.backward(dout.to(dtype))
    return [out, lse] + [t.grad for t in leaves]


def run(dtype, causal, extras, lens_q=LENS, lens_k=None, seed=0):
    """Forward and backward of the kernels against the float64 reference (same keep mask)."""
    lens_k = lens_q if lens_k is None else lens_k
    q, k, v, dout, alibi = _inputs(lens_q, lens_k, dtype, seed)
    extras = dict(extras)
    if extras.pop("alibi", False):
        extras["alibi"] = alibi
    cu_q, cu_k = (ak.cu_seqlens_from_lengths(n) for n in (lens_q, lens_k))
    args = (cu_q, cu_k, max(lens_q), max(lens_k), D ** -0.5, causal)
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    out, lse = va.varlen_forward(qd, kd, vd, *args, **extras)
    grads = va.varlen_backward(dout.to(dtype), qd, kd, vd, out, lse, *args, **extras)
    keep = (va.dropout_keep_mask(extras["seed"], extras["dropout_p"], cu_q, cu_k, H, "cpu")
            if extras.get("dropout_p", 0) > 0 else None)
    exact = _reference(q, k, v, dout, cu_q, cu_k, torch.float64, causal, extras, keep)
    same = _reference(q, k, v, dout, cu_q, cu_k, dtype, causal, extras, keep) if dtype != torch.float32 else None
    # lse: -inf exactly where a row sees no key, else compared like the rest.
    assert torch.equal(lse == float("-inf"), exact[1] == float("-inf")), "rows that see no key differ"
    seen = exact[1] > float("-inf")
    got = [out, lse[seen]] + list(grads)
    exact[1] = exact[1][seen]
    for i, name in enumerate(["out", "lse", "dq", "dk", "dv"]):
        err = rel_err(got[i], exact[i])
        bound = TOL[dtype]
        if same is not None:
            ref_err = rel_err((same[1][seen] if name == "lse" else same[i]), exact[i])
            bound = (2 if name in ("out", "lse") else 3) * max(ref_err, 1e-4)
        assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g} ({dtype}, causal={causal}, {extras})"
    return out, lse, grads


FEATURES = {"window": dict(window=(7, 3)), "softcap": dict(softcap=2.0), "alibi": dict(alibi=True),
            "dropout": dict(dropout_p=0.3, seed=1234)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("feature", FEATURES)
def test_each_feature_alone(feature, dtype, poison):
    run(dtype, False, FEATURES[feature], seed=len(feature))


@pytest.mark.parametrize("dtype,causal,tiling", [
    pytest.param(dt, c, t, id=f"{str(dt)[6:]}-{'causal' if c else 'full'}-{t}")
    for dt, c, t in ((torch.float32, False, "packed"), (torch.float32, False, "per_seq"),
                     (torch.float32, True, "packed"), (torch.float32, True, "per_seq"),
                     (torch.float16, True, "packed"), (torch.float16, False, "per_seq"))])
def test_all_features_combined(dtype, causal, tiling, monkeypatch, poison):
    force_tiling(monkeypatch, tiling)
    # causal folds into right = 0 (as the op layer passes it); the left edge still applies.
    extras = dict(window=(9, 0 if causal else 4), softcap=3.0, alibi=True, dropout_p=0.2, seed=77)
    run(dtype, causal, extras, seed=3 + causal)


@pytest.mark.parametrize("window,tiling", [((1, 0), "packed"), ((1, 0), "per_seq"), ((-1, 2), "per_seq"),
                                           ((5, -1), "packed")])
def test_window_edges(window, tiling, monkeypatch, poison):
    """A two-key window (one key would make dq exactly 0) and one-sided windows, with causal
    cross-attention lengths (bottom-right aligned: len_k < len_q leaves early rows with no key)."""
    force_tiling(monkeypatch, tiling)
    run(torch.float32, window[1] <= 0, dict(window=window, alibi=True), [5, 9, 1, 0, 12], [3, 14, 1, 2, 0], seed=9)


def test_dropout_keep_rate_and_mask_keys():
    """Keep rate within 4 sigma of 1 - p; the mask is a function of (seed, head, global query row,
    local key) only: the same seed gives the same mask, another seed another, and equal-length
    sequences (other rows) and heads get different bits. (That the kernels apply exactly this mask
    is what run() checks, against the reference given it.)"""
    p, lens = 0.3, [90, 90, 7]
    cu = ak.cu_seqlens_from_lengths(lens)
    masks = va.dropout_keep_mask(5, p, cu, cu, 2, "cpu")
    assert [tuple(m.shape) for m in masks] == [(2, n, n) for n in lens]
    n = sum(m.numel() for m in masks)
    rate = sum(m.sum().item() for m in masks) / n
    assert abs(rate - (1 - p)) <= 4 * math.sqrt(p * (1 - p) / n), f"keep rate {rate:.4f}, expected {1 - p}"
    assert all(torch.equal(a, b) for a, b in zip(masks, va.dropout_keep_mask(5, p, cu, cu, 2, "cpu")))
    assert not torch.equal(masks[0], va.dropout_keep_mask(6, p, cu, cu, 2, "cpu")[0])
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[0][0], masks[0][1])


def test_dropout_is_bitwise_reproducible(monkeypatch, poison):
    """Same seed, same bits: forward and backward twice, per-sequence tiles, the largest seed."""
    force_tiling(monkeypatch, "per_seq")
    lens = [23, 1, 30]
    q, k, v, dout, _ = _inputs(lens, lens, torch.float32, 13)
    cu = ak.cu_seqlens_from_lengths(lens)
    args = (cu, cu, max(lens), max(lens), D ** -0.5, True)
    extras = dict(dropout_p=0.5, seed=2 ** 31 - 1, window=(6, 0))
    runs = []
    for _ in range(2):
        leaves = [t.float() for t in (q, k, v)]
        out, lse = va.varlen_forward(*leaves, *args, **extras)
        runs.append((out, lse, *va.varlen_backward(dout.float(), *leaves, out, lse, *args, **extras)))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert torch.isfinite(runs[0][0]).all()


def test_window_nan_reaches_only_rows_that_see_it(monkeypatch, poison):
    """A NaN key inside sequence 1 reaches exactly the rows whose window holds it, forward and
    backward; the other rows and sequences stay finite and match the reference. Packed tiles:
    where a tile computes scores of the NaN key for rows of other sequences too."""
    force_tiling(monkeypatch, "packed")
    lens = [20, 33, 17]
    cu = ak.cu_seqlens_from_lengths(lens)
    q, k, v, dout, _ = _inputs(lens, lens, torch.float32, 21)
    k[20 + 10, 1, 3] = float("nan")  # sequence 1, key 10, kv head 1 (query heads 2, 3)
    args = (cu, cu, max(lens), max(lens), D ** -0.5, False)
    extras = dict(window=(4, 2), softcap=2.0)
    leaves = [t.float() for t in (q, k, v)]
    out, lse = va.varlen_forward(*leaves, *args, **extras)
    dq, dk, dv = va.varlen_backward(dout.float(), *leaves, out, lse, *args, **extras)
    exact = _reference(q, k, v, dout, cu, cu, torch.float64, False, extras, None)
    sees = torch.zeros(sum(lens), H, dtype=torch.bool)
    sees[20 + 8:20 + 15, 2:] = True  # rows i with i - 4 <= 10 <= i + 2
    assert torch.equal(out.isnan().any(-1), sees) and torch.equal(exact[0].isnan().any(-1), sees)
    assert rel_err(out[~sees], exact[0][~sees]) <= TOL[torch.float32]
    for got, want in zip((dq, dk, dv), exact[2:]):
        assert torch.equal(got.isnan(), want.isnan())
        assert rel_err(torch.where(got.isnan(), 0, got), torch.where(want.isnan(), 0, want)) <= TOL[torch.float32]
    other = torch.ones(sum(lens), dtype=torch.bool)
    other[20:53] = False
    assert torch.isfinite(dq[other]).all() and torch.isfinite(dk[other]).all() and torch.isfinite(dv[other]).all()


@pytest.mark.parametrize("extras,error,match", [
    (dict(window=(2,)), TypeError, "window"), (dict(window=(-2, 0)), ValueError, "window"),
    (dict(window=(1.0, 2)), TypeError, "window"), (dict(softcap=-1.0), ValueError, "softcap"),
    (dict(softcap=float("inf")), ValueError, "softcap"), (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p"), (dict(dropout_p=0.1, seed=2 ** 31), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"), (dict(alibi=torch.ones(3, H)), ValueError, "alibi"),
    (dict(alibi=torch.ones(len(LENS), H, dtype=torch.float64)), ValueError, "alibi"),
    (dict(unknown=1), TypeError, "unknown"),
])
def test_bad_extras_are_refused_before_any_work(extras, error, match):
    q = torch.randn(sum(LENS), H, D)
    k = torch.randn(sum(LENS), H_KV, D)
    cu = ak.cu_seqlens_from_lengths(LENS)
    with pytest.raises(error, match=match):
        va.varlen_forward(q, k, k, cu, cu, max(LENS), max(LENS), 0.1, False, **extras)


def test_tiling_choice_follows_the_work():
    """Short sequences pack, windows of 49 tokens and longer take per-sequence tiles, and the
    choice never does more work than the other tiling (counted exactly) on these shapes."""
    from asvit_kernels.triton import attention_config as ac

    for lens, want in (([16] * 64, "packed"), ([49] * 64, "per_seq"), ([300] * 8, "per_seq")):
        t = sum(lens)
        got = ac.choose_tiling(t, t, len(lens), max(lens), max(lens), 64, 32)
        assert got == want, (lens[0], got)
        work = {m: ac.computed_score_entries(lens, lens, 64, 32, m)["fwd"] for m in ("packed", "per_seq")}
        assert work[got] <= work[{"packed": "per_seq", "per_seq": "packed"}[got]], (lens[0], work)
