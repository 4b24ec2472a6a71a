"""The compiled variable-length attention kernels (``_C.varlen_attention_*``): argument checks and the
no-device error without a GPU; with a GPU (``-m gpu``) forward and gradients against a float64
per-sequence reference, through ``asvit_kernels.cuda_backend.attention``."""
from __future__ import annotations

import itertools
import math

import pytest

from asvit_kernels import _ext

from _ext_util import HAS_DEVICE, C, gpu, needs_ext, needs_no_device  # noqa: F401




# ------------------------------------------------------------------------------------------------
# Argument checks and the no-device error (no GPU needed: arguments are checked first)
# ------------------------------------------------------------------------------------------------
# Fake, well-aligned "device pointers": never dereferenced, since every call below either fails
# validation, is a no-op, or (without a GPU) stops at the device check.
def fwd_args(**overrides):
    T, H, D = 10, 4, 64
    args = dict(q=1 << 20, k=2 << 20, v=3 << 20, out=4 << 20, lse=5 << 20, cu_seqlens_q=6 << 20,
                cu_seqlens_k=7 << 20, batch=2, total_q=T, total_k=12, H=H, H_kv=2, D=D,
                q_stride_t=H * D, q_stride_h=D, k_stride_t=2 * D, k_stride_h=D, v_stride_t=2 * D,
                v_stride_h=D, out_stride_t=H * D, out_stride_h=D, max_seqlen_q=6, max_seqlen_k=7,
                scale=0.125, causal=True, dtype=1, stream=0)
    args.update(overrides)
    return args


def bwd_args(**overrides):
    H, D = 4, 64
    args = dict(dout=8 << 20, q=1 << 20, k=2 << 20, v=3 << 20, out=4 << 20, lse=5 << 20,
                dq=9 << 20, dk=10 << 20, dv=11 << 20, workspace=12 << 20, cu_seqlens_q=6 << 20,
                cu_seqlens_k=7 << 20, batch=2, total_q=10, total_k=12, H=H, H_kv=2, D=D,
                dout_stride_t=H * D, dout_stride_h=D, q_stride_t=H * D, q_stride_h=D,
                k_stride_t=2 * D, k_stride_h=D, v_stride_t=2 * D, v_stride_h=D,
                out_stride_t=H * D, out_stride_h=D, dq_stride_t=H * D, dq_stride_h=D,
                dk_stride_t=2 * D, dk_stride_h=D, dv_stride_t=2 * D, dv_stride_h=D,
                max_seqlen_q=6, max_seqlen_k=7, scale=0.125, causal=False, dtype=2, stream=0)
    args.update(overrides)
    return args


COMMON_BAD = [
    (dict(dtype=3), r"dtype must be"),
    (dict(dtype=-1), r"dtype must be"),
    (dict(batch=-1), r"batch must be in"),
    (dict(total_q=-1), r"total_q must be in"),
    (dict(total_k=2 ** 31), r"total_k must be in"),
    (dict(batch=0), r"batch is 0 but total_q=10"),
    (dict(H=0), r"\bH must be in"),
    (dict(H_kv=0), r"H_kv must be in"),
    (dict(H_kv=8), r"H_kv must be in"),
    (dict(H=6, H_kv=4), r"H_kv must divide H"),
    (dict(D=0), r"\bD must be in \[1, 256\]"),
    (dict(D=257), r"\bD must be in \[1, 256\]"),
    (dict(max_seqlen_q=-1), r"max_seqlen_q must be in"),
    (dict(max_seqlen_k=2 ** 31), r"max_seqlen_k must be in"),
    (dict(scale=float("nan")), r"scale must be finite"),
    (dict(scale=float("inf")), r"scale must be finite"),
    (dict(q=0), r"\bq must be a non-null"),
    (dict(k=0), r"\bk must be a non-null"),
    (dict(v=(3 << 20) + 1), r"\bv \(\d+\) is not aligned"),
    (dict(lse=0), r"\blse must be a non-null"),
    (dict(lse=(5 << 20) + 2), r"\blse \(\d+\) is not aligned"),
    (dict(cu_seqlens_q=0), r"cu_seqlens_q must be a non-null"),
    (dict(cu_seqlens_k=(7 << 20) + 2), r"cu_seqlens_k \(\d+\) is not aligned"),
    (dict(q_stride_t=-1), r"q_stride_t must be >= 0"),
    (dict(k_stride_h=-64), r"k_stride_h must be >= 0"),
]

