"""nn.Attention: timm's constructor arguments and call ``(x, attn_mask=None, is_causal=False)``,
parameter layout and function (against plain float64 softmax(QK^T)V written here), SDPA's
``attn_mask`` semantics (key padding through the kernel, other masks through the fallback), packed
input, gating, TorchScript and FX. patch_timm against real timm is in test_timm.py; here only that a
look-alike class is not swapped."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asvit_kernels as ak
from asvit_kernels.nn import Attention, count_patched, patch_timm
from asvit_kernels.nn import attention as attn_mod

from _util import cases, rel_err

TOL = 1e-5


class PlainAttention(nn.Module):
    """timm's Attention layout and function written out plainly, named like it: the look-alike that
    patch_timm must not swap (it is not timm's class)."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


PlainAttention.__name__ = "Attention"


def reference(attn, x, mask=None, causal=False):
    """Float64 attention of ``attn``'s weights with SDPA's mask semantics (bool True = attend, or
    additive; a query that sees no key gives 0, as SDPA does)."""
    m = {k: v.double() for k, v in attn.state_dict().items()}
    x = x.double()
    B, N, _ = x.shape
    H, D = attn.num_heads, attn.head_dim
    qkv = F.linear(x, m["qkv.weight"], m.get("qkv.bias")).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    s = (q @ k.transpose(-1, -2)) * attn.scale
    if causal:
        s = s.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)  # rows with every key hidden -> 0
    o = (p @ v).transpose(1, 2).reshape(B, N, H * D)
    if "gate.weight" in m:
        o = o * F.linear(x, m["gate.weight"], m.get("gate.bias")).sigmoid()
    return F.linear(o, m["proj.weight"], m.get("proj.bias"))


@pytest.mark.parametrize("device,backend", cases("varlen_attention"))
@pytest.mark.parametrize("qk_norm", [False, True])
def test_matches_timm_layout(device, backend, qk_norm):
    torch.manual_seed(0)
    plain = PlainAttention(96, 6, qkv_bias=True, qk_norm=qk_norm).to(device)
    ours = Attention(96, 6, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm, backend=backend).to(device)
    ours.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(3, 37, 96, device=device)
    assert rel_err(ours(x), plain.double()(x.double())) <= TOL


def test_constructor_takes_timms_arguments():
    """timm's positional order (dim, num_heads, attn_head_dim, dim_out, qkv_bias, qk_norm,
    scale_norm, proj_bias, gated, attn_drop, proj_drop, norm_layer, device, dtype)."""
    a = Attention(48, 4, 16, 40, True, True, True, False, True, 0.0, 0.0, nn.LayerNorm, "cpu", torch.float64)
    assert a.fused_attn is True and a.head_dim == 16 and a.attn_dim == 64
    assert a.qkv.weight.shape == (192, 48) and a.qkv.bias is not None and a.proj.weight.shape == (40, 64)
    assert a.proj.bias is None and a.gate.weight.shape == (64, 48) and a.norm.normalized_shape == (64,)
    assert a.q_norm.normalized_shape == (16,) and a.qkv.weight.dtype == torch.float64
    assert Attention(48, 4, device="meta").qkv.weight.is_meta
    assert Attention(48, 4).gate is None and isinstance(Attention(48, 4).norm, nn.Identity)
    with pytest.raises(ValueError, match="norm_layer"):
        Attention(48, 4, qk_norm=True)  # timm's default norm_layer is None too
    with pytest.raises(ValueError, match="norm_layer"):
        Attention(48, 4, scale_norm=True)
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, 3)
    with pytest.raises(ValueError, match="attn_dim"):
        Attention(48, 4, attn_head_dim=16, attn_dim=48)


def test_all_timm_options_match_the_reference():
    """attn_head_dim != dim / heads, dim_out, scale_norm, no proj bias, gated, qk_norm."""
    torch.manual_seed(0)
    a = Attention(24, 2, attn_head_dim=20, dim_out=16, qkv_bias=True, gated=True, proj_bias=False).double()
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    assert rel_err(a(x), reference(a, x)) <= 1e-12
    b = Attention(24, 2, scale_norm=True, qk_norm=True, norm_layer=nn.LayerNorm).double()
    for p in b.parameters():
        nn.init.normal_(p)
    q, k, v = b.qkv(x).reshape(2, 9, 3, 2, 12).permute(2, 0, 3, 1, 4)
    q, k = b.q_norm(q), b.k_norm(k)
    o = ((q @ k.transpose(-1, -2)) * 12 ** -0.5).softmax(-1) @ v
    assert rel_err(b(x), b.proj(b.norm(o.transpose(1, 2).reshape(2, 9, 24)))) <= 1e-12


