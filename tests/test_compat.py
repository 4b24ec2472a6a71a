"""asvit_kernels.compat: flash-attn 2's six attention functions with its signatures, layouts and
return values, called with the scalar types real call sites pass; checked against the float64
reference (forward and gradients); flash-attn's features passed through (window, softcap, ALiBi,
dropout, checked against the float64 feature reference); paged KV refused by name."""
import inspect

import numpy as np
import pytest
import torch

from asvit_kernels import compat, reference
from asvit_kernels.reference.attention import causal_mask

from _util import rel_err

TOL = 1e-5  # float32 vs float64 reference
LENS = [5, 1, 9]
CU = torch.tensor([0, 5, 6, 15], dtype=torch.int32)

# flash-attn 2.8's signatures (flash_attn/flash_attn_interface.py), parameter names and defaults.
COMMON = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
          ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
SIGNATURES = {
    "flash_attn_func": ["q", "k", "v"] + COMMON,
    "flash_attn_qkvpacked_func": ["qkv"] + COMMON,
    "flash_attn_kvpacked_func": ["q", "kv"] + COMMON,
    "flash_attn_varlen_func": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"]
                              + COMMON + [("block_table", None)],
    "flash_attn_varlen_qkvpacked_func": ["qkv", "cu_seqlens", "max_seqlen"] + COMMON,
    "flash_attn_varlen_kvpacked_func": ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"]
                                       + COMMON,
}


@pytest.mark.parametrize("name", sorted(SIGNATURES))
def test_signatures_match_flash_attn(name):
    params = list(inspect.signature(getattr(compat, name)).parameters.values())
    want = SIGNATURES[name]
    assert [p.name for p in params] == [w if isinstance(w, str) else w[0] for w in want]
    for p, w in zip(params, want):
        if isinstance(w, str):
            assert p.default is inspect.Parameter.empty, p.name
        else:
            assert p.default == w[1], p.name


