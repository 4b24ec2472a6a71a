"""flash-attn's window_size, softcap, alibi_slopes and dropout through ``varlen_attention``: each
alone and combined, causal or not, GQA, head dim 45, empty and one-token sequences, len_q != len_k,
forward, lse and gradients against the float64 reference ``varlen_attention_features`` fed the
backend's own dropout keep mask; dropout statistically and by seed; gradcheck; argument errors;
the cuda backend refused with the feature named; NaN isolation under a window."""
import dataclasses
import importlib
import math

import pytest
import torch

import asvit_kernels as ak
from asvit_kernels import backends
from asvit_kernels.reference.attention import varlen_attention_features, visible_mask
from asvit_kernels.torch_backend import attention as tb

from _util import TOL, cases, rel_err

op = importlib.import_module("asvit_kernels.ops.attention")   # the module (the package exports a function by that name)

LENS_Q = [7, 0, 1, 12, 5, 1, 9]
LENS_K = [9, 3, 0, 12, 2, 1, 4]
H, H_KV, D = 4, 2, 45


def _features(name: str, batch: int) -> dict:
    g = torch.Generator().manual_seed(99)
    alibi_h = torch.rand(H, generator=g) * 0.5
    return {
        "window": dict(window_size=(3, 1)),
        "window_left": dict(window_size=(2, -1)),
        "window_right": dict(window_size=(-1, 2)),
        "softcap": dict(softcap=0.8),
        "alibi_h": dict(alibi_slopes=alibi_h),
        "alibi_bh": dict(alibi_slopes=torch.rand(batch, H, generator=g)),
        "dropout": dict(dropout_p=0.3),
        "all": dict(window_size=(4, 2), softcap=1.5, alibi_slopes=alibi_h, dropout_p=0.2),
    }[name]


FEATURE_NAMES = ["window", "window_left", "window_right", "softcap", "alibi_h", "alibi_bh", "dropout", "all"]


def _keep_mask_fn(backend: str):
    """The backend's ``dropout_keep_mask`` (each backend has its own RNG)."""
    if backend == "torch":
        return tb.dropout_keep_mask
    from asvit_kernels.triton import varlen_attention as tv
    if hasattr(tv, "dropout_keep_mask"):
        return tv.dropout_keep_mask
    from asvit_kernels.triton import attention_features
    return attention_features.dropout_keep_mask


def _drawn_seed(seed: int) -> int:
    """The dropout seed the op draws from ``torch.Generator().manual_seed(seed)``."""
    return int(torch.randint(0, 2 ** 31, (1,), generator=torch.Generator().manual_seed(seed)))


def _inputs(lens_q, lens_k, dtype, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lens_q), sum(lens_k)
    q, k, v = (torch.randn(n, h, D, generator=g, dtype=torch.float64).to(dtype).double()
               for n, h in ((tq, H), (tk, H_KV), (tk, H_KV)))
    dy = torch.randn(tq, H, D, generator=g, dtype=torch.float64).to(dtype).double()
    cu_q, cu_k = ak.cu_seqlens_from_lengths(lens_q), ak.cu_seqlens_from_lengths(lens_k)
    return q, k, v, dy, cu_q.to(device), cu_k.to(device)


def check_against_reference(backend, dtype, kw, causal, lens_q=LENS_Q, lens_k=LENS_K, seed=0, tol=None):
    """out, lse, dq, dk, dv of ``backend`` vs the float64 reference with the backend's keep mask."""
    device = "cpu"
    q0, k0, v0, dy, cu_q, cu_k = _inputs(lens_q, lens_k, dtype, seed, device)
    leaves = [t.to(device, dtype).clone().requires_grad_() for t in (q0, k0, v0)]
    out, lse = ak.varlen_attention(*leaves, cu_q, cu_k, None, None, causal=causal, backend=backend,
                                   return_lse=True, generator=torch.Generator().manual_seed(seed), **kw)
    out.backward(dy.to(device, dtype))
    p = kw.get("dropout_p", 0.0)
    masks = _keep_mask_fn(backend)(_drawn_seed(seed), p, cu_q, cu_k, H, device) if p else None
    ref_leaves = [t.clone().requires_grad_() for t in (q0, k0, v0)]
    want, want_lse = varlen_attention_features(*ref_leaves, cu_q, cu_k, None, causal, kw.get("window_size", (-1, -1)),
                                               kw.get("softcap", 0.0), kw.get("alibi_slopes"), masks, p,
                                               return_lse=True)
    want.backward(dy)
    tol = TOL[dtype] if tol is None else tol
    assert torch.equal(lse == -math.inf, want_lse == -math.inf), "rows with no visible key differ"
    finite_lse = (lse.double().nan_to_num(neginf=0.0), want_lse.nan_to_num(neginf=0.0))
    for name, got, ref in [("out", out, want), ("lse", *finite_lse)] + [
            (f"d{n}", t.grad, r.grad) for n, t, r in zip("qkv", leaves, ref_leaves)]:
        assert rel_err(got, ref) <= tol, (name, rel_err(got, ref))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature", FEATURE_NAMES)