def _no_fallback(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the SDPA fallback ran for a key-padding mask")
    monkeypatch.setattr(attn_mod, "_sdpa", boom)


def _padding(B=3, N=11):
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[0, 7:] = False
    keep[1, ::3] = False   # not a prefix: any subset of keys
    return keep


@pytest.mark.parametrize("form", ["bool_b11n", "float_b11n", "bool_expanded_b1nn", "bool_bhnn_repeated",
                                  "float_n"])
def test_key_padding_masks_run_through_the_kernel(monkeypatch, form):
    torch.manual_seed(0)
    a = Attention(32, 4, qkv_bias=True)
    x = torch.randn(3, 11, 32, requires_grad=True)
    keep = _padding()
    add = torch.zeros(3, 11).masked_fill(~keep, float("-inf"))
    mask = {"bool_b11n": keep[:, None, None, :], "float_b11n": add[:, None, None, :],
            "bool_expanded_b1nn": keep[:, None, None, :].expand(3, 1, 11, 11),
            "bool_bhnn_repeated": keep[:, None, None, :].repeat(1, 4, 11, 1),
            "float_n": add[0]}[form]
    _no_fallback(monkeypatch)
    out = a(x, mask)  # positional, as SDPA-style callers pass it
    xd = x.detach().double().requires_grad_()
    ref = reference(a, xd, mask if mask.dtype == torch.bool else mask.double())
    assert rel_err(out, ref) <= TOL
    g = torch.randn(out.shape, dtype=torch.float64)
    (gx,), (gr,) = torch.autograd.grad(out, [x], g.float()), torch.autograd.grad(ref, [xd], g)
    assert rel_err(gx, gr) <= TOL


def test_a_sample_with_every_key_hidden_gives_zero_attention():
    a = Attention(16, 2)
    x = torch.randn(2, 5, 16)
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1] = False
    out = a(x, keep[:, None, None, :])
    assert torch.isfinite(out).all()
    assert rel_err(out[1], a.proj.bias.expand(5, 16).double()) <= TOL  # proj(0) = bias
    assert rel_err(out, reference(a, x, keep[:, None, None, :])) <= TOL


@pytest.mark.parametrize("form", ["bool_nn", "float_bhnn", "bool_1h1n", "float_b1nn"])
def test_other_masks_run_through_the_fallback(form):
    torch.manual_seed(0)
    a = Attention(32, 4, qkv_bias=True)
    x = torch.randn(2, 9, 32, requires_grad=True)
    g = torch.Generator().manual_seed(1)
    mask = {"bool_nn": torch.rand(9, 9, generator=g) > 0.3,
            "float_bhnn": torch.randn(2, 4, 9, 9, generator=g),
            "bool_1h1n": torch.rand(1, 4, 1, 9, generator=g) > 0.3,
            "float_b1nn": torch.randn(2, 1, 9, 9, generator=g)}[form]
    out = a(x, attn_mask=mask)
    xd = x.detach().double().requires_grad_()
    ref = reference(a, xd, mask)
    assert rel_err(out, ref) <= TOL
    gr = torch.randn(out.shape, dtype=torch.float64)
    (gx,), (gd,) = torch.autograd.grad(out, [x], gr.float()), torch.autograd.grad(ref, [xd], gr)
    assert rel_err(gx, gd) <= TOL


