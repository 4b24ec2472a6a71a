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