def test_torch_backend_matches_reference(feature, causal):
    kw = _features(feature, len(LENS_Q))
    check_against_reference("torch", torch.float64, kw, causal, tol=1e-12)
    check_against_reference("torch", torch.float32, kw, causal, seed=1, tol=2e-6)
    check_against_reference("torch", torch.float16, kw, causal, seed=2)


def test_self_attention_and_mixed_lengths():
    """cu_seqlens_k = cu_seqlens_q (self-attention, one longer sequence among short ones)."""
    lens = [1, 0, 17, 3, 30, 2]
    check_against_reference("torch", torch.float32, _features("all", len(lens)), True, lens, lens, seed=3, tol=2e-6)
    check_against_reference("torch", torch.float32, dict(window_size=(0, 2)), False, lens, lens, seed=4, tol=2e-6)


def test_a_window_alone_keeps_the_cpu_flash_kernel(monkeypatch):
    """A window alone runs as the CPU flash kernel with an additive mask (groups whose rows all
    see a key); softcap, ALiBi or dropout take the exact path. Both equal the reference."""
    if tb._FLASH is None:
        pytest.skip("this torch has no aten::_scaled_dot_product_flash_attention_for_cpu")
    calls = []
    fwd = tb._FLASH
    monkeypatch.setattr(tb, "_FLASH", lambda *a, **kw: calls.append(1) or fwd(*a, **kw))
    check_against_reference("torch", torch.float32, dict(window_size=(3, 1)), True, tol=2e-6)
    assert calls
    calls.clear()
    check_against_reference("torch", torch.float32, dict(window_size=(3, 1), softcap=2.0), True, tol=2e-6)
    assert not calls


def test_window_rows_that_see_no_key_when_len_q_exceeds_len_k():
    """window (1, 0) with len_q > len_k: rows whose window ends before key 0 see no key (output 0,
    lse -inf, zero gradient); the next see one key, then two."""
    check_against_reference("torch", torch.float64, dict(window_size=(1, 0)), False, [6, 3], [2, 3], tol=1e-12)


@pytest.mark.parametrize("device,name", [c for c in cases("varlen_attention") if c.values[1] == "triton"])
def test_triton_takes_the_features(device, name):
    """The Triton kernels match the reference on each feature (interpreter: fp32, fp16)."""
    # each feature once, causal or not, fp32 and fp16 (the kernels' own tests cover more)
    for feature, causal, dtype in [("window", True, torch.float32), ("softcap", False, torch.float16),
                                   ("alibi_bh", True, torch.float16), ("dropout", False, torch.float32),
                                   ("all", True, torch.float32)]:
        check_against_reference(name, dtype, _features(feature, len(LENS_Q)), causal, seed=int(causal))


# ----------------------------------------------------------------------------------- dropout