def test_is_causal_and_mask_errors():
    torch.manual_seed(0)
    a = Attention(16, 2)
    x = torch.randn(2, 6, 16)
    assert rel_err(a(x, is_causal=True), reference(a, x, causal=True)) <= TOL
    with pytest.raises(ValueError, match="mutually exclusive"):
        a(x, torch.ones(6, 6, dtype=torch.bool), True)
    with pytest.raises(ValueError, match="attn_mask"):
        a(x, torch.ones(3, 6, dtype=torch.bool))
    with pytest.raises(TypeError, match="attn_mask"):
        a(x, torch.ones(6, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match="is_causal"):
        a(x, None, 1)
    cu = ak.cu_seqlens_from_lengths([6, 6])
    with pytest.raises(ValueError, match="attn_mask"):
        a(x.reshape(12, 16), torch.ones(6, 6, dtype=torch.bool), cu_seqlens=cu)
    with pytest.raises(TypeError):
        a(x.reshape(12, 16), None, False, cu)  # the varlen extras are keyword-only


@pytest.mark.parametrize("device,backend", cases("varlen_attention"))
def test_packed_forward_equals_per_sequence(device, backend):
    torch.manual_seed(0)
    attn = Attention(32, 4, backend=backend).to(device)
    seqs = [torch.randn(n, 32, device=device) for n in (5, 1, 17)]
    packed = torch.cat(seqs)
    cu = ak.cu_seqlens_from_lengths([5, 1, 17]).to(device)
    out = attn(packed, cu_seqlens=cu, max_seqlen=17)
    want = torch.cat([reference(attn, s[None])[0] for s in seqs])
    assert rel_err(out, want) <= TOL
    with pytest.raises(ValueError, match="packed"):
        attn(packed[None], cu_seqlens=cu)


def test_attn_dim_other_than_dim():
    """q, k and v of width attn_dim != dim (a ViTAS sub-network's layer): qkv dim -> 3 * attn_dim,
    proj attn_dim -> dim, same function as the plain computation."""
    torch.manual_seed(0)
    attn = Attention(24, 2, qkv_bias=True, attn_dim=40).double()
    assert attn.qkv.weight.shape == (120, 24) and attn.proj.weight.shape == (24, 40)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    assert rel_err(attn(x), reference(attn, x)) <= 1e-12
    with pytest.raises(ValueError, match="divisible"):
        Attention(24, 3, attn_dim=40)


def test_torchscript_runs_and_matches_eager():
    """torch.jit.script compiles a twin without the keyword-only varlen extras (see
    Attention.__prepare_scriptable__); its output, with and without a mask, is the eager one."""
    torch.manual_seed(0)
    a = Attention(32, 4, qkv_bias=True, gated=True)
    s = torch.jit.script(nn.Sequential(nn.LayerNorm(32), a))
    x = torch.randn(2, 7, 32)
    mask = _padding(2, 7)[:, None, None, :]
    assert torch.equal(s(x), nn.Sequential(s[0], a)(x))
    sa = torch.jit.script(a)
    assert rel_err(sa(x, mask), reference(a, x, mask)) <= TOL
    assert rel_err(sa(x, None, True), reference(a, x, causal=True)) <= TOL
    with pytest.raises(RuntimeError, match="Python function"):  # documented: it cannot be exported
        torch.jit.save(sa, io.BytesIO())


def test_fx_symbolic_trace():
    """Plain torch.fx traces a model with Attention (the Python dispatch is one wrapped call) and
    the traced module computes the same, mask included."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention(16, 2)

        def forward(self, x, attn_mask=None, is_causal: bool = False):
            return self.attn(x, attn_mask=attn_mask, is_causal=is_causal)

    net = Net()
    gm = torch.fx.symbolic_trace(net)
    x = torch.randn(2, 6, 16)
    mask = _padding(2, 6)[:, None, None, :]
    assert torch.equal(gm(x), net(x)) and torch.equal(gm(x, mask), net(x, mask))
    assert torch.equal(gm(x, None, True), net(x, None, True))


def test_patch_timm_does_not_swap_look_alikes():
    """A class named Attention with timm's attribute names is not timm's: left alone (tiny_vit's
    and beit's attention were swapped this way and computed something else)."""
    model = nn.Sequential(nn.Linear(48, 48), PlainAttention(48, 4, qkv_bias=True))
    x = torch.randn(2, 10, 48)
    before = model(x)
    out, n = patch_timm(model, return_count=True)
    assert out is model and n == 0 and count_patched(model) == 0 and isinstance(model[1], PlainAttention)
    assert torch.equal(model(x), before)
    assert count_patched(nn.Sequential(Attention(8, 2), nn.Sequential(Attention(8, 2)))) == 2


def test_ntk_takes_the_fast_path_through_attention():
    """The projections see (B, N, C), so the NTK of a model with Attention needs no fallback."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), Attention(16, 2, qkv_bias=True)).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    K, info = ak.ntk(model, x, return_info=True)
    assert info["path"] == "fast", info
    assert rel_err(K, ak.reference.ntk_loop(model, x)) <= 1e-10
