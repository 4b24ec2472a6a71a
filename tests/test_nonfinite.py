"""Non-finite inputs of varlen attention: a sequence's outputs and gradients depend only on its own
q/k/v, so NaN/inf planted in one sequence of a packed batch leaves every other sequence finite and
equal to the clean run, and inside the poisoned sequence exactly the (token, head) rows that the
float64 reference makes non-finite are non-finite (never hidden as zeros, never leaking to rows
that do not see the value, e.g. earlier rows under causal)."""
import pytest
import torch

import asvit_kernels as ak
from asvit_kernels import reference

from _util import cases

# Several sequences share one packed query tile (32 rows on CPU, 64 on GPU); sequence 1 is poisoned.
LENS = [23, 6, 30, 49, 9]
POISONED = 1
H, H_KV, D = 4, 2, 16


def _inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    total = sum(LENS)
    q = torch.randn(total, H, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(total, H_KV, D, generator=g, dtype=torch.float64) for _ in range(2))
    dy = torch.randn(total, H, D, generator=g, dtype=torch.float64)
    return q, k, v, dy


def _plant(q, k, v, which: str, bad: float):
    """Copies with ``bad`` at one element of sequence POISONED (a middle token, kv head 1)."""
    q, k, v = q.clone(), k.clone(), v.clone()
    start = sum(LENS[:POISONED])
    t = start + LENS[POISONED] // 2
    {"q": q, "k": k, "v": v}[which][t, H - 1 if which == "q" else 1, 3] = bad
    return q, k, v


