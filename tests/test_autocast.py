"""The custom ops under torch.autocast: the same casts and output dtypes as their aten counterparts
(F.linear, F.layer_norm), on every backend, gradients in the parameters' own dtype, values against
the float64 reference at the low-precision tolerance."""
import pytest
import torch
import torch.nn.functional as F

import asvit_kernels as ak
from asvit_kernels import reference

from _util import TOL, cases, rel_err

# CPU autocast is bf16; the Triton interpreter has no bf16, so the CPU cases run the torch backend.
CPU = [("cpu", "torch", torch.bfloat16)]
GPU = [pytest.param("cuda", b, d, marks=pytest.mark.gpu) for b in ("torch", "triton") for d in (torch.float16,
                                                                                                   torch.bfloat16)]


def _inputs(device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 7, 24, generator=g).to(device).requires_grad_()
    W = torch.randn(40, 32, generator=g).to(device).requires_grad_()
    b = torch.randn(40, generator=g).to(device).requires_grad_()
    return x, W, b


@pytest.mark.parametrize("device,backend,dtype", CPU + GPU)
def test_elastic_linear_casts_like_f_linear(device, backend, dtype):
    x, W, b = _inputs(device)
    in_r, out_r = (20, 24), [(34, 10), (10, 8)]         # wrapped ranges, two output blocks
    with torch.autocast(device, dtype):
        y = ak.elastic_linear(x, W, b, in_r, out_r, backend=backend)
        like = F.linear(x, W[:24, :24])
    assert y.dtype == like.dtype == dtype
    ref = reference.elastic_linear(x.double(), W.double(), b.double(), in_r, out_r)
    assert rel_err(y, ref) <= TOL[dtype]
    dy = torch.randn_like(ref)
    gx, gW, gb = torch.autograd.grad(y, (x, W, b), dy.to(y.dtype))
    rx, rW, rb = torch.autograd.grad(ref, (x, W, b), dy)   # float64 graph through the float32 leaves
    assert (gx.dtype, gW.dtype, gb.dtype) == (torch.float32,) * 3
    for got, want in ((gx, rx), (gW, rW), (gb, rb)):
        assert rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("device,backend,dtype", CPU + GPU)
@pytest.mark.parametrize("x_dtype", [torch.float32, "autocast"])
def test_elastic_layer_norm_follows_f_layer_norm(device, backend, dtype, x_dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 24, generator=g).to(device)
    x = x.to(dtype) if x_dtype == "autocast" else x
    w, b = (torch.randn(32, generator=g).to(device) for _ in range(2))
    with torch.autocast(device, dtype):
        y = ak.elastic_layer_norm(x, w, b, (20, 24), backend=backend)
        like = F.layer_norm(x, (24,), w[:24], b[:24])
    assert y.dtype == like.dtype
    ref = reference.elastic_layer_norm(x.double(), w.double(), b.double(), (20, 24))
    assert rel_err(y, ref) <= TOL[x.dtype]


def test_float64_is_left_alone_as_autocast_does():
    x, W, b = (t.detach().double() for t in _inputs("cpu"))
    with torch.autocast("cpu", torch.bfloat16):
        y = ak.elastic_linear(x, W, b, (0, 24), (0, 16))
    assert y.dtype == torch.float64
    assert rel_err(y, reference.elastic_linear(x, W, b, (0, 24), (0, 16))) <= TOL[torch.float64]


def test_mixed_dtypes_outside_autocast_still_refused():
    x, W, b = _inputs("cpu")
    with pytest.raises(TypeError, match="weight"):
        ak.elastic_linear(x.detach().bfloat16(), W, b, (0, 24), (0, 16))
