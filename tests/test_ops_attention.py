"""varlen_attention / attention on every backend against the float64 reference: random packed
batches (lengths 0 and 1 included), head dims 8..256, causal or not, GQA, forward and gradients.

Low-precision criterion (flash-attn's): a backend's error against float64 may be at most 2x
(forward) / 3x (gradients) the error of the same computation done by PyTorch in that dtype."""
import random

import pytest
import torch

import asvit_kernels as ak
from asvit_kernels import reference

from _util import TOL, cases, dtypes_for, rel_err

HEAD_DIMS = [8, 45, 64, 80, 160, 256]


def random_lengths(rng: random.Random, n: int, hi: int) -> list[int]:
    """n lengths in [0, hi] with a 0, a 1, and one of at least hi // 2 (so no gradient is all
    rounding noise: a sequence of length <= 1 has dq == 0 exactly)."""
    lens = [rng.randint(0, hi) for _ in range(n)]
    slots = rng.sample(range(n), 3)
    lens[slots[0]], lens[slots[1]], lens[slots[2]] = 0, 1, rng.randint(hi // 2, hi)
    return lens


def run(device, backend, dtype, lens_q, lens_k, H, H_kv, D, causal, seed):
    g = torch.Generator().manual_seed(seed)
    cu_q = ak.cu_seqlens_from_lengths(lens_q).to(device)
    cu_k = None if lens_k is None else ak.cu_seqlens_from_lengths(lens_k).to(device)
    tq, tk = sum(lens_q), sum(lens_q if lens_k is None else lens_k)
    q0, k0, v0 = (torch.randn(n, h, D, generator=g, dtype=torch.float64).to(dtype).double()
                  for n, h in ((tq, H), (tk, H_kv), (tk, H_kv)))
    dy0 = torch.randn(tq, H, D, generator=g, dtype=torch.float64).to(dtype).double()
    leaves = [t.detach().to(device, dtype).clone().requires_grad_() for t in (q0, k0, v0)]
    out = ak.varlen_attention(*leaves, cu_q, cu_k, causal=causal, backend=backend)
    out.backward(dy0.to(device, dtype))

    def reference_in(dt):
        ls = [t.detach().to(device, dt).clone().requires_grad_() for t in (q0, k0, v0)]
        o = reference.varlen_attention(*ls, cu_q, cu_k, causal=causal)
        o.backward(dy0.to(device, dt))
        return [o] + [t.grad for t in ls]

    exact = reference_in(torch.float64)
    same = reference_in(dtype) if dtype != torch.float64 else None
    got = [out] + [t.grad for t in leaves]
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        err = rel_err(got[i], exact[i])
        bound = TOL[dtype]
        if same is not None and dtype != torch.float32:
            bound = (2 if name == "out" else 3) * max(rel_err(same[i], exact[i]), 1e-4)
        assert err <= bound, f"{name}: relative error {err:.3g} > {bound:.3g} ({dtype}, D={D}, causal={causal})"


@pytest.mark.parametrize("device,backend", cases("varlen_attention"))
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_matches_reference(device, backend, D, causal, poison):
    rng = random.Random(D * 2 + causal)
    for dtype in dtypes_for(device, backend):
        lens = random_lengths(rng, rng.randint(3, 6), 70)
        run(device, backend, dtype, lens, None, 4, rng.choice([1, 2, 4]), D, causal, rng.randint(0, 999))


@pytest.mark.parametrize("device,backend", cases("varlen_attention"))
@pytest.mark.parametrize("causal", [False, True])
def test_cross_attention_lengths_differ(device, backend, causal, poison):
    """len_q != len_k per sequence, including len_k = 0 (rows see nothing: output 0) and causal
    with len_k < len_q (bottom-right aligned: early rows see nothing)."""
    run(device, backend, torch.float32, [3, 7, 0, 2, 5, 4], [9, 2, 4, 0, 5, 1], 3, 1, 45, causal, 5)


@pytest.mark.parametrize("device,backend", cases("varlen_attention"))
def test_many_short_windows_share_tiles(device, backend, poison):
    """49-token windows: several sequences per tile, kept apart by the in-tile mask."""
    run(device, backend, torch.float32, [49] * 12, None, 2, 2, 32, False, 1)


@pytest.mark.parametrize("device,backend", cases("varlen_attention"))
def test_all_empty_and_single_sequence(device, backend):
    q = torch.randn(0, 2, 8, device=device, requires_grad=True)
    out = ak.varlen_attention(q, q, q, torch.tensor([0, 0, 0], dtype=torch.int32, device=device), backend=backend)
    assert out.shape == (0, 2, 8)
    run(device, backend, torch.float32, [1], None, 1, 1, 1, True, 0)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_long_sequence_on_gpu(backend):
    """A 65536-token sequence against the torch backend in fp32 on the GPU (1 head keeps the
    torch backend's score matrix at 16 GiB)."""
    if ak.backends.why_unavailable(backend, torch.device("cuda")):
        pytest.skip(ak.backends.why_unavailable(backend, torch.device("cuda")))
    torch.manual_seed(0)
    q, k, v = (torch.randn(65536 + 3, 1, 64, device="cuda") for _ in range(3))
    cu = torch.tensor([0, 65536, 65539], dtype=torch.int32, device="cuda")
    got = ak.varlen_attention(q, k, v, cu, backend=backend)
    want = ak.varlen_attention(q.double(), k.double(), v.double(), cu, backend="torch")
    assert rel_err(got, want) <= 1e-4


@pytest.mark.parametrize("device,backend", cases("varlen_attention"))
def test_padded_attention(device, backend, poison):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 20, 16, generator=g).to(device) for _ in range(3))
    lens = [20, 7, 0]
    out = ak.attention(q, k, v, lens, causal=True, backend=backend)
    ref = reference.attention(q.double(), k.double(), v.double(), lens, causal=True)
    assert rel_err(out, ref) <= TOL[torch.float32]
    assert (out[1, :, 7:] == 0).all() and (out[2] == 0).all()
    full = ak.attention(q, k, v, backend=backend)
    assert rel_err(full, torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())) \
        <= TOL[torch.float32]


