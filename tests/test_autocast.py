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


@pytest.mark.parametrize("device,backend,dtype", CPU + GPU)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens", [[5, 13, 1], [13, 13, 13]], ids=["mixed", "equal"])  # equal: full_attention
def test_varlen_attention_casts_like_sdpa(device, backend, dtype, causal, lens):
    g = torch.Generator().manual_seed(2)
    cu = ak.cu_seqlens_from_lengths(lens).to(device)
    q, k, v = (torch.randn(sum(lens), 4, 16, generator=g).to(device).requires_grad_() for _ in range(3))
    with torch.autocast(device, dtype):
        out = ak.varlen_attention(q, k, v, cu, cu, 13, 13, causal=causal, backend=backend)
        like = F.scaled_dot_product_attention(q[None].transpose(1, 2), k[None].transpose(1, 2), v[None].transpose(1, 2))
    assert out.dtype == like.dtype == dtype
    ref = reference.varlen_attention(q.double(), k.double(), v.double(), cu, cu, causal=causal)
    assert rel_err(out, ref) <= TOL[dtype]
    dout = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    refs = torch.autograd.grad(ref, (q, k, v), dout)
    for got, want in zip(grads, refs):
        assert got.dtype == torch.float32 and rel_err(got, want) <= TOL[dtype]


@pytest.mark.parametrize("kind", ["asvit", "elastic_vit"])
def test_models_run_under_cpu_autocast(kind):
    """Every op of the model families is reached by autocast: bf16 logits near the fp32 ones."""
    from asvit_kernels.models import AsViT, ElasticViT, SubnetSpace
    torch.manual_seed(0)
    m = (AsViT.from_genotype("8,2,3|4,1,2|4,1,4|4,1,6|32", num_classes=10, img_size=32) if kind == "asvit"
         else ElasticViT(SubnetSpace.tiny(), img_size=32, num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    want = m(x)
    with torch.autocast("cpu", torch.bfloat16):
        got = m(x)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) <= 5e-2
    got.float().sum().backward()
    assert all(p.grad is None or (p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all())
               for p in m.parameters())


def test_meta_tensors_pass_through():
    """Shape-only passes (FLOP counting) run the ops on the meta device, where autocast has no type."""
    x, W = torch.empty(2, 5, 24, device="meta"), torch.empty(40, 32, device="meta")
    assert ak.elastic_linear(x, W, None, (0, 24), (0, 16)).shape == (2, 5, 16)
    q = torch.empty(6, 2, 8, device="meta")
    cu = torch.tensor([0, 6], dtype=torch.int32, device="meta")
    assert ak.varlen_attention(q, q, q, cu, cu, 6, 6).shape == (6, 2, 8)


@pytest.mark.parametrize("device,backend,dtype", CPU + [pytest.param("cuda", b, d, marks=pytest.mark.gpu)
                                                         for b in ("torch", "triton", "cuda")
                                                         for d in (torch.float16, torch.bfloat16)])
def test_per_sample_grad_gram_casts_like_a_matmul_and_returns_fp32(device, backend, dtype):
    g = torch.Generator().manual_seed(3)
    a, dy = torch.randn(6, 9, 20, generator=g).to(device), torch.randn(6, 9, 12, generator=g).to(device)
    with torch.autocast(device, dtype):
        K = ak.per_sample_grad_gram(a, dy, backend=backend)
    assert K.dtype == torch.float32
    # The Gram of the cast inputs, exactly: the cast is the only rounding autocast adds.
    ref = reference.per_sample_grad_gram(a.to(dtype).double(), dy.to(dtype).double())
    assert rel_err(K, ref) <= TOL[torch.float32] * 10
    assert rel_err(K, reference.per_sample_grad_gram(a.double(), dy.double())) <= TOL[dtype]
