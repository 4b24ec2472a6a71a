"""The ops under torch.func transforms (vmap, vjp, jvp): custom ops cannot be transformed, so the
ops run their composite form there; it must be the same function as the reference."""
import torch

import asvit_kernels as ak
from asvit_kernels import reference
from asvit_kernels.nn import Attention

from _util import rel_err

CU = torch.tensor([0, 5, 6, 13, 13, 20], dtype=torch.int32)  # ragged, with an empty sequence


def _qkv(dtype=torch.float64, batch=()):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*batch, 20, 4, 8, generator=g, dtype=dtype) for _ in range(3)]


def test_varlen_attention_under_vmap_vjp_jvp():
    q, k, v = _qkv()
    for causal in (False, True):
        f = lambda q, k, v: ak.varlen_attention(q, k, v, CU, causal=causal)  # noqa: E731
        ref = lambda q, k, v: reference.varlen_attention(q, k, v, CU, causal=causal)  # noqa: E731
        qb, kb, vb = _qkv(batch=(3,))
        want = torch.stack([ref(*t) for t in zip(qb, kb, vb)])
        assert rel_err(torch.func.vmap(f)(qb, kb, vb), want) <= 1e-12
        t = _qkv()
        out, jv = torch.func.jvp(f, (q, k, v), tuple(t))
        _, jv_ref = torch.func.jvp(ref, (q, k, v), tuple(t))
        assert rel_err(out, ref(q, k, v)) <= 1e-12 and rel_err(jv, jv_ref) <= 1e-12
        _, vjp = torch.func.vjp(f, q, k, v)
        _, vjp_ref = torch.func.vjp(ref, q, k, v)
        for a, b in zip(vjp(t[0]), vjp_ref(t[0])):
            assert rel_err(a, b) <= 1e-12


def test_elastic_ops_under_jvp_and_vmap():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 5, generator=g, dtype=torch.float64)
    w, b = torch.randn(9, 7, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)
    lin = lambda x, w: ak.elastic_linear(x, w, b, (5, 5), [(7, 3), (2, 3)])  # noqa: E731
    lin_ref = lambda x, w: reference.elastic_linear(x, w, b, (5, 5), [(7, 3), (2, 3)])  # noqa: E731
    tx, tw = torch.randn_like(x), torch.randn_like(w)
    assert rel_err(torch.func.jvp(lin, (x, w), (tx, tw))[1], torch.func.jvp(lin_ref, (x, w), (tx, tw))[1]) <= 1e-12
    assert rel_err(torch.func.vmap(lin, (0, None))(x, w), lin_ref(x, w)) <= 1e-12
    lw = torch.randn(7, generator=g, dtype=torch.float64)
    ln = lambda x: ak.elastic_layer_norm(x, lw, lw.flip(0), (4, 5))  # noqa: E731
    ln_ref = lambda x: reference.elastic_layer_norm(x, lw, lw.flip(0), (4, 5))  # noqa: E731
    assert rel_err(torch.func.jvp(ln, (x,), (tx,))[1], torch.func.jvp(ln_ref, (x,), (tx,))[1]) <= 1e-12


def _attention_model():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), Attention(16, 2, qkv_bias=True), torch.nn.Flatten(1)).double()


def test_ntk_of_several_models_with_attention_is_exact_and_fast():
    torch.manual_seed(0)
    models = [_attention_model() for _ in range(3)]
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    K, info = ak.ntk(models, x, return_info=True)
    assert info["path"] == "fast", info
    for m, k in zip(models, K):
        assert rel_err(k, reference.ntk_loop(m, x)) <= 1e-10


def test_length_distortion_through_attention():
    torch.manual_seed(0)
    model = _attention_model()
    pts, tans = ak.circle_curve((5, 8), 4)
    pts, tans = pts.double(), tans.double()
    want = reference.length_distortion_loop(model, pts, tans)
    assert abs(ak.length_distortion(model, pts, tans) - want) <= 1e-10 * want