def test_pack_unpack_round_trip_and_grads():
    x = torch.randn(3, 5, 4, requires_grad=True)
    packed, cu, max_len = ak.pack(x, [5, 0, 2])
    assert packed.shape == (7, 4) and cu.tolist() == [0, 5, 5, 7] and cu.dtype == torch.int32 and max_len == 5
    back = ak.unpack(packed, cu, 5)
    assert torch.equal(back[0], x[0]) and (back[1] == 0).all() and torch.equal(back[2, :2], x[2, :2])
    back.sum().backward()
    assert x.grad[0].eq(1).all() and x.grad[1].eq(0).all() and x.grad[2, 2:].eq(0).all()
    with pytest.raises(ValueError, match="seq_lens"):
        ak.pack(x, [6, 0, 0])
    with pytest.raises(ValueError, match="seq_lens"):
        ak.pack(x, [1, 2])
    with pytest.raises(TypeError, match="seq_lens"):
        ak.pack(x, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="max_len"):
        ak.unpack(packed, cu, 3)


Q = torch.randn(10, 4, 8)
CU = torch.tensor([0, 4, 10], dtype=torch.int32)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(cu_seqlens_q=CU.float()), TypeError, "cu_seqlens_q must be int32"),
    (dict(cu_seqlens_q=CU[None]), ValueError, "cu_seqlens_q must be 1-D"),
    (dict(cu_seqlens_q=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError, "start at 0"),
    (dict(cu_seqlens_q=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError, "non-decreasing"),
    (dict(cu_seqlens_q=torch.tensor([0, 4, 9], dtype=torch.int32)), ValueError, r"cu_seqlens_q\[-1\]"),
    (dict(cu_seqlens_k=torch.tensor([0, 10], dtype=torch.int32)), ValueError, "same length"),
    (dict(q=Q[0]), ValueError, "q must be 3-D"),
    (dict(k=torch.randn(10, 4, 7)), ValueError, "k and v must have the same shape"),
    (dict(k=torch.randn(10, 4, 7), v=torch.randn(10, 4, 7)), ValueError, "head dims differ"),
    (dict(k=torch.randn(10, 3, 8), v=torch.randn(10, 3, 8)), ValueError, "multiple"),
    (dict(q=torch.randn(10, 4, 0), k=torch.randn(10, 4, 0), v=torch.randn(10, 4, 0)), ValueError, "head dim"),
    (dict(q=torch.randn(10, 1, 257), k=torch.randn(10, 1, 257), v=torch.randn(10, 1, 257)), ValueError, "head dim"),
    (dict(q=Q.long(), k=Q.long(), v=Q.long()), TypeError, "q must be float"),
    (dict(v=Q.double()), TypeError, "v is torch.float64"),
    (dict(k=torch.randn(10, 4, 8, device="meta")), ValueError, "k is on meta"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(causal=1), TypeError, "causal"),
    (dict(k=torch.randn(9, 4, 8), v=torch.randn(9, 4, 8)), ValueError, "as many keys as queries"),
    (dict(k=torch.randn(9, 4, 8), v=torch.randn(9, 4, 8), max_seqlen_q=6), ValueError, "as many keys"),
    (dict(max_seqlen_q=-2), TypeError, "max_seqlen_q"),
])
def test_bad_inputs_raise(kwargs, exc, msg):
    args = dict(q=Q, k=Q, v=Q, cu_seqlens_q=CU)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        ak.varlen_attention(**args)


