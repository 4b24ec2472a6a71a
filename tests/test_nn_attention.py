"""nn.Attention: timm's parameter layout, the same outputs as a plain softmax(QK^T)V module of that
layout, packed input, and patch_timm swapping blocks of a built model in place."""
import pytest
import torch
from torch import nn

import asvit_kernels as ak
from asvit_kernels.nn import Attention, patch_timm

from _util import cases, rel_err


class PlainAttention(nn.Module):
    """timm's Attention layout written out plainly (timm needs torchvision, which has no CPU build
    here); named so that patch_timm recognises it as timm's."""

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


@pytest.mark.parametrize("device,backend", cases("varlen_attention"))
@pytest.mark.parametrize("qk_norm", [False, True])
def test_matches_timm_layout(device, backend, qk_norm):
    torch.manual_seed(0)
    plain = PlainAttention(96, 6, qkv_bias=True, qk_norm=qk_norm).to(device)
    ours = Attention(96, 6, qkv_bias=True, qk_norm=qk_norm, backend=backend).to(device)
    ours.load_state_dict(plain.state_dict(), strict=True)
    x = torch.randn(3, 37, 96, device=device)
    assert rel_err(ours(x), plain.double()(x.double())) <= 1e-5


@pytest.mark.parametrize("device,backend", cases("varlen_attention"))
def test_packed_forward_equals_per_sequence(device, backend):
    torch.manual_seed(0)
    attn = Attention(32, 4, backend=backend).to(device)
    seqs = [torch.randn(n, 32, device=device) for n in (5, 1, 17)]
    packed = torch.cat(seqs)
    cu = ak.cu_seqlens_from_lengths([5, 1, 17]).to(device)
    out = attn(packed, cu_seqlens=cu, max_seqlen=17)
    want = torch.cat([attn(s[None])[0] for s in seqs])
    assert rel_err(out, want.double()) <= 1e-5
    with pytest.raises(ValueError, match="packed"):
        attn(packed[None], cu_seqlens=cu)


def test_patch_timm_keeps_weights_and_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(48, 48), PlainAttention(48, 4, qkv_bias=True), nn.GELU(),
                          nn.Sequential(PlainAttention(48, 4, qk_norm=True)))
    x = torch.randn(2, 10, 48)
    before = model(x)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    assert patch_timm(model) == 2
    assert isinstance(model[1], Attention) and isinstance(model[3][0], Attention)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items()) and sd.keys() == model.state_dict().keys()
    assert rel_err(model(x), before.double()) <= 1e-5
    assert patch_timm(model) == 0


def test_dropout_in_training_is_refused_not_ignored():
    attn = Attention(16, 2, attn_drop=0.1).train()
    with pytest.raises(NotImplementedError, match="dropout_p=0.1"):
        attn(torch.randn(1, 4, 16))
    attn.eval()(torch.randn(1, 4, 16))  # eval: no dropout, runs
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, 3)


def test_attn_dim_other_than_dim():
    """q, k and v of width attn_dim != dim (a ViTAS sub-network's layer): qkv dim -> 3 * attn_dim,
    proj attn_dim -> dim, same function as the plain computation."""
    torch.manual_seed(0)
    attn = Attention(24, 2, qkv_bias=True, attn_dim=40).double()
    assert attn.qkv.weight.shape == (120, 24) and attn.proj.weight.shape == (24, 40)
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    q, k, v = attn.qkv(x).reshape(2, 9, 3, 2, 20).permute(2, 0, 3, 1, 4)
    want = attn.proj(((q @ k.transpose(-2, -1)) * 20 ** -0.5).softmax(-1).matmul(v).transpose(1, 2).reshape(2, 9, 40))
    assert rel_err(attn(x), want) <= 1e-12
    with pytest.raises(ValueError, match="divisible"):
        Attention(24, 3, attn_dim=40)


def test_ntk_takes_the_fast_path_through_attention():
    """The projections see (B, N, C), so the NTK of a model with Attention needs no fallback."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), Attention(16, 2, qkv_bias=True)).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    K, info = ak.ntk(model, x, return_info=True)
    assert info["path"] == "fast", info
    assert rel_err(K, ak.reference.ntk_loop(model, x)) <= 1e-10