def _ref_lse(q, k, cu_q, cu_k, scale, causal):
    """(H, total_q) float64 log-sum-exp of each row's visible scaled scores (-inf: no key)."""
    H, H_kv = q.shape[1], k.shape[1]
    out = torch.full((H, q.shape[0]), float("-inf"), dtype=torch.float64)
    for b in range(cu_q.numel() - 1):
        qs, qe, ks, ke = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        if ke == ks or qe == qs:
            continue
        kb = k[ks:ke].double().repeat_interleave(H // H_kv, dim=1)
        s = torch.einsum("qhd,khd->hqk", q[qs:qe].double(), kb) * scale
        if causal:
            s = s.masked_fill(~causal_mask(qe - qs, ke - ks), float("-inf"))
        out[:, qs:qe] = torch.logsumexp(s, -1)
    return out


def _grads(out, *inputs):
    """Gradients for one fixed cotangent (drawn in float64, so both dtypes get the same one)."""
    g = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return torch.autograd.grad(out, inputs, g.to(out.dtype))


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_func_values_grads_and_lse(causal):
    torch.manual_seed(0)
    q = torch.randn(15, 4, 16, requires_grad=True)
    k, v = (torch.randn(15, 2, 16, requires_grad=True) for _ in range(2))
    out, lse, probs = compat.flash_attn_varlen_func(q, k, v, CU, CU, 9, 9, 0.0, 0.3, causal, return_attn_probs=True)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.varlen_attention(qd, kd, vd, CU, CU, 0.3, causal)
    assert probs is None and lse.dtype == torch.float32 and lse.shape == (4, 15) and not lse.requires_grad
    assert rel_err(out, ref) <= TOL
    assert rel_err(lse, _ref_lse(q, k, CU, CU, 0.3, causal)) <= TOL
    for g, gr in zip(_grads(out, q, k, v), _grads(ref, qd, kd, vd)):
        assert rel_err(g, gr) <= TOL


def test_varlen_packed_forms_equal_varlen_func():
    torch.manual_seed(0)
    qkv = torch.randn(15, 3, 4, 8, requires_grad=True)
    out = compat.flash_attn_varlen_qkvpacked_func(qkv, CU, 9, causal=True)
    q, k, v = (t.detach().double().requires_grad_() for t in qkv.unbind(1))
    ref = reference.varlen_attention(q, k, v, CU, CU, causal=True)
    assert rel_err(out, ref) <= TOL
    (g,), gr = _grads(out, qkv), _grads(ref, q, k, v)
    assert rel_err(g, torch.stack(gr, 1)) <= TOL

    cu_k = torch.tensor([0, 2, 9, 10], dtype=torch.int32)
    qq = torch.randn(15, 4, 8)
    kv = torch.randn(10, 2, 2, 8)
    out, lse, _ = compat.flash_attn_varlen_kvpacked_func(qq, kv, CU, cu_k, 9, 7, return_attn_probs=True)
    kd, vd = kv.double().unbind(1)
    assert rel_err(out, reference.varlen_attention(qq.double(), kd, vd, CU, cu_k)) <= TOL
    assert rel_err(lse, _ref_lse(qq, kv[:, 0], CU, cu_k, 8 ** -0.5, False)) <= TOL


def _padded_ref(q, k, v, scale=None, causal=False):
    """(B, N, H, D) through the float64 varlen reference, one sequence per batch row."""
    B, N, H, D = q.shape
    N_k = k.shape[1]
    cu_q, cu_k = (torch.arange(B + 1, dtype=torch.int32) * n for n in (N, N_k))
    out = reference.varlen_attention(q.reshape(B * N, H, D), k.reshape(B * N_k, -1, D), v.reshape(B * N_k, -1, D),
                                     cu_q, cu_k, scale, causal)
    return out.reshape(B, N, H, D), cu_q, cu_k


@pytest.mark.parametrize("causal", [False, True])
def test_padded_functions_layout_values_and_lse(causal):
    """(B, N, H, D) layout; N_q != N_k (causal bottom-right, as flash-attn), GQA; lse (B, H, N_q)."""
    torch.manual_seed(0)
    q = torch.randn(2, 7, 6, 8, requires_grad=True)
    k, v = (torch.randn(2, 11, 3, 8, requires_grad=True) for _ in range(2))
    out, lse, probs = compat.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref, cu_q, cu_k = _padded_ref(qd, kd, vd, causal=causal)
    assert out.shape == (2, 7, 6, 8) and lse.shape == (2, 6, 7) and probs is None
    assert rel_err(out, ref) <= TOL
    want_lse = _ref_lse(q.detach().reshape(14, 6, 8), k.detach().reshape(22, 3, 8), cu_q, cu_k, 8 ** -0.5, causal)
    assert rel_err(lse, want_lse.reshape(6, 2, 7).transpose(0, 1)) <= TOL
    for g, gr in zip(_grads(out, q, k, v), _grads(ref, qd, kd, vd)):
        assert rel_err(g, gr) <= TOL

    kv = torch.stack([k.detach(), v.detach()], 2)
    assert rel_err(compat.flash_attn_kvpacked_func(q.detach(), kv, causal=causal), ref) <= TOL
    qkv = torch.randn(3, 5, 3, 2, 4)
    ref_s, _, _ = _padded_ref(*(t.double() for t in qkv.unbind(2)), causal=causal)
    assert rel_err(compat.flash_attn_qkvpacked_func(qkv, causal=causal), ref_s) <= TOL


# Scalar types real call sites pass: Hugging Face's packed path gives max_seqlen as a 0-d tensor
# (position_ids.max() + 1), numpy ints from data loaders, np.float32 scales, causal=1 / np.bool_.
SCALARS = [
    dict(max_seqlen_q=torch.tensor(9), max_seqlen_k=torch.tensor(9, dtype=torch.int32)),
    dict(max_seqlen_q=np.int64(9), max_seqlen_k=np.int32(9)),
    dict(softmax_scale=np.float32(0.3)),
    dict(softmax_scale=torch.tensor(0.3)),
    dict(softmax_scale=torch.tensor(0.3, dtype=torch.float64)),
    dict(causal=1),
    dict(causal=np.bool_(True)),
    dict(causal=torch.tensor(True)),
    dict(dropout_p=np.float32(0)),
    dict(dropout_p=torch.tensor(0.0)),
    dict(deterministic=True),
    dict(deterministic=np.bool_(False)),
]


@pytest.mark.parametrize("kwargs", SCALARS, ids=lambda d: ",".join(f"{k}={type(v).__name__}" for k, v in d.items()))
def test_scalar_types_of_real_call_sites(kwargs):
    torch.manual_seed(0)
    q, k, v = (torch.randn(15, 2, 8) for _ in range(3))
    args = dict(max_seqlen_q=9, max_seqlen_k=9, softmax_scale=None, causal=False)
    args.update(kwargs)
    out = compat.flash_attn_varlen_func(q, k, v, CU, CU, **args)
    scale = None if args["softmax_scale"] is None else float(args["softmax_scale"])
    ref = reference.varlen_attention(q.double(), k.double(), v.double(), CU, CU, scale, bool(args["causal"]))
    assert rel_err(out, ref) <= TOL
    # the same scalars through a padded function
    qb = q[:12].reshape(2, 6, 2, 8)
    kw = {k_: v_ for k_, v_ in kwargs.items() if not k_.startswith("max_seqlen")}
    out = compat.flash_attn_func(qb, qb, qb, **kw)
    assert rel_err(out, _padded_ref(*(t.double() for t in (qb, qb, qb)), scale, bool(args["causal"]))[0]) <= TOL


@pytest.mark.parametrize("kwargs,name", [
    (dict(max_seqlen_q=9.0), "max_seqlen_q"),
    (dict(max_seqlen_q=torch.tensor(9.0)), "max_seqlen_q"),
    (dict(max_seqlen_k=torch.tensor([9, 9])), "max_seqlen_k"),
    (dict(max_seqlen_q="9"), "max_seqlen_q"),
    (dict(softmax_scale="0.3"), "softmax_scale"),
    (dict(softmax_scale=True), "softmax_scale"),
    (dict(causal="yes"), "causal"),
    (dict(causal=torch.tensor(1.0)), "causal"),
    (dict(dropout_p="0"), "dropout_p"),
    (dict(window_size=3), "window_size"),
])
def test_bad_scalars_raise_type_error_naming_the_argument(kwargs, name):
    q = torch.randn(15, 2, 8)
    args = dict(max_seqlen_q=9, max_seqlen_k=9)
    args.update(kwargs)
    with pytest.raises(TypeError, match=name):
        compat.flash_attn_varlen_func(q, q, q, CU, CU, **args)


FEATURES = [dict(window_size=(4, 0)), dict(window_size=np.array([2, 3])), dict(softcap=30.0),
            dict(softcap=np.float32(0.5)), dict(alibi_slopes=torch.tensor([0.5, 0.25])),
            dict(alibi_slopes=torch.rand(3, 2)), dict(dropout_p=0.1, deterministic=True),
            dict(dropout_p=np.float32(0.1), window_size=(2, 2), softcap=1.0, alibi_slopes=torch.ones(2))]


@pytest.mark.parametrize("kwargs", FEATURES, ids=lambda kw: "+".join(kw))
@pytest.mark.parametrize("func", ["flash_attn_varlen_func", "flash_attn_func", "flash_attn_qkvpacked_func"])
def test_features_pass_through_to_the_reference(kwargs, func):
    """window_size, softcap, alibi_slopes, dropout_p (and deterministic) reach the op: the output
    and lse equal the float64 feature reference, with the torch backend's dropout mask regenerated
    from the seed the op draws (the default generator, re-seeded)."""
    from asvit_kernels.reference.attention import varlen_attention_features
    from asvit_kernels.torch_backend.attention import dropout_keep_mask
    g = torch.Generator().manual_seed(5)
    q = torch.randn(15, 2, 8, generator=g)
    padded = func != "flash_attn_varlen_func"
    cu = torch.tensor([0, 15], dtype=torch.int32) if padded else CU
    if padded and "alibi_slopes" in kwargs and kwargs["alibi_slopes"].dim() == 2:
        kwargs = dict(kwargs, alibi_slopes=kwargs["alibi_slopes"][:1])   # (batch = 1, H)
    args = {"flash_attn_varlen_func": (q, q, q, CU, CU, 9, 9), "flash_attn_func": (q[None],) * 3,
            "flash_attn_qkvpacked_func": (torch.stack([q[None]] * 3, 2),)}[func]
    torch.manual_seed(123)
    out, lse, none = getattr(compat, func)(*args, causal=True, return_attn_probs=True, **kwargs)
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2 ** 31, (1,)))   # what the op draws
    p = float(kwargs.get("dropout_p", 0.0))
    masks = dropout_keep_mask(seed, p, cu, cu, 2) if p else None
    window = tuple(int(w) for w in kwargs.get("window_size", (-1, -1)))
    want, want_lse = varlen_attention_features(q.double(), q.double(), q.double(), cu, cu, None, True, window,
                                               float(kwargs.get("softcap", 0.0)), kwargs.get("alibi_slopes"),
                                               masks, p, return_lse=True)
    assert none is None
    assert rel_err(out.reshape(want.shape), want) <= TOL
    lse = lse[0] if padded else lse
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    assert rel_err(lse.nan_to_num(neginf=0.0), want_lse.nan_to_num(neginf=0.0)) <= TOL