def test_compat_signature_and_unsupported_options():
    from asvit_kernels.compat import flash_attn_varlen_func
    out = flash_attn_varlen_func(Q, Q, Q, CU, CU, 6, 6, 0.0, None, True)
    assert rel_err(out, reference.varlen_attention(Q.double(), Q.double(), Q.double(), CU, CU, causal=True)) \
        <= TOL[torch.float32]
    # window_size, softcap, alibi_slopes, dropout_p: tests/test_attention_features.py, test_compat.py
    with pytest.raises(NotImplementedError, match="block_table"):
        flash_attn_varlen_func(Q, Q, Q, CU, CU, 6, 6, block_table=CU)


def test_opcheck_and_fullgraph_compile():
    q = torch.randn(10, 4, 8, requires_grad=True)
    k, v = torch.randn(10, 2, 8, requires_grad=True), torch.randn(10, 2, 8, requires_grad=True)
    torch.library.opcheck(torch.ops.asvit.varlen_attention.default, (q, k, v, CU, CU, 6, 6, 0.35, True, "torch"))

    def block(x, cu):
        return ak.varlen_attention(x, x, x, cu, cu, 6, 6, causal=False).sum(1)

    torch._dynamo.reset()
    fn = torch.compile(block, fullgraph=True, backend="aot_eager")
    x = torch.randn(10, 4, 8, requires_grad=True)
    y = fn(x, CU)
    y.sum().backward()
    xr = x.detach().double().requires_grad_()
    reference.varlen_attention(xr, xr, xr, CU, CU).sum(1).sum().backward()
    assert rel_err(y, reference.varlen_attention(xr, xr, xr, CU, CU).sum(1)) <= 10 * TOL[torch.float32]
    assert rel_err(x.grad, xr.grad) <= 10 * TOL[torch.float32]


