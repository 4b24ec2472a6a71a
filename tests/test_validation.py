"""Bad input gets a ValueError/TypeError naming the argument, before any work."""
import pytest
import torch

import asvit_kernels as ak

X = torch.randn(4, 6)
W = torch.randn(8, 6)
B = torch.randn(8)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(x=X.long()), TypeError, "x must be float"),
    (dict(weight=torch.randn(8, 6, 1)), ValueError, "weight must be 2-D"),
    (dict(bias=torch.randn(7)), ValueError, "bias has 7"),
    (dict(bias=torch.randn(8, 1)), ValueError, "bias must be 1-D"),
    (dict(weight=W.double()), TypeError, "weight is torch.float64"),
    (dict(bias=B.half()), TypeError, "bias is torch.float16"),
    (dict(in_range=(0, 0)), ValueError, "in_range: width"),
    (dict(in_range=(0, 7)), ValueError, "in_range: width"),
    (dict(in_range=(-1, 6)), ValueError, "in_range: offset"),
    (dict(in_range=(0, 5)), ValueError, "x's last dim"),
    (dict(out_range=(0, 9)), ValueError, "out_range: width"),
    (dict(out_range=[(0, 3), (1, 2)]), ValueError, "overlaps"),
    (dict(backend="cuda"), RuntimeError, "no cuda implementation"),
])
def test_elastic_linear_rejects(kwargs, exc, msg):
    args = dict(x=X, weight=W, bias=B, in_range=None, out_range=None)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        ak.elastic_linear(**args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device type")
def test_elastic_linear_rejects_mixed_devices():
    with pytest.raises(ValueError, match="weight is on"):
        ak.elastic_linear(X, W.cuda())


def test_device_check_names_argument():
    meta_w = torch.randn(8, 6, device="meta")
    with pytest.raises(ValueError, match="weight is on meta"):
        ak.elastic_linear(X, meta_w)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(x=X.int()), TypeError, "x must be float"),
    (dict(weight=torch.randn(6, 1)), ValueError, "weight must be 1-D"),
    (dict(bias=torch.randn(5)), ValueError, "bias has shape"),
    (dict(channel_range=(2, 5)), ValueError, "x's last dim"),
    (dict(channel_range=(0, 0)), ValueError, "channel_range: width"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(eps="1e-5"), TypeError, "eps"),
    (dict(weight=torch.randn(6, dtype=torch.float16)), TypeError, "weight is torch.float16"),
])
def test_elastic_layer_norm_rejects(kwargs, exc, msg):
    args = dict(x=X, weight=torch.randn(6), bias=torch.randn(6), channel_range=None, eps=1e-5)
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        ak.elastic_layer_norm(**args)


P6 = torch.randn(6, 4)


@pytest.mark.parametrize("cu,max_len,exc,msg", [
    (torch.tensor([0, 4, 2, 6]), 10, ValueError, "cu_seqlens must be non-decreasing"),
    (torch.tensor([0, 4, 2, 6]), 4, ValueError, "cu_seqlens must be non-decreasing"),
    (torch.tensor([1, 2, 6]), 4, ValueError, r"cu_seqlens must start at 0"),
    (torch.tensor([0, 2, 5]), 4, ValueError, r"cu_seqlens\[-1\] \(5\) must equal the number of packed rows \(6\)"),
    (torch.tensor([0, 2, 6]), 3, ValueError, "max_len .3. is shorter than the longest sequence .4."),
    (torch.tensor([0.0, 2.0, 6.0]), 4, TypeError, "cu_seqlens must hold integers"),
    (torch.tensor([[0, 2, 6]]), 4, TypeError, "cu_seqlens must be a 1-D integer tensor"),
    (torch.tensor([0, 2, 6]), -1, ValueError, "max_len must be a non-negative int"),
    (torch.tensor([0, 2, 6]), 4.0, ValueError, "max_len must be a non-negative int"),
])
def test_unpack_rejects(cu, max_len, exc, msg):
    with pytest.raises(exc, match=msg):
        ak.unpack(P6, cu, max_len)


def test_unpack_accepts_a_valid_cu():
    out = ak.unpack(P6, torch.tensor([0, 2, 2, 6], dtype=torch.int32), 4)
    assert torch.equal(out[0, :2], P6[:2]) and torch.equal(out[2], P6[2:]) and not out[1].any()


@pytest.mark.parametrize("a,g,msg", [
    (torch.randn(3, 0, 4), torch.randn(3, 0, 5), r"a and g have no tokens \(T = 0\)"),
    (torch.randn(3, 2, 0), torch.randn(3, 2, 5), r"a has no features \(D_in = 0\)"),
    (torch.randn(3, 2, 4), torch.randn(3, 2, 0), r"g has no features \(D_out = 0\)"),
])
def test_per_sample_grad_gram_rejects_empty_dims(a, g, msg):
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=msg):
            ak.per_sample_grad_gram(a, g, backend=backend)


@pytest.mark.parametrize("kwargs,exc,msg", [
    (dict(points=torch.ones(3, 4, dtype=torch.long)), TypeError, "points must be floating point, got torch.int64"),
    (dict(tangents=torch.ones(3, 4, dtype=torch.int32)), TypeError, "tangents must be floating point, got torch.int32"),
    (dict(chunk_size=0), ValueError, "chunk_size must be None or a positive int, got 0"),
    (dict(chunk_size=-1), ValueError, "chunk_size must be None or a positive int, got -1"),
    (dict(chunk_size=1.5), ValueError, "chunk_size must be None or a positive int, got 1.5"),
    (dict(chunk_size=True), ValueError, "chunk_size must be None or a positive int, got True"),
])
def test_length_distortion_rejects(kwargs, exc, msg):
    args = dict(points=torch.randn(3, 4), tangents=torch.randn(3, 4))
    args.update(kwargs)
    with pytest.raises(exc, match=msg):
        ak.length_distortion(torch.nn.Linear(4, 2), **args)