@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_keep_rate_is_one_minus_p(p):
    """The keep mask is Bernoulli(1 - p): its rate within 4 sigma, per head and overall."""
    cu = ak.cu_seqlens_from_lengths([300, 0, 211])
    cu_k = ak.cu_seqlens_from_lengths([257, 5, 190])
    masks = tb.dropout_keep_mask(_drawn_seed(0), p, cu, cu_k, H)
    assert [tuple(m.shape) for m in masks] == [(H, 300, 257), (H, 0, 5), (H, 211, 190)]
    kept = torch.cat([m.reshape(H, -1) for m in masks], 1).double()
    n = kept.shape[1]
    sigma = math.sqrt(p * (1 - p) / n)
    assert (kept.mean(1) - (1 - p)).abs().max() <= 4 * sigma
    # neighbouring keys and rows are not correlated (a weak hash shows up here first)
    m = masks[0].double()
    for a, b in ((m[:, :, 1:], m[:, :, :-1]), (m[:, 1:], m[:, :-1])):
        corr = ((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std())
        assert abs(float(corr)) <= 4 / math.sqrt(a.numel())


def test_op_drops_at_rate_p():
    """Through the op: with uniform attention (q = 0: every score equal) and v = 1, each row's
    output is (kept keys) / (len_k (1 - p)); its mean over rows is 1 within 4 sigma."""
    p, L = 0.25, 200
    cu = ak.cu_seqlens_from_lengths([L, L])
    q = torch.zeros(2 * L, H, D, dtype=torch.float64)   # equal scores on purpose: a count, not a value
    v = torch.ones(2 * L, H_KV, D, dtype=torch.float64)
    out = ak.varlen_attention(q, q[:, :H_KV], v, cu, cu, dropout_p=p, generator=torch.Generator().manual_seed(7))
    kept = out[..., 0] * (1 - p) * L                     # kept keys per (row, head)
    assert torch.allclose(kept, kept.round(), atol=1e-9)
    sigma = math.sqrt(p * (1 - p) / (L * kept.numel()))
    assert abs(float(out[..., 0].mean()) * (1 - p) - (1 - p)) <= 4 * sigma


def test_same_seed_same_output_other_seed_other_output():
    q0, k0, v0, _, cu_q, cu_k = _inputs(LENS_Q, LENS_K, torch.float32, 5)
    q, k, v = q0.float(), k0.float(), v0.float()

    def call(seed=None, **kw):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        return ak.varlen_attention(q, k, v, cu_q, cu_k, dropout_p=0.4, generator=gen, **kw)
    assert torch.equal(call(3), call(3))
    assert not torch.equal(call(3), call(4))
    torch.manual_seed(11)
    a = call()
    torch.manual_seed(11)
    assert torch.equal(a, call())            # the default generator, re-seeded
    assert not torch.equal(a, call())        # ... and advanced by each call
    assert torch.equal(call(3, deterministic=True), call(3))   # deterministic changes nothing
    plain = ak.varlen_attention(q, k, v, cu_q, cu_k)
    state = torch.get_rng_state()
    assert torch.equal(ak.varlen_attention(q, k, v, cu_q, cu_k, dropout_p=0.0), plain)
    assert torch.equal(torch.get_rng_state(), state)          # no dropout: no seed drawn


def test_gradcheck_float64_with_a_fixed_seed():
    lens_q, lens_k = [3, 0, 4], [5, 2, 3]
    cu_q, cu_k = ak.cu_seqlens_from_lengths(lens_q), ak.cu_seqlens_from_lengths(lens_k)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(7, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(10, 1, 5, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(10, 1, 5, generator=g, dtype=torch.float64, requires_grad=True)
    alibi = torch.tensor([0.3, 0.1])
    for causal in (False, True):
        def f(q, k, v):
            return ak.varlen_attention(q, k, v, cu_q, cu_k, None, None, 0.3, None, causal, (2, 1), 2.0, alibi,
                                       backend="torch", generator=torch.Generator().manual_seed(9))
        assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=True)


# ------------------------------------------------------------------------------ the interface

def test_backends_get_the_extras_only_when_a_feature_is_used(monkeypatch):
    """Plain calls (causal, or a (-1, 0) window, which is causal) reach the backend exactly as
    before; a feature call passes the five keywords, the window folded with causal."""
    seen = []
    real = tb.varlen_forward_checked  # what the op calls for the torch backend

    def spy(*args, **kw):
        seen.append((args[8], kw))
        return real(*args, **kw)
    monkeypatch.setattr(tb, "varlen_forward_checked", spy)
    q0, k0, v0, _, cu_q, cu_k = _inputs(LENS_Q, LENS_K, torch.float64, 6)
    call = lambda **kw: ak.varlen_attention(q0, k0, v0, cu_q, cu_k, backend="torch", **kw)  # noqa: E731
    call()
    call(causal=True)
    call(causal=True, window_size=(-1, 0))
    call(window_size=(-1, 0))
    call(causal=True, softcap=2.0)
    call(causal=True, window_size=(3, 5), dropout_p=0.5, generator=torch.Generator().manual_seed(1))
    assert seen[:4] == [(False, {}), (True, {}), (True, {}), (True, {})]
    assert seen[4] == (True, dict(window=(-1, 0), softcap=2.0, alibi=None, dropout_p=0.0, seed=0))
    assert seen[5][1]["window"] == (3, 0) and seen[5][1]["seed"] == _drawn_seed(1)
    want = varlen_attention_features(q0, k0, v0, cu_q, cu_k, None, True)
    assert rel_err(call(window_size=(-1, 0)), want) <= TOL[torch.float64]


def test_cuda_backend_is_refused_naming_the_feature(monkeypatch):
    """The CUDA extension (and torch_flash) have no features: auto-dispatch on CUDA passes them
    over with the features named, and backend='cuda' raises naming them (availability and the
    capability table faked: this is the op's dispatch, before any kernel)."""
    for arch in (80, 90):
        verdicts = {v.backend: v for v in backends.explain("varlen_attention", torch.device("cuda"), torch.float16,
                                                            features=("window", "dropout"), arch=arch,
                                                            check_available=False)}
        assert not verdicts["cuda"].chosen and not verdicts["torch_flash"].chosen
        for name in ("cuda", "torch_flash"):
            assert "does not implement dropout, window" in verdicts[name].reason
    monkeypatch.setattr(backends, "why_unavailable", lambda name, device: None)
    for b in ("cuda", "torch_flash"):  # their declared capability, except that it takes these CPU fp32 tensors
        cap = backends.capabilities.TABLE["varlen_attention"][b]
        monkeypatch.setitem(backends.capabilities.TABLE["varlen_attention"], b, dataclasses.replace(
            cap, devices=("cuda", "cpu"), dtypes=backends.capabilities.KERNEL_DTYPES, min_arch=None,
            head_dim=lambda d: None))
    q0, k0, v0, _, cu_q, cu_k = _inputs(LENS_Q, LENS_K, torch.float32, 0)
    for kw, name in [(dict(window_size=(2, 2)), "window"), (dict(softcap=1.0), "softcap"),
                     (dict(alibi_slopes=torch.ones(H)), "alibi"), (dict(dropout_p=0.1), "dropout")]:
        for backend in ("cuda", "torch_flash"):
            with pytest.raises(RuntimeError, match=f"does not implement {name}"):
                ak.varlen_attention(q0.float(), k0.float(), v0.float(), cu_q, cu_k, backend=backend, **kw)


def test_features_under_torch_func_match_autograd():
    """torch.func.grad runs the composite form with the same features and the same dropout mask."""
    q0, k0, v0, _, cu_q, cu_k = _inputs(LENS_Q, LENS_K, torch.float64, 8)
    kw = dict(_features("all", len(LENS_Q)), causal=True)

    def loss(q):
        gen = torch.Generator().manual_seed(2)
        return (ak.varlen_attention(q, k0, v0, cu_q, cu_k, generator=gen, **kw) ** 2).sum()
    got = torch.func.grad(loss)(q0)
    q = q0.clone().requires_grad_()
    loss(q).backward()
    assert rel_err(got, q.grad) <= TOL[torch.float64]


def test_feature_path_memory_is_chunked(monkeypatch):
    """One long sequence with every feature: no intermediate above _SCORE_BUDGET elements."""
    from test_ops_attention import _LargestOutput
    monkeypatch.setattr(tb, "_SCORE_BUDGET", 1 << 15)   # 32 query rows a chunk
    N = 256
    q, k, v, dy, cu, _ = _inputs([N], [N], torch.float64, 9)
    kw = dict(window=(50, 0), softcap=1.0, alibi=torch.rand(1, H), dropout_p=0.1, seed=4)
    with _LargestOutput() as seen:
        out, lse = tb.varlen_forward(q, k, v, cu, cu, N, N, D ** -0.5, True, **kw)
        tb.varlen_backward(dy, q, k, v, out, lse, cu, cu, N, N, D ** -0.5, True, **kw)
    assert seen.largest <= max(1 << 15, N * H * D) < N * N * H, seen.largest


# ------------------------------------------------------------------------------ bad arguments

@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(dropout_p=-0.1), ValueError, "dropout_p"), (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(dropout_p=math.nan), ValueError, "dropout_p"), (dict(dropout_p="0.1"), TypeError, "dropout_p"),
    (dict(window_size=3), TypeError, "window_size"), (dict(window_size=(1, 2, 3)), TypeError, "window_size"),
    (dict(window_size=(1.0, 2)), TypeError, "window_size"), (dict(window_size=(True, 2)), TypeError, "window_size"),
    (dict(window_size=(-2, 0)), ValueError, "window_size"),
    (dict(softcap=-1.0), ValueError, "softcap"), (dict(softcap=math.inf), ValueError, "softcap"),
    (dict(softcap=math.nan), ValueError, "softcap"), (dict(softcap="1"), TypeError, "softcap"),
    (dict(alibi_slopes=[0.1] * H), TypeError, "alibi_slopes"),
    (dict(alibi_slopes=torch.ones(H, dtype=torch.float64)), TypeError, "alibi_slopes must be float32"),
    (dict(alibi_slopes=torch.ones(H + 1)), ValueError, "alibi_slopes must be"),
    (dict(alibi_slopes=torch.ones(2, H)), ValueError, r"\(batch, H\)"),
    (dict(alibi_slopes=torch.ones(H, device="meta")), ValueError, "alibi_slopes is on meta"),
    (dict(deterministic=1), TypeError, "deterministic"),
    (dict(generator=7), TypeError, "generator"),
])
def test_bad_feature_arguments_raise_naming_them(kwargs, exc, msg):
    q0, k0, v0, _, cu_q, cu_k = _inputs(LENS_Q, LENS_K, torch.float32, 0)
    with pytest.raises(exc, match=msg):
        ak.varlen_attention(q0.float(), k0.float(), v0.float(), cu_q, cu_k, **kwargs)