def _run(fn, q, k, v, dy, upstream: str, dtype, device):
    """out, dq, dk, dv of fn; ``upstream="out"`` backpropagates d(sum out^2 / 2), so the output
    gradient is non-finite wherever the output is."""
    leaves = [t.to(device, dtype).clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    grad = out.detach() if upstream == "out" else dy.to(device, dtype)
    out.backward(grad)
    return [t.detach().double().cpu() for t in [out] + [x.grad for x in leaves]]


def _bad_rows(t: torch.Tensor) -> torch.Tensor:
    """(tokens, heads) bool: rows holding a non-finite element."""
    return ~torch.isfinite(t).all(-1)


@pytest.mark.parametrize("device,backend", cases("varlen_attention"))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("upstream", ["random", "out"])
def test_nonfinite_stays_in_its_sequence(device, backend, causal, which, bad, upstream, poison):
    q, k, v, dy = _inputs(7)
    pq, pk, pv = _plant(q, k, v, which, bad)
    cu = ak.cu_seqlens_from_lengths(LENS).to(device)
    dtype = torch.float32
    op = lambda a, b, c: ak.varlen_attention(a, b, c, cu, causal=causal, backend=backend)  # noqa: E731
    ref = lambda a, b, c: reference.varlen_attention(a, b, c, cu.cpu(), causal=causal)   # noqa: E731
    clean = _run(op, q, k, v, dy, upstream, dtype, device)
    got = _run(op, pq, pk, pv, dy, upstream, dtype, device)
    want = _run(ref, pq, pk, pv, dy, upstream, torch.float64, "cpu")
    assert torch.isfinite(torch.cat([t.flatten() for t in clean])).all(), "the clean run is not finite"
    lo, hi = sum(LENS[:POISONED]), sum(LENS[:POISONED + 1])
    other = torch.ones(sum(LENS), dtype=torch.bool)
    other[lo:hi] = False
    assert _bad_rows(want[0]).any(), "the planted value reaches no output row: the test would prove nothing"
    for name, g, c, w in zip(["out", "dq", "dk", "dv"], got, clean, want):
        assert torch.isfinite(g[other]).all(), f"{name}: non-finite rows leak into other sequences"
        assert torch.equal(g[other], c[other]), f"{name}: other sequences differ from the clean run"
        rows, want_rows = _bad_rows(g[lo:hi]), _bad_rows(w[lo:hi])
        assert torch.equal(rows, want_rows), (
            f"{name}: non-finite (token, head) rows of the poisoned sequence\n{rows.int()}\n"
            f"differ from the reference's\n{want_rows.int()}")


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_nonfinite_under_torch_func(which):
    """The composite form that runs under torch.func transforms follows the same rule."""
    q, k, v, _ = _inputs(3)
    pq, pk, pv = _plant(q, k, v, which, float("nan"))
    cu = ak.cu_seqlens_from_lengths(LENS)

    def f(a, b, c):
        return ak.varlen_attention(a, b, c, cu, causal=True, backend="torch")

    got = torch.func.vmap(f)(pq[None].float(), pk[None].float(), pv[None].float())[0].double()
    want = reference.varlen_attention(pq, pk, pv, cu, causal=True)
    assert _bad_rows(want).any()
    assert torch.equal(_bad_rows(got), _bad_rows(want))
    assert torch.allclose(got.nan_to_num(7.0), want.nan_to_num(7.0), rtol=1e-4, atol=1e-5)


def test_rows_that_see_no_key_stay_zero():
    """Causal with len_k < len_q: rows 0-3 see no key and return exact zeros, row 4 sees key 0
    only and stays finite, row 5 sees the NaN in key 1's value."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(6, 1, 8, generator=g)
    k, v = torch.randn(2, 1, 8, generator=g), torch.randn(2, 1, 8, generator=g)
    v[1, 0, 0] = float("nan")
    cu_q, cu_k = ak.cu_seqlens_from_lengths([6]), ak.cu_seqlens_from_lengths([2])
    for backend in ("torch", "triton"):
        out = ak.varlen_attention(q, k, v, cu_q, cu_k, causal=True, backend=backend)
        assert torch.equal(out[:4], torch.zeros(4, 1, 8)), backend
        assert torch.isfinite(out[4]).all(), backend  # row 4 sees key 0 only
        assert not torch.isfinite(out[5, 0, 0]) and torch.isfinite(out[5, 0, 1:]).all(), backend


@pytest.mark.parametrize("lens", [[20, 20, 20], LENS], ids=["equal", "mixed"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_output_gradient_with_finite_inputs(lens, causal, bad):
    """The torch backend's forward found q, k, v finite, so its backward checks only the output
    gradient: a NaN/inf in row i of it reaches exactly dq_i and the dk_j, dv_j of the keys j that
    row i sees (in its heads' kv head), and no other sequence. Expected rows come from that
    definition: the float64 reference's plain p @ v leaks 0 * NaN into unseen keys' dv here (its
    pairwise form runs only for non-finite q, k, v)."""
    g = torch.Generator().manual_seed(5)
    total = sum(lens)
    q = torch.randn(total, H, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(total, H_KV, D, generator=g, dtype=torch.float64) for _ in range(2))
    dy = torch.randn(total, H, D, generator=g, dtype=torch.float64)
    lo, hi = sum(lens[:1]), sum(lens[:2])
    row, head = lo + lens[1] // 2, 1
    dy_bad = dy.clone()
    dy_bad[row, head, 2] = bad
    cu = ak.cu_seqlens_from_lengths(lens)
    op = lambda a, b, c: ak.varlen_attention(a, b, c, cu, causal=causal, backend="torch")  # noqa: E731
    clean = _run(op, q, k, v, dy, "random", torch.float32, "cpu")
    got = _run(op, q, k, v, dy_bad, "random", torch.float32, "cpu")
    want_dq = torch.zeros(total, H, dtype=torch.bool)
    want_dq[row, head] = True
    want_kv = torch.zeros(total, H_KV, dtype=torch.bool)
    last_seen = row if causal else hi - 1
    want_kv[lo:last_seen + 1, head // (H // H_KV)] = True
    other = torch.ones(total, dtype=torch.bool)
    other[lo:hi] = False
    for name, gt, c, w in zip(["dq", "dk", "dv"], got[1:], clean[1:], [want_dq, want_kv, want_kv]):
        # A group holding the NaN runs the exact path, so other sequences of it match the clean
        # (kernel) run to rounding, not bitwise.
        assert torch.isfinite(gt[other]).all(), f"{name}: non-finite rows leak into other sequences"
        assert torch.allclose(gt[other], c[other], rtol=1e-5, atol=1e-5), f"{name}: other sequences changed"
        assert torch.equal(_bad_rows(gt), w), f"{name}: non-finite rows {_bad_rows(gt).nonzero().tolist()}"


def test_backward_skips_the_input_check_only_after_a_finite_forward(monkeypatch):
    """``inputs_finite`` reaches the torch backward exactly when the forward found q, k, v finite."""
    from asvit_kernels.torch_backend import attention as tb
    seen = []
    real = tb.varlen_backward

    def spy(*args, **kw):
        seen.append(kw.get("inputs_finite", False))
        return real(*args, **kw)
    monkeypatch.setattr(tb, "varlen_backward", spy)
    q, k, v, dy = (t.float() for t in _inputs(2))
    cu = ak.cu_seqlens_from_lengths(LENS)
    for planted in (False, True):
        leaves = [t.clone().requires_grad_() for t in (_plant(q, k, v, "k", float("nan")) if planted else (q, k, v))]
        ak.varlen_attention(*leaves, cu, backend="torch").backward(dy)
    assert seen == [True, False]


def _unbound(x: torch.Tensor):
    """q, k, v as the three strided views of one (T, 3, H, D) qkv tensor, as a qkv projection
    leaves them: the torch backend then reads their shared base once for its finiteness check."""
    return x.unbind(1)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("which", [0, 1, 2], ids=["q", "k", "v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_nonfinite_in_views_of_one_qkv_tensor(causal, which, bad):
    """A NaN/inf in one of q, k, v unbound from one qkv tensor is found by the read of their base:
    the non-finite rows of out and of the base's gradient are the float64 reference's."""
    from asvit_kernels.torch_backend import attention as tb
    lens = [20, 20, 20]
    cu = ak.cu_seqlens_from_lengths(lens)
    g = torch.Generator().manual_seed(3)
    base = torch.randn(sum(lens), 3, H, D, generator=g, dtype=torch.float64)
    dy = torch.randn(sum(lens), H, D, generator=g, dtype=torch.float64)
    base[25, which, 1, 3] = bad
    assert [tuple(t.shape) for t in tb._to_read(_unbound(base.float()))] == [tuple(base.shape)]
    got, want = [], []
    for fn, dtype in ((lambda *t: ak.varlen_attention(*t, cu, causal=causal, backend="torch"), torch.float32),
                      (lambda *t: reference.varlen_attention(*t, cu, causal=causal), torch.float64)):
        leaf = base.to(dtype).clone().requires_grad_()
        out = fn(*_unbound(leaf))
        out.backward(dy.to(dtype))
        (got if dtype == torch.float32 else want).append((out.detach(), leaf.grad))
    (out, grad), (out_ref, grad_ref) = got[0], want[0]
    assert _bad_rows(out_ref).any(), "the planted value reaches no output row: the test would prove nothing"
    assert torch.equal(_bad_rows(out), _bad_rows(out_ref))
    assert torch.equal(~torch.isfinite(grad), ~torch.isfinite(grad_ref))
    fine = torch.isfinite(out_ref)
    assert torch.allclose(out[fine].double(), out_ref[fine], rtol=1e-5, atol=1e-5)


def test_views_of_a_wider_base_are_read_themselves():
    """A NaN in a part of the base that q, k, v do not address changes nothing: a base larger than
    the views together is not read (and were it read, the exact path would give the same rows)."""
    from asvit_kernels.torch_backend import attention as tb
    lens = [20, 20]
    cu = ak.cu_seqlens_from_lengths(lens)
    g = torch.Generator().manual_seed(4)
    wide = torch.randn(sum(lens), 4, H, D, generator=g)
    q, k, v, spare = wide.unbind(1)
    assert [t.shape for t in tb._to_read((q, k, v))] == [q.shape] * 3
    clean = ak.varlen_attention(q, k, v, cu, backend="torch")
    wide[:, 3] = float("nan")
    out = ak.varlen_attention(q, k, v, cu, backend="torch")
    assert torch.equal(out, clean)
    want = reference.varlen_attention(q.double(), k.double(), v.double(), cu)
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-6)
    # q and k the same view: the three cover the base's size but not part 2, so a NaN there
    # says "not finite" (the base is read) and costs only the exact path; the rows stay exact.
    base = torch.randn(sum(lens), 3, H, D, generator=g)
    q, v = base[:, 0], base[:, 1]
    assert [t.shape for t in tb._to_read((q, q, v))] == [base.shape]
    clean = ak.varlen_attention(q, q, v, cu, backend="torch")
    base[:, 2] = float("nan")
    out = ak.varlen_attention(q, q, v, cu, backend="torch")
    assert torch.isfinite(out).all()
    want = reference.varlen_attention(q.double(), q.double(), v.double(), cu)
    assert torch.allclose(out.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.allclose(out, clean, rtol=1e-5, atol=1e-6)


def _spy_reads(monkeypatch):
    """The storage pointers of every tensor the torch backend's finiteness check reads."""
    from asvit_kernels.torch_backend import attention as tb
    reads, real = [], tb._finite

    def spy(*ts):
        reads.extend(t.untyped_storage().data_ptr() for t in ts)
        return real(*ts)
    monkeypatch.setattr(tb, "_finite", spy)
    return reads


def test_full_attention_reads_only_q_and_k(monkeypatch):
    """Where every query sees every key, the check reads q and k only, forward and backward, and
    NaN/inf in v or in the output gradient reach exactly the float64 reference's elements of out,
    dq, dk and dv: random plantings over equal, mixed and cross-attention lengths, GQA included.
    The kernel runs on them (no exact-path fallback), so a kernel that hid or leaked one fails."""
    import random
    reads = _spy_reads(monkeypatch)
    rng = random.Random(11)
    for trial in range(60):
        n = rng.randint(1, 4)
        lens_q = [rng.choice([rng.randint(1, 40), 17]) for _ in range(n)]
        lens_k = lens_q if trial % 3 else [rng.randint(1, 40) for _ in range(n)]
        H_kv = rng.choice([1, 2])
        H_, D_ = H_kv * rng.choice([1, 2]), rng.choice([3, 16, 45])
        g = torch.Generator().manual_seed(trial)
        q = torch.randn(sum(lens_q), H_, D_, generator=g, dtype=torch.float64)
        k, v = (torch.randn(sum(lens_k), H_kv, D_, generator=g, dtype=torch.float64) for _ in range(2))
        dy = torch.randn(sum(lens_q), H_, D_, generator=g, dtype=torch.float64)
        for t in ((v,), (dy,), (v, dy))[trial % 3]:
            for _ in range(rng.choice([1, 1, 3])):
                t[tuple(rng.randrange(s) for s in t.shape)] = rng.choice([float("nan"), float("inf"), float("-inf")])
        cu_q, cu_k = ak.cu_seqlens_from_lengths(lens_q), ak.cu_seqlens_from_lengths(lens_k)
        got = _run(lambda a, b, c: ak.varlen_attention(a, b, c, cu_q, cu_k, backend="torch"), q, k, v, dy,
                   "random", torch.float32, "cpu")
        want = _run(lambda a, b, c: reference.varlen_attention(a, b, c, cu_q, cu_k), q, k, v, dy,
                    "random", torch.float64, "cpu")
        for name, a, b in zip(["out", "dq", "dk", "dv"], got, want):
            assert torch.equal(~torch.isfinite(a), ~torch.isfinite(b)), f"trial {trial}: {name}"
            fine = torch.isfinite(b)
            assert torch.allclose(a[fine], b[fine], rtol=1e-4, atol=1e-5), f"trial {trial}: {name} values"
    assert reads, "the check never ran"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_check_reads_v_and_the_output_gradient_only_where_keys_are_masked(monkeypatch, causal):
    reads = _spy_reads(monkeypatch)
    q, k, v, dy = (t.float() for t in _inputs(8))
    cu = ak.cu_seqlens_from_lengths(LENS)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = ak.varlen_attention(*leaves, cu, causal=causal, backend="torch")
    out.backward(dy)
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert ptr(leaves[0]) in reads and ptr(leaves[1]) in reads
    assert (ptr(leaves[2]) in reads) == causal and (ptr(dy) in reads) == causal
