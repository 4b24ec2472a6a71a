"""Every backend of the elastic ops against the float64 reference: random shapes, random ranges of
every kind (full, first-k, last-k, wrapped, width 1), forward and all gradients."""
import math
import random
import zlib

import pytest
import torch

import asvit_kernels as ak
from asvit_kernels import backends, reference
from asvit_kernels.ranges import channel_indices

from _util import TOL, cases, dtypes_for, rel_err

KINDS = ["full", "first", "last", "wrapped", "one"]


def make_range(kind: str, C: int, rng: random.Random):
    w = rng.randint(2, C - 1)
    return {"full": None, "first": (0, w), "last": (C - w, w),
            "wrapped": (rng.randint(C - w + 1, C - 1), w), "one": (rng.randint(0, C - 1), 1)}[kind]


def width(r, C):
    return C if r is None else r[1]


def leaf(t, dtype):
    return t.detach().to(dtype).clone().requires_grad_()


def check_grads(pairs, dtype, scales=None):
    for name, got, want in pairs:
        err = rel_err(got, want, (scales or {}).get(name, 1e-6))
        assert err <= TOL[dtype], f"{name}: relative error {err:.3g} > {TOL[dtype]:.1g}"


def run_linear(device, backend, dtype, C_out, C_in, in_r, out_r, lead, has_bias, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(*lead, width(in_r, C_in), generator=g, dtype=torch.float64)
    w0 = torch.randn(C_out, C_in, generator=g, dtype=torch.float64) / C_in ** 0.5
    b0 = torch.randn(C_out, generator=g, dtype=torch.float64) if has_bias else None
    # The reference sees exactly the rounded inputs the kernel sees.
    x0, w0 = x0.to(dtype).double(), w0.to(dtype).double()
    b0 = None if b0 is None else b0.to(dtype).double()
    x, w = leaf(x0.to(device), dtype), leaf(w0.to(device), dtype)
    b = None if b0 is None else leaf(b0.to(device), dtype)
    y = ak.elastic_linear(x, w, b, in_r, out_r, backend=backend)
    dy0 = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype).double()
    y.backward(dy0.to(device, dtype))

    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    br = None if b0 is None else b0.clone().requires_grad_()
    yr = reference.elastic_linear(xr, wr, br, in_r, out_r)
    yr.backward(dy0)
    assert y.dtype == dtype and y.device.type == device
    pairs = [("y", y, yr), ("dx", x.grad, xr.grad), ("dweight", w.grad, wr.grad)]
    if b is not None:
        pairs.append(("dbias", b.grad, br.grad))
    check_grads(pairs, dtype)
    # Unused weight rows/columns get an exact zero gradient.
    used = torch.zeros(C_out, C_in, dtype=torch.bool)
    used[channel_indices(out_r, C_out)[:, None], channel_indices(in_r, C_in)[None, :]] = True
    assert (w.grad.cpu()[~used] == 0).all()


@pytest.mark.parametrize("device,backend", cases("elastic_linear"))
@pytest.mark.parametrize("in_kind", KINDS)
@pytest.mark.parametrize("out_kind", KINDS)
def test_elastic_linear_matches_reference(device, backend, in_kind, out_kind, poison):
    rng = random.Random(zlib.crc32(f"{in_kind}-{out_kind}".encode()))
    for dtype in dtypes_for(device, backend):
        C_out, C_in = rng.randint(3, 150), rng.randint(3, 150)
        lead = (rng.randint(1, 3), rng.randint(1, 70))
        in_r, out_r = make_range(in_kind, C_in, rng), make_range(out_kind, C_out, rng)
        run_linear(device, backend, dtype, C_out, C_in, in_r, out_r, lead, rng.random() < 0.7, rng.randint(0, 999))