FWD_BAD = COMMON_BAD + [
    (dict(out=0), r"\bout must be a non-null"),
    (dict(out_stride_h=32), r"out_stride_h \(32\) makes elements of out overlap"),
    (dict(out_stride_t=64), r"out_stride_t \(64\) makes elements of out overlap"),
    (dict(out_stride_h=0), r"out_stride_h \(0\) makes elements of out overlap"),
]

BWD_BAD = COMMON_BAD + [
    (dict(dout=0), r"\bdout must be a non-null"),
    (dict(out=0), r"\bout must be a non-null"),
    (dict(dq=0), r"\bdq must be a non-null"),
    (dict(dk=0), r"\bdk must be a non-null"),
    (dict(dv=(11 << 20) + 1), r"\bdv \(\d+\) is not aligned"),
    (dict(workspace=0), r"workspace must be a non-null"),
    (dict(dout_stride_h=-1), r"dout_stride_h must be >= 0"),
    (dict(dq_stride_t=100), r"dq_stride_t \(100\) makes elements of dq overlap"),
    (dict(dk_stride_h=1), r"dk_stride_h \(1\) makes elements of dk overlap"),
    (dict(dv_stride_t=0), r"dv_stride_t \(0\) makes elements of dv overlap"),
]


@needs_ext
@pytest.mark.parametrize("overrides,match", FWD_BAD, ids=[m for _, m in FWD_BAD])
def test_fwd_bad_arguments_raise_value_error(overrides, match):
    with pytest.raises(ValueError, match=r"asvit_kernels\._C\.varlen_attention_fwd: .*" + match):
        C.varlen_attention_fwd(**fwd_args(**overrides))


@needs_ext
@pytest.mark.parametrize("overrides,match", BWD_BAD, ids=[m for _, m in BWD_BAD])
def test_bwd_bad_arguments_raise_value_error(overrides, match):
    with pytest.raises(ValueError, match=r"asvit_kernels\._C\.varlen_attention_bwd: .*" + match):
        C.varlen_attention_bwd(**bwd_args(**overrides))


@needs_ext
@needs_no_device
def test_valid_layouts_pass_validation():
    # Head-major (H, T, D) outputs, padded rows and a single head are valid, non-overlapping layouts;
    # inputs may broadcast (stride 0). Validation passes, so the call stops at the device check.
    T, H, D = 10, 4, 64
    good = [
        dict(out_stride_t=D, out_stride_h=T * D),
        dict(out_stride_t=H * D + 8, out_stride_h=D + 2),
        dict(H=1, H_kv=1, out_stride_h=0, out_stride_t=D),
        dict(q_stride_t=0, k_stride_h=0),
    ]
    for overrides in good:
        with pytest.raises(RuntimeError, match="no CUDA device"):
            C.varlen_attention_fwd(**fwd_args(**overrides))
    with pytest.raises(RuntimeError, match="no CUDA device"):
        C.varlen_attention_bwd(**bwd_args(dk_stride_t=64, dk_stride_h=12 * 64,
                                          dv_stride_t=64, dv_stride_h=12 * 64 + 64))


@needs_ext
def test_workspace_numel():
    assert C.varlen_attention_bwd_workspace_numel(1, 0) == 0
    assert C.varlen_attention_bwd_workspace_numel(12, 4099) == 12 * 4099
    assert C.varlen_attention_bwd_workspace_numel(16, 2 ** 31 - 1) == 16 * (2 ** 31 - 1)
    with pytest.raises(ValueError, match=r"\bH must be in"):
        C.varlen_attention_bwd_workspace_numel(0, 8)
    with pytest.raises(ValueError, match="total_q must be in"):
        C.varlen_attention_bwd_workspace_numel(2, -1)


@needs_ext
def test_empty_problems_are_no_ops():
    # Nothing to write, nothing launched: holds with or without a GPU (pointers 0 are fine then).
    C.varlen_attention_fwd(**fwd_args(total_q=0, q=0, out=0, lse=0))
    C.varlen_attention_fwd(**fwd_args(batch=0, total_q=0, total_k=0, q=0, k=0, v=0, out=0, lse=0,
                                      cu_seqlens_q=0, cu_seqlens_k=0))
    C.varlen_attention_bwd(**bwd_args(total_q=0, total_k=0, q=0, k=0, v=0, out=0, lse=0, dout=0,
                                      dq=0, dk=0, dv=0, workspace=0))