@pytest.mark.parametrize("func", ["flash_attn_varlen_func", "flash_attn_func"])
def test_bad_feature_values_raise_naming_the_option(func):
    q = torch.randn(15, 2, 8)
    args = (q, q, q, CU, CU, 9, 9) if func == "flash_attn_varlen_func" else (q[None],) * 3
    for kwargs, exc, what in [(dict(window_size=(-2, 0)), ValueError, "window_size"),
                              (dict(window_size=(1.5, 0)), TypeError, "window_size"),
                              (dict(softcap=-1.0), ValueError, "softcap"),
                              (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
                              (dict(alibi_slopes=torch.ones(2, dtype=torch.float64)), TypeError, "alibi_slopes"),
                              (dict(dropout_p=1.0), ValueError, "dropout_p"),
                              (dict(dropout_p=-0.1), ValueError, "dropout_p")]:
        with pytest.raises(exc, match=what):
            getattr(compat, func)(*args, **kwargs)


def test_block_table_is_refused_by_name():
    q = torch.randn(15, 2, 8)
    with pytest.raises(NotImplementedError, match="block_table"):
        compat.flash_attn_varlen_func(q, q, q, CU, CU, 9, 9, block_table=CU)


def test_layout_errors_name_the_argument():
    q = torch.randn(15, 2, 8)
    with pytest.raises(ValueError, match="qkv"):
        compat.flash_attn_varlen_qkvpacked_func(torch.randn(15, 2, 2, 8), CU, 9)
    with pytest.raises(ValueError, match="kv"):
        compat.flash_attn_kvpacked_func(q[None], torch.randn(1, 15, 3, 2, 8))
    with pytest.raises(ValueError, match="q"):
        compat.flash_attn_func(q, q, q)  # packed (total, H, D) given to the (B, N, H, D) function
    with pytest.raises(ValueError, match="batch"):
        compat.flash_attn_func(q[None], torch.randn(2, 15, 2, 8), torch.randn(2, 15, 2, 8))