@pytest.mark.parametrize("device,backend", cases("elastic_linear"))
def test_elastic_linear_concatenated_out_ranges(device, backend, poison):
    """A qkv weight (3C, C) used by a sub-network with fewer channels: its q, k, v row blocks,
    concatenated; the last range wraps past 3C."""
    C = 48
    out_r = [(4, 20), (C, 20), (3 * C - 4, 8)]
    for dtype in dtypes_for(device, backend):
        run_linear(device, backend, dtype, 3 * C, C, (40, 20), out_r, (2, 33), True, 7)


@pytest.mark.parametrize("device,backend", cases("elastic_linear"))
def test_elastic_linear_partial_grads_and_strided_input(device, backend, poison):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 30, generator=g).to(device)
    b = torch.randn(40, generator=g).to(device)
    x = torch.randn(25, 2, 20, generator=g).to(device).transpose(0, 1)  # non-contiguous rows
    ref = reference.elastic_linear(x.double(), w.double(), b.double(), (25, 20), (35, 11))
    # Only the input needs a gradient (a frozen supernet): no weight gradient is computed.
    xg = x.clone().requires_grad_()
    y = ak.elastic_linear(xg, w, b, (25, 20), (35, 11), backend=backend)
    assert rel_err(y, ref) <= TOL[torch.float32]
    y.sum().backward()
    xr = x.double().requires_grad_()
    reference.elastic_linear(xr, w.double(), b.double(), (25, 20), (35, 11)).sum().backward()
    assert rel_err(xg.grad, xr.grad) <= TOL[torch.float32]
    # Only the bias trains.
    bg = b.clone().requires_grad_()
    ak.elastic_linear(x, w, bg, (25, 20), (35, 11), backend=backend).sum().backward()
    expect = torch.zeros(40, dtype=torch.float64)
    expect[channel_indices((35, 11), 40)] = 2 * 25
    assert rel_err(bg.grad, expect) <= TOL[torch.float32]


@pytest.mark.parametrize("device,backend", cases("elastic_linear"))
def test_elastic_linear_empty_batch(device, backend):
    w = torch.randn(8, 6, device=device, requires_grad=True)
    x = torch.randn(0, 4, device=device, requires_grad=True)
    y = ak.elastic_linear(x, w, None, (4, 4), (6, 5), backend=backend)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert w.grad.abs().sum() == 0 and x.grad.shape == (0, 4)


def run_layer_norm(device, backend, dtype, C, r, lead, has_bias, seed):
    g = torch.Generator().manual_seed(seed)
    # A large mean and spread: the variance must not come from E[x^2] - E[x]^2.
    x0 = (torch.randn(*lead, width(r, C), generator=g, dtype=torch.float64) * 3 + 5).to(dtype).double()
    w0 = (1 + torch.randn(C, generator=g, dtype=torch.float64)).to(dtype).double()
    b0 = torch.randn(C, generator=g, dtype=torch.float64).to(dtype).double() if has_bias else None
    x, w = leaf(x0.to(device), dtype), leaf(w0.to(device), dtype)
    b = None if b0 is None else leaf(b0.to(device), dtype)
    y = ak.elastic_layer_norm(x, w, b, r, 1e-5, backend=backend)
    dy0 = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dtype).double()
    y.backward(dy0.to(device, dtype))
    xr, wr = x0.clone().requires_grad_(), w0.clone().requires_grad_()
    br = None if b0 is None else b0.clone().requires_grad_()
    reference.elastic_layer_norm(xr, wr, br, r, 1e-5).backward(dy0)
    yr = reference.elastic_layer_norm(x0, w0, b0, r, 1e-5)
    pairs = [("y", y, yr), ("dx", x.grad, xr.grad), ("dweight", w.grad, wr.grad)]
    if b is not None:
        pairs.append(("dbias", b.grad, br.grad))
    # Widths 1 and 2 have dx == 0 (and width 1 dweight == 0) exactly; rounding leaves noise of the
    # size of the terms that cancel, which is what those errors are measured against.
    rstd = torch.rsqrt(x0.var(-1, correction=0, keepdim=True) + 1e-5)
    check_grads(pairs, dtype, {"dx": (dy0 * rstd).norm().item(), "dweight": dy0.norm().item()})
    unused = torch.ones(C, dtype=torch.bool)
    unused[channel_indices(r, C)] = False
    assert (w.grad.cpu()[unused] == 0).all()