# ------------------------------------------------------------------------------ non-finite

@pytest.mark.parametrize("extra", [{}, dict(softcap=3.0, alibi_slopes=torch.full((H,), 0.2))],
                         ids=["window", "window+softcap+alibi"])
@pytest.mark.parametrize("where,bad", [("k", math.nan), ("v", math.nan), ("v", math.inf)])
def test_non_finite_reaches_only_the_rows_whose_window_sees_it(where, bad, extra):
    """A NaN/inf key or value in one sequence under a (2, 1) window (softcap, ALiBi on): exactly
    the rows whose window holds it are non-finite, forward and dq; other rows and other sequences
    match the reference. (An inf key is left out: softcap's tanh maps its score to a finite one.)"""
    lens = [6, 10, 5]
    q0, k0, v0, dy, cu, _ = _inputs(lens, lens, torch.float64, 10)
    j = 3
    (k0 if where == "k" else v0)[6 + j, 1, 4] = bad
    leaves = [t.clone().requires_grad_() for t in (q0, k0, v0)]
    kw = dict(window_size=(2, 1), **extra)
    out = ak.varlen_attention(*leaves, cu, cu, backend="torch", **kw)
    out.backward(dy)
    reach = torch.zeros(sum(lens), H, dtype=torch.bool)
    reach[6:16] = visible_mask(10, 10, False, (2, 1))[:, j, None].expand(10, H).clone()
    reach[6:16, :] &= torch.arange(H)[None, :] // (H // H_KV) == 1   # only the q heads of kv head 1
    assert torch.equal(~torch.isfinite(out).all(-1), reach)
    assert torch.equal(~torch.isfinite(leaves[0].grad).all(-1), reach)
    ref = [t.clone().requires_grad_() for t in (q0, k0, v0)]
    want = varlen_attention_features(*ref, cu, cu, None, False, (2, 1), kw.get("softcap", 0.0),
                                     kw.get("alibi_slopes"))
    want.backward(dy)
    assert rel_err(out[~reach], want[~reach]) <= TOL[torch.float64]
    assert rel_err(leaves[0].grad[~reach], ref[0].grad[~reach]) <= TOL[torch.float64]


def test_nn_attention_attn_drop_runs_in_the_kernel():
    """asvit_kernels.nn.Attention(attn_drop=p) in training drops attention probabilities through
    the op (timm's attn_drop); the output is the reference's with the torch backend's mask."""
    from asvit_kernels.nn import Attention
    attn = Attention(16, 2, attn_drop=0.25).double().train()
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(21)
    out = attn(x)
    q, k, v = attn.qkv(x).reshape(10, 3, 2, 8).unbind(1)
    cu = ak.cu_seqlens_from_lengths([5, 5])
    masks = tb.dropout_keep_mask(int(torch.randint(0, 2 ** 31, (1,), generator=torch.Generator().manual_seed(21))),
                                 0.25, cu, cu, 2)
    o = varlen_attention_features(q, k, v, cu, cu, attn.scale, keep_masks=masks, dropout_p=0.25)
    want = attn.proj(o.reshape(2, 5, 16))
    assert rel_err(out, want) <= TOL[torch.float64]
    assert rel_err(attn.eval()(x), want) > 1e-3          # eval: no dropout