@needs_ext
@needs_no_device
def test_no_device_raises_runtime_error():
    with pytest.raises(RuntimeError, match=r"asvit_kernels\._C: no CUDA device is available "
                                           r"\(cudaGetDeviceCount returned .+\)"):
        C.varlen_attention_fwd(**fwd_args())
    with pytest.raises(RuntimeError, match="no CUDA device"):
        C.varlen_attention_bwd(**bwd_args())
    # keys without queries still need dk = dv = 0 written: not a no-op
    with pytest.raises(RuntimeError, match="no CUDA device"):
        C.varlen_attention_bwd(**bwd_args(total_q=0, q=0, out=0, lse=0, dout=0, dq=0, workspace=0))
    assert C.device_count() == 0


# ------------------------------------------------------------------------------------------------
# GPU: numerics against a float64 per-sequence reference
# ------------------------------------------------------------------------------------------------
def _reference(q, k, v, dout, lens_q, lens_k, scale, causal):
    """float64 out, lse (H, total_q) and dq, dk, dv, one sequence at a time. Rows without an allowed
    key: out = 0, lse = -inf, no gradient."""
    import torch
    H, H_kv = q.shape[1], k.shape[1]
    qd, kd, vd = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    outs, lses = [], []
    q0 = k0 = 0
    for lq, lk in zip(lens_q, lens_k):
        qs = qd[q0:q0 + lq].transpose(0, 1)                                          # (H, lq, D)
        ks = kd[k0:k0 + lk].transpose(0, 1).repeat_interleave(H // H_kv, dim=0)      # (H, lk, D)
        vs = vd[k0:k0 + lk].transpose(0, 1).repeat_interleave(H // H_kv, dim=0)
        s = scale * qs @ ks.transpose(1, 2)                                          # (H, lq, lk)
        i = torch.arange(lq, device=q.device)[:, None]
        j = torch.arange(lk, device=q.device)[None, :]
        allowed = (j <= i + (lk - lq)) if causal else torch.ones(lq, lk, dtype=torch.bool, device=q.device)
        s = s.masked_fill(~allowed, float("-inf"))
        m = s.amax(-1, keepdim=True).detach() if lk > 0 else s.new_zeros(H, lq, 1)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        e = torch.exp(s - m)
        l = e.sum(-1, keepdim=True)
        p = e / torch.where(l > 0, l, torch.ones_like(l))
        outs.append((p @ vs).transpose(0, 1))
        lses.append((m + torch.log(l)).squeeze(-1))
        q0, k0 = q0 + lq, k0 + lk
    out = torch.cat(outs, 0)
    lse = torch.cat(lses, 1)
    out.backward(dout.double())
    return out.detach(), lse.detach(), qd.grad, kd.grad, vd.grad


def _rel(got, ref):
    import torch
    got = got.double()
    assert torch.isfinite(got).all(), "non-finite values (an element left unwritten?)"
    return (got - ref).abs().max().item() / max(ref.abs().max().item(), 1.0)


def _make(lens_q, lens_k, H, H_kv, D, dtype, seed, packed_qkv=False):
    import torch
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = torch.device("cuda")
    tq, tk = sum(lens_q), sum(lens_k)
    if packed_qkv:  # q is a strided view into a (T, 3, H, D) projection output, as in a ViT block
        assert tq == tk and H == H_kv
        qkv = torch.randn(tq, 3, H, D, device=dev, dtype=dtype, generator=g)
        q, k, v = qkv.unbind(1)
    else:
        q = torch.randn(tq, H, D, device=dev, dtype=dtype, generator=g)
        # k/v head-major in memory: (H_kv, T, D) transposed to (T, H_kv, D)
        k = torch.randn(H_kv, tk, D, device=dev, dtype=dtype, generator=g).transpose(0, 1)
        v = torch.randn(tk, H_kv, D + 3, device=dev, dtype=dtype, generator=g)[..., :D]
    dout = torch.randn(tq, H, D, device=dev, dtype=dtype, generator=g)

    def cu(lens):
        return torch.tensor([0, *itertools.accumulate(lens)], device=dev, dtype=torch.int32)

    return q, k, v, dout, cu(lens_q), cu(lens_k)


TOL = {"float32": 5e-5, "float16": 4e-3, "bfloat16": 3e-2}
LENS = [  # (lens_q, lens_k): empty and single-token sequences, len_q != len_k, several tiles
    ([5, 0, 1, 70, 33, 130], [5, 3, 0, 70, 40, 97]),
    ([1, 64, 17, 0], [1, 200, 16, 9]),
]


def _check(lens_q, lens_k, H, H_kv, D, dtype_name, causal, seed, max_q=None, max_k=None,
           packed_qkv=False):
    import torch
    from asvit_kernels.cuda_backend import attention
    dtype = getattr(torch, dtype_name)
    q, k, v, dout, cu_q, cu_k = _make(lens_q, lens_k, H, H_kv, D, dtype, seed, packed_qkv)
    scale = 1.0 / math.sqrt(D)
    max_q = max(lens_q) if max_q is None else max_q
    max_k = max(lens_k) if max_k is None else max_k
    out, lse = attention.varlen_forward(q, k, v, cu_q, cu_k, max_q, max_k, scale, causal)
    dq, dk, dv = attention.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, scale,
                                           causal)
    out_r, lse_r, dq_r, dk_r, dv_r = _reference(q, k, v, dout, lens_q, lens_k, scale, causal)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == (H, sum(lens_q)) and lse.dtype == torch.float32
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == k.shape
    no_key = torch.isinf(lse_r)
    assert torch.equal(torch.isinf(lse), no_key) and (lse[no_key] < 0).all(), "-inf lse rows differ"
    assert _rel(lse[~no_key], lse_r[~no_key]) <= 1e-5
    tol = TOL[dtype_name]
    for name, got, ref, t in (("out", out, out_r, tol), ("dq", dq, dq_r, 2 * tol),
                              ("dk", dk, dk_r, 2 * tol), ("dv", dv, dv_r, 2 * tol)):
        err = _rel(got, ref)
        assert err <= t, f"{name}: max error {err:.3g} (relative to max |ref|) > {t}"
    return q, k, v, dout, cu_q, cu_k, out, lse, (dq, dk, dv)


@gpu
@pytest.mark.parametrize("dtype_name", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("D", [8, 45, 64, 80, 160, 256])
def test_gpu_matches_float64(D, causal, dtype_name, poison):
    # `poison` (conftest.py) NaN-fills torch.empty outputs: an element the kernels skip fails.
    for n, (lens_q, lens_k) in enumerate(LENS):
        H, H_kv = (4, 2) if n == 0 else (3, 3)
        _check(lens_q, lens_k, H, H_kv, D, dtype_name, causal, seed=D * 10 + n)


@gpu
@pytest.mark.parametrize("H,H_kv", [(6, 1), (6, 3), (8, 8)])
def test_gpu_gqa_and_packed_qkv(H, H_kv, poison):
    lens = [50, 1, 0, 129]
    _check(lens, lens, H, H_kv, 64, "float16", True, seed=H * 7 + H_kv)
    if H == H_kv:
        _check(lens, lens, H, H_kv, 64, "bfloat16", False, seed=3, packed_qkv=True)


@gpu
def test_gpu_result_does_not_depend_on_max_seqlen(poison):
    # max_seqlen only sizes the grid; the kernels loop over what does not fit.
    _check([70, 20, 0, 5], [64, 35, 4, 0], 4, 2, 64, "float32", True, seed=11, max_q=0, max_k=1)


@gpu
def test_gpu_backward_is_deterministic(poison):
    import torch
    from asvit_kernels.cuda_backend import attention
    lens = [300, 7, 129]
    q, k, v, dout, cu_q, cu_k, out, lse, grads = _check(lens, lens, 8, 2, 64, "float32", True, seed=5)
    for _ in range(3):
        again = attention.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max(lens), max(lens),
                                          1 / 8, True)
        for a, b in zip(grads, again):
            assert torch.equal(a, b)


@gpu
def test_gpu_empty_and_keyless_batches(poison):
    import torch
    from asvit_kernels.cuda_backend import attention
    # no keys at all: out = 0, lse = -inf, dq = 0; and keys without queries: dk = dv = 0
    dev = torch.device("cuda")
    q = torch.randn(5, 2, 16, device=dev)
    k = torch.empty(0, 2, 16, device=dev)
    cu_q = torch.tensor([0, 2, 5], device=dev, dtype=torch.int32)
    cu_k = torch.zeros(3, device=dev, dtype=torch.int32)
    out, lse = attention.varlen_forward(q, k, k, cu_q, cu_k, 3, 0, 0.25, False)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()
    dq, dk, dv = attention.varlen_backward(torch.randn_like(q), q, k, k, out, lse, cu_q, cu_k, 3, 0,
                                           0.25, False)
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.shape == (0, 2, 16)
    k = torch.randn(4, 2, 16, device=dev)
    q = torch.empty(0, 2, 16, device=dev)
    cu_q = torch.zeros(2, device=dev, dtype=torch.int32)
    cu_k = torch.tensor([0, 4], device=dev, dtype=torch.int32)
    out, lse = attention.varlen_forward(q, k, k, cu_q, cu_k, 0, 4, 0.25, True)
    dq, dk, dv = attention.varlen_backward(q, q, k, k, out, lse, cu_q, cu_k, 0, 4, 0.25, True)
    assert torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


# ------------------------------------------------------------------------------------------------
# GPU: the tensor-core paths (fp16 WMMA from sm_70, bf16 and tf32 from sm_80) and the fp32 FMA path
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def tf32(request):
    """Sets torch.backends.cuda.matmul.allow_tf32 to the test's parameter, restores it after."""
    import torch
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = request.param
    yield request.param
    torch.backends.cuda.matmul.allow_tf32 = before


# tf32 keeps 10 mantissa bits (unit roundoff ~4.9e-4) in every tile product, P and dS included
TF32_TOL = 1e-3


@gpu
@pytest.mark.parametrize("tf32", [False, True], ids=["fp32-fma", "tf32"], indirect=True)
@pytest.mark.parametrize("D", [16, 45, 128, 160, 256])
def test_gpu_fp32_with_and_without_tf32(D, tf32, poison, monkeypatch):
    # tf32 on: sm_80+ run tf32 WMMA (fwd at every D, backward up to 128) within TF32_TOL; off: the
    # FMA path, which must keep fp32 accuracy even though the flag is only a hint elsewhere.
    import torch
    if tf32 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("tf32 needs sm_80")
    if tf32:
        monkeypatch.setitem(TOL, "float32", TF32_TOL)
    for n, (lens_q, lens_k) in enumerate(LENS):
        _check(lens_q, lens_k, 4, 2, D, "float32", n == 0, seed=D * 3 + n)


@gpu
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("D", [1, 32, 33, 96, 128, 200])
def test_gpu_tensor_core_tiles_all_head_dims(D, dtype_name, poison):
    # every padded width (32, 64, 128, 256) and ragged D, where the WMMA K loop runs to D rounded up
    # to 16 over zero padding
    _check([3, 100, 16, 47], [3, 90, 33, 47], 6, 2, D, dtype_name, True, seed=D)


@gpu
@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float32"])
def test_gpu_nonfinite_reaches_only_the_rows_that_see_it(dtype_name, poison):
    # A NaN in key 5 of sequence 0 (causal, len 40) and an inf in v of key 9: only sequence 0's
    # queries >= 5 (resp. >= 9) may turn non-finite, in out and dq; dk/dv only for the keys those
    # queries' gradients reach (all of sequence 0's keys <= their row). Sequence 1 stays finite.
    import torch
    from asvit_kernels.cuda_backend import attention
    dtype = getattr(torch, dtype_name)
    lens = [40, 70]
    q, k, v, dout, cu_q, cu_k = _make(lens, lens, 2, 2, 64, dtype, seed=9)
    k = k.clone()
    v = v.clone()
    k[5, 0, 3] = float("nan")
    v[9, 1, 7] = float("inf")
    out, lse = attention.varlen_forward(q, k, v, cu_q, cu_k, 70, 70, 0.125, True)
    dq, dk, dv = attention.varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, 70, 70, 0.125, True)
    assert torch.isfinite(out[40:]).all() and torch.isfinite(dq[40:]).all()
    assert torch.isfinite(dk[40:]).all() and torch.isfinite(dv[40:]).all()
    assert torch.isfinite(out[:5, 0]).all() and torch.isfinite(lse[0, :5]).all()
    assert torch.isfinite(out[:9, 1]).all() and torch.isfinite(dq[:5, 0]).all()
    assert not torch.isfinite(out[5:40, 0]).all(dim=-1).any(), "rows that see the NaN key"