@pytest.mark.parametrize("device,backend", cases("elastic_layer_norm"))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("has_bias", [True, False])
def test_elastic_layer_norm_matches_reference(device, backend, kind, has_bias, poison):
    rng = random.Random(zlib.crc32(f"{kind}-{has_bias}".encode()))
    for dtype in dtypes_for(device, backend):
        C = rng.randint(3, 300)
        lead = (rng.randint(1, 3), rng.randint(1, 90))
        run_layer_norm(device, backend, dtype, C, make_range(kind, C, rng), lead, has_bias, rng.randint(0, 999))


@pytest.mark.parametrize("device,backend", cases("elastic_layer_norm"))
@pytest.mark.parametrize("C", [1, 2, 1000, 4096])
def test_elastic_layer_norm_widths(device, backend, C, poison):
    r = None if C < 3 else (C // 3, C - 5)
    run_layer_norm(device, backend, torch.float32, C, r, (3, 7), True, C)


@pytest.mark.parametrize("device,backend", cases("elastic_layer_norm"))
def test_elastic_layer_norm_many_rows(device, backend, poison):
    """Enough rows that the backward splits its weight-gradient sums over several programs/blocks."""
    run_layer_norm(device, backend, torch.float32, 64, (50, 40), (1500,), True, 11)


# ----------------------------------------------------------------------------- Triton split-K

def _triton_or_skip():
    if backends.why_unavailable("triton", torch.device("cpu")) is not None:
        pytest.skip("Triton (interpreter) unavailable here")
    from asvit_kernels.triton import gather_matmul as gm
    return gm


@pytest.mark.parametrize("split", [1, 2, 3, 5])
@pytest.mark.parametrize("gathered", [False, True])
def test_gather_matmul_split_k_matches_float64(split, gathered, poison):
    """Split-K partials summed in a fixed order: equal to float64 within fp32 rounding, with tables,
    bias and row sums (the weight-gradient epilogue), K not a multiple of the slice."""
    gm = _triton_or_skip()
    g = torch.Generator().manual_seed(split)
    M, N, K, C = 70, 90, 300, 110
    a0 = torch.randn(M, K, generator=g, dtype=torch.float64)
    b0 = torch.randn(K + 7, C, generator=g, dtype=torch.float64)
    bias0 = torch.randn(C, generator=g, dtype=torch.float64)
    bk = torch.randperm(K + 7, generator=g)[:K] if gathered else torch.arange(K)
    bn = torch.randperm(C, generator=g)[:N] if gathered else torch.arange(N)
    cm = torch.randperm(M + 5, generator=g)[:M] if gathered else torch.arange(M)
    cn = torch.randperm(N + 3, generator=g)[:N] if gathered else torch.arange(N)
    tab = (lambda t: t.to(torch.int32)) if gathered else (lambda t: None)
    want = torch.zeros(M + 5, N + 3, dtype=torch.float64)
    want[cm[:, None], cn[None, :]] = a0 @ b0[bk][:, bn] + bias0[bn]
    want_rows = torch.zeros(M + 5, dtype=torch.float64)
    want_rows[cm] = a0.sum(1)
    outs = []
    for _ in range(2):
        c = torch.zeros(M + 5, N + 3)
        rows = torch.zeros(M + 5)
        gm.gather_matmul(a0.float(), b0.float(), c, bk_idx=tab(bk), bn_idx=tab(bn), cm_idx=tab(cm), cn_idx=tab(cn),
                         bias=bias0.float(), rowsum=rows, n=N, k=K, split_k=split)
        assert rel_err(c, want) <= TOL[torch.float32] and rel_err(rows, want_rows) <= TOL[torch.float32]
        outs.append(c)
    assert torch.equal(outs[0], outs[1])  # deterministic: no atomics


def test_split_k_choice():
    gm = _triton_or_skip()
    cfg = gm.matmul_config(768, 384, 12608, torch.bfloat16, 90)
    assert gm.split_k_for(768, 384, 12608, cfg, 132) == 8       # 18 tiles -> 144 programs
    assert gm.split_k_for(768, 384, 200, cfg, 132) == 1         # too little K to split
    big = gm.matmul_config(12608, 1536, 384, torch.bfloat16, 90)
    assert gm.split_k_for(12608, 1536, 384, big, 132) == 1      # the forward fills the SMs
    assert gm.split_k_for(128, 128, 10 ** 6, cfg, 132) == gm.MAX_SPLIT_K


@pytest.mark.parametrize("in_kind,out_kind", [("first", "first"), ("wrapped", "wrapped"), ("full", "one"),
                                              ("last", "multi")])
def test_elastic_linear_triton_split_k(in_kind, out_kind, monkeypatch, poison):
    """Every product of the Triton elastic linear layer with split-K forced on (3 slices)."""
    gm = _triton_or_skip()
    monkeypatch.setattr(gm, "split_k_for", lambda *a: 3)
    rng = random.Random(zlib.crc32(f"split-{in_kind}-{out_kind}".encode()))
    C_out, C_in = 96, 80
    out_r = [(4, 20), (48, 20), (90, 8)] if out_kind == "multi" else make_range(out_kind, C_out, rng)
    for dtype in (torch.float32, torch.float16):
        run_linear("cpu", "triton", dtype, C_out, C_in, make_range(in_kind, C_in, rng), out_r, (2, 90), True, 5)


def test_fp32_precision_follows_allow_tf32():
    gm = _triton_or_skip()
    mm = torch.backends.cuda.matmul
    before = mm.allow_tf32  # a property of torch's cuBLAS module: set and restored by hand
    try:
        mm.allow_tf32 = True
        assert gm._input_precision(torch.float32) == "tf32"
        mm.allow_tf32 = False
        assert gm._input_precision(torch.float32) == "ieee"
        assert gm._input_precision(torch.bfloat16) == "ieee"  # half types: tensor cores whatever the switch
    finally:
        mm.allow_tf32 = before


# ----------------------------------------------------------------------------- CPU fast paths

@pytest.mark.parametrize("gather", [True, False])
def test_torch_linear_multi_run_paths(gather, monkeypatch, poison):
    """Ranges of several runs: one matmul on the gathered block (default) and per-run matmuls on
    views; single-run ranges are dense F.linear on views either way."""
    from asvit_kernels.torch_backend import elastic as tb
    monkeypatch.setattr(tb, "GATHER_PIECES", gather)
    cases = [((40, 20), [(4, 20), (48, 20), (140, 8)]), ((130, 40), (130, 30)), ((0, 30), (0, 60)),
             ((7, 1), (143, 1))]
    for n, (in_r, out_r) in enumerate(cases):
        for dtype in (torch.float32, torch.float64):
            run_linear("cpu", "torch", dtype, 144, 150, in_r, out_r, (3, 41), n % 2 == 0, n)


@pytest.mark.parametrize("device,backend", cases("elastic_linear"))
def test_custom_op_path_matches_reference(device, backend, monkeypatch, poison):
    """The torch.library custom ops (what torch.compile and dispatch modes get) give the same
    results as the eager autograd.Function path the tests above run."""
    from asvit_kernels.ops import elastic as ops_elastic
    monkeypatch.setattr(ops_elastic._transforms, "plain_eager", lambda: False)
    run_linear(device, backend, torch.float32, 96, 80, (60, 40), [(0, 24), (90, 6)], (2, 33), True, 1)
    run_layer_norm(device, backend, torch.float32, 64, (50, 40), (3, 20), True, 2)


def test_eager_path_only_outside_dispatch_modes():
    from torch.utils.flop_counter import FlopCounterMode

    from asvit_kernels.ops import elastic as ops_elastic
    assert ops_elastic._transforms.plain_eager()
    with FlopCounterMode(display=False):
        assert not ops_elastic._transforms.plain_eager()  # the custom op runs, so its FLOP formula counts


@pytest.mark.parametrize("device,backend", cases("elastic_layer_norm"))
def test_elastic_layer_norm_empty_batch(device, backend):
    w = torch.randn(8, device=device, requires_grad=True)
    b = torch.randn(8, device=device, requires_grad=True)
    x = torch.randn(0, 5, device=device, requires_grad=True)
    y = ak.elastic_layer_norm(x, w, b, (6, 5), backend=backend)
    assert y.shape == (0, 5)
    y.sum().backward()
    assert w.grad.abs().sum() == 0 and b.grad.abs().sum() == 0 and x.grad.shape == (0, 5)


def test_layer_norm_non_finite_rows_stay_in_their_rows():
    w, b = torch.randn(10), torch.randn(10)
    x = torch.randn(4, 6)
    x[1, 2], x[3, 0] = float("nan"), float("inf")
    y = ak.elastic_layer_norm(x, w, b, (7, 6))
    assert torch.isfinite(y[[0, 2]]).all() and torch.isnan(y[[1, 3]]).any(1).all()


@pytest.mark.parametrize("composite_max", [0, 10 ** 9])
def test_torch_linear_single_run_paths(composite_max, monkeypatch, poison):
    """Single-run ranges: F.linear on a strided view of the block (small blocks) and _RunLinear,
    whose backward writes each weight-gradient block once (large ones)."""
    from asvit_kernels.ops import elastic as ops_elastic
    monkeypatch.setattr(ops_elastic, "_COMPOSITE_MAX_BLOCK", composite_max)
    for n, (in_r, out_r) in enumerate([((0, 30), (0, 60)), ((120, 30), (84, 60)), (None, (10, 1))]):
        for dtype in (torch.float32, torch.float64):
            run_linear("cpu", "torch", dtype, 144, 150, in_r, out_r, (2, 37), n != 1, n)


def test_lean_cpu_path_keeps_the_backend_rule(monkeypatch):
    """The lean CPU path runs only when the torch backend would be picked: ASVIT_BACKEND naming a
    backend that cannot run here still raises, and "torch"/"auto" run as without it."""
    x, w, b = torch.randn(5, 6), torch.randn(8, 6), torch.randn(8)
    monkeypatch.setenv("ASVIT_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="ASVIT_BACKEND"):
        ak.elastic_layer_norm(x, w[:, 0], b, (2, 6))
    with pytest.raises(RuntimeError, match="ASVIT_BACKEND"):
        ak.elastic_linear(x, w, b, None, (1, 3))
    for env in ("torch", " Auto "):
        monkeypatch.setenv("ASVIT_BACKEND", env)
        torch.testing.assert_close(ak.elastic_linear(x, w, b, None, (1, 3)), x @ w[1:4].t() + b[1:4])


def _strided_leaf(shape, layout, dtype):
    """A leaf of ``shape`` laid out as asked: "transposed" (column-major) or "offset" (a view into
    a larger buffer that does not start at its storage's beginning)."""
    if layout == "transposed":
        return torch.randn(*reversed(shape), dtype=dtype).t().detach().requires_grad_()
    if layout == "expanded":  # every row the same memory
        return torch.randn(1, *shape[1:], dtype=dtype).expand(shape).detach().requires_grad_()
    big = torch.randn(3 + math.prod(shape) + 5, dtype=dtype)
    return big[3:3 + math.prod(shape)].view(shape).detach().requires_grad_()


@pytest.mark.parametrize("has_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spaced_out_runs_one_strided_matmul(dtype, has_bias, poison):
    """q, k and v row blocks of one length at one spacing (a qkv projection's non-wrapping range)
    x one column run: one strided view, one dense matmul, differentiated by C++ autograd (no
    Python Function in the graph); equal to the reference in forward and every gradient. Unequal
    lengths, uneven spacing and wrapping runs go the general way and agree too."""
    for n, out_r in enumerate([[(0, 16), (48, 16), (96, 16)], [(5, 10), (53, 10), (101, 10)], [(7, 9), (40, 9)],
                               [(0, 16), (48, 15)], [(0, 8), (20, 8), (60, 8)], [(140, 8), (10, 4)]]):
        for in_r in [(0, 20), (9, 30)]:
            run_linear("cpu", "torch", dtype, 144, 40, in_r, out_r, (3, 7), has_bias, 10 * n)
    x = torch.randn(6, 20, dtype=dtype)
    w = torch.randn(144, 40, dtype=dtype, requires_grad=True)
    y = ak.elastic_linear(x, w, None, (0, 20), [(0, 16), (48, 16), (96, 16)])
    assert "Eager" not in type(y.grad_fn).__name__
    y = ak.elastic_linear(x, w, None, (0, 20), [(0, 16), (48, 15)])
    assert "Eager" in type(y.grad_fn).__name__


@pytest.mark.parametrize("layout", ["transposed", "offset", "expanded"])
def test_strided_views_follow_the_parameters_layout(layout, monkeypatch, poison):
    """The strided views are built from the parameter's own strides and storage offset: a
    column-major weight or a weight viewed into a larger buffer (a flat-parameter layout) gives
    the reference's forward and gradients, single runs and spaced runs alike. A weight whose rows
    share memory (expanded) takes slices instead: as_strided would sum their gradients."""
    from asvit_kernels.ops import elastic as ops_elastic
    monkeypatch.setattr(ops_elastic, "_COMPOSITE_MAX_BLOCK", 10 ** 9)
    for out_r in [(10, 30), [(0, 16), (48, 16), (96, 16)]]:
        w = _strided_leaf((144, 40), layout, torch.float64)
        b = _strided_leaf((144,), "offset", torch.float64)
        x = torch.randn(2, 5, 20, dtype=torch.float64, requires_grad=True)
        y = ak.elastic_linear(x, w, b, (7, 20), out_r)
        dy = torch.randn_like(y)
        y.backward(dy)
        wr, br, xr = (t.detach().clone().contiguous().requires_grad_() for t in (w, b, x))
        reference.elastic_linear(xr, wr, br, (7, 20), out_r).backward(dy)
        for got, want in ((y, reference.elastic_linear(xr, wr, br, (7, 20), out_r)), (x.grad, xr.grad),
                          (w.grad, wr.grad), (b.grad, br.grad)):
            assert rel_err(got, want) <= 1e-12


def test_adjacent_out_ranges_are_one_run(poison):
    """A full-width qkv's q, k and v blocks continue each other: one run (dense F.linear on views),
    still equal to the reference; a gap or a wrap keeps them apart."""
    from asvit_kernels.ranges import concat_pieces
    assert len(concat_pieces([(0, 16), (16, 16), (32, 16)], 48)) == 1
    assert len(concat_pieces([(0, 15), (16, 16)], 48)) == 2
    assert len(concat_pieces([(40, 8), (0, 4)], 48)) == 2
    for dtype in (torch.float32, torch.float64):
        run_linear("cpu", "torch", dtype, 48, 20, (0, 20), [(0, 16), (16, 16), (32, 16)], (2, 9), True, 5)
        run_linear("cpu", "torch", dtype, 48, 20, (3, 12), [(8, 16), (24, 16)], (2, 9), False, 6)