class _LargestOutput(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("flash", [True, False], ids=["flash", "exact"])
@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_memory_is_linear_in_length(causal, flash, monkeypatch):
    """One long sequence: the torch backend's forward and backward hold score blocks of at most
    _SCORE_BUDGET elements (query rows in chunks, exact; the CPU flash kernel holds none), never
    the (N, N) matrix; the result is the reference's."""
    from asvit_kernels.torch_backend import attention as tb
    monkeypatch.setattr(tb, "_SCORE_BUDGET", 1 << 16, raising=False)
    if not flash:
        monkeypatch.setattr(tb, "_FLASH", None)
    N, H, D = 1500, 2, 8
    g = torch.Generator().manual_seed(0)
    q, k, v, dy = (torch.randn(N, H, D, generator=g, dtype=torch.float64) for _ in range(4))
    cu = ak.cu_seqlens_from_lengths([N])
    with _LargestOutput() as seen:
        out, lse = tb.varlen_forward(q, k, v, cu, cu, N, N, D ** -0.5, causal)
        grads = tb.varlen_backward(dy, q, k, v, out, lse, cu, cu, N, N, D ** -0.5, causal)
    assert seen.largest <= max(1 << 16, N * H * D), f"largest intermediate {seen.largest} elements (N^2 = {N * N})"
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want = reference.varlen_attention(*leaves, cu, cu, causal=causal)
    want.backward(dy)
    for name, got, ref in zip(["out", "dq", "dk", "dv"], [out, *grads], [want] + [t.grad for t in leaves]):
        assert rel_err(got, ref) <= TOL[torch.float64], name


# ------------------------------------------------------- torch backend: CPU flash kernel per group

def _flash_calls(monkeypatch):
    """Counts the torch backend's calls of the CPU flash kernel (forward, backward), and the calls
    that took ``full_attention``, whose backward is the kernel's own autograd node (C++, not
    countable here: ``test_full_attention_is_differentiated_by_the_kernels_own_node`` checks it)."""
    from asvit_kernels.torch_backend import attention as tb
    calls = {"fwd": 0, "bwd": 0, "full": 0}
    if tb._FLASH is None:
        pytest.skip("this torch has no aten::_scaled_dot_product_flash_attention_for_cpu")
    fwd, bwd, full = tb._FLASH, tb._FLASH_BWD, tb.full_attention

    def counted(key, fn):
        def call(*a, **kw):
            calls[key] += 1
            return fn(*a, **kw)
        return call

    def full_counted(*a, **kw):
        out = full(*a, **kw)
        calls["full"] += out is not None
        return out
    monkeypatch.setattr(tb, "_FLASH", counted("fwd", fwd))
    monkeypatch.setattr(tb, "_FLASH_BWD", counted("bwd", bwd))
    monkeypatch.setattr(tb, "full_attention", full_counted)
    return calls


def _graph_nodes(t: torch.Tensor) -> set:
    seen, todo = set(), [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            todo.extend(f for f, _ in fn.next_functions)
    return {type(fn).__name__ for fn in seen}


@pytest.mark.parametrize("lens,causal,full", [
    ([49] * 6, False, True),          # windows tiling the rows: the stock-autograd path
    ([197], False, True),             # one image
    ([49] * 6, True, False),          # causal: the backward must read dout (``_reads``)
    ([50, 197, 57] * 2, False, False),  # several groups
])
def test_full_attention_is_differentiated_by_the_kernels_own_node(lens, causal, full):
    """Plain full attention over equal lengths that tile the rows runs the CPU flash kernel under
    PyTorch's own autograd node for it (no Python backward); other calls keep this library's."""
    from asvit_kernels.torch_backend import attention as tb
    if tb._FLASH is None:
        pytest.skip("this torch has no aten::_scaled_dot_product_flash_attention_for_cpu")
    g = torch.Generator().manual_seed(12)
    qkv = torch.randn(sum(lens), 3, 2, 16, generator=g, requires_grad=True)
    cu = ak.cu_seqlens_from_lengths(lens)
    out = ak.varlen_attention(*qkv.unbind(1), cu, causal=causal, backend="torch")
    nodes = _graph_nodes(out)
    assert ("ScaledDotProductFlashAttentionForCpuBackward0" in nodes) == full, nodes
    assert ("_EagerAttentionBackward" in nodes) == (not full), nodes
    dy = torch.randn(out.shape, generator=g)
    out.backward(dy)
    leaf = qkv.detach().double().requires_grad_()
    want = reference.varlen_attention(*leaf.unbind(1), cu, causal=causal)
    want.backward(dy.double())
    assert rel_err(out, want) <= TOL[torch.float32] and rel_err(qkv.grad, leaf.grad) <= TOL[torch.float32]


@pytest.mark.parametrize("lens_q,lens_k", [
    ([49] * 6, None),                        # equal windows: one call on a view of the packed tensor
    ([50, 197, 57] * 2, None),               # evenly spaced equal lengths: strided views
    ([5, 9, 5, 5, 1, 0, 9], None),           # unevenly spaced: gathered
    ([3, 7, 0, 2, 5, 4], [9, 2, 4, 0, 5, 1]),  # len_q != len_k, len_k = 0, query-less sequences
])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("H_kv", [3, 1])
def test_torch_backend_flash_groups_match_reference(lens_q, lens_k, causal, H_kv, monkeypatch, poison):
    """The torch backend runs each group of equal lengths as one CPU flash-kernel call (forward and
    backward) and still equals the float64 reference: head dim 45, GQA, causal bottom-right
    (len_q > len_k: early rows return 0; len_q < len_k: a mask), empty and one-token sequences."""
    calls = _flash_calls(monkeypatch)
    for dtype in (torch.float64, torch.float32):
        run("cpu", "torch", dtype, lens_q, lens_k, 3, H_kv, 45, causal, 3)
    assert calls["fwd"] and (calls["bwd"] or calls["full"])


@pytest.mark.parametrize("causal", [False, True])
def test_torch_backend_exact_path_without_flash(causal, monkeypatch, poison):
    """Without the CPU flash kernel (older torch, other devices) the hand-rolled path serves."""
    from asvit_kernels.torch_backend import attention as tb
    monkeypatch.setattr(tb, "_FLASH", None)
    rng = random.Random(11 + causal)
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        run("cpu", "torch", dtype, random_lengths(rng, 5, 40), None, 4, 2, 45, causal, 4)
    run("cpu", "torch", torch.float32, [3, 7, 0, 2, 5, 4], [9, 2, 4, 0, 5, 1], 3, 1, 16, causal, 5)


def test_torch_backend_repeats_kv_heads_without_native_gqa(monkeypatch, poison):
    """A torch whose flash kernel refuses H_kv < H gets the k/v heads repeated (and their
    gradients summed back)."""
    from asvit_kernels.torch_backend import attention as tb
    calls = _flash_calls(monkeypatch)
    monkeypatch.setattr(tb, "_native_gqa", lambda: False)
    run("cpu", "torch", torch.float64, [7, 12, 7, 0, 1], None, 4, 2, 8, True, 6)
    assert calls["fwd"] and calls["bwd"]


def test_torch_backend_long_causal_cross_attention_falls_back(monkeypatch, poison):
    """Causal len_q < len_k needs an (len_q, len_k) mask: past _SCORE_BUDGET the exact chunked path
    runs instead, with the same result."""
    from asvit_kernels.torch_backend import attention as tb
    calls = _flash_calls(monkeypatch)
    monkeypatch.setattr(tb, "_SCORE_BUDGET", 64)
    run("cpu", "torch", torch.float64, [6, 12], [30, 13], 2, 1, 8, True, 7)
    assert calls["fwd"] == 0 and calls["bwd"] == 0


def test_torch_backend_non_contiguous_inputs(monkeypatch):
    """q, k, v split from one (total, 3, H, D) projection (strided rows) give the same result."""
    calls = _flash_calls(monkeypatch)
    g = torch.Generator().manual_seed(8)
    qkv = torch.randn(30, 3, 2, 16, generator=g, dtype=torch.float64)
    cu = ak.cu_seqlens_from_lengths([10, 20])
    got = ak.varlen_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, causal=True, backend="torch")
    want = reference.varlen_attention(*(qkv[:, i].contiguous() for i in range(3)), cu, causal=True)
    assert rel_err(got, want) <= TOL[torch.float64] and calls["fwd"]
