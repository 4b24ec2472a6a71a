"""models.vit.ViT: timm's VisionTransformer layout and function (against an independent plain-PyTorch
implementation written here, and against timm itself when installed), per-layer widths, variable
input size, the packed path (one attention call per layer), the NTK fast path, drop path, init and
argument checks."""
import copy
import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import asvit_kernels as ak
from asvit_kernels.models.vit import DropPath, ViT, _Packing

from _timm import import_timm
from _util import rel_err

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10)
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


# ----------------------------------------------------------------------------- independent reference


class RefAttention(nn.Module):
    """softmax(Q K^T / sqrt(d)) V over (B, heads, N, d), timm's parameter names."""

    def __init__(self, dim, heads, attn_dim):
        super().__init__()
        self.heads, self.hd = heads, attn_dim // heads
        self.qkv = nn.Linear(dim, 3 * attn_dim)
        self.proj = nn.Linear(attn_dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd), dim=-1)
        return self.proj((w @ v).transpose(1, 2).reshape(B, N, -1))


class RefMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class RefBlock(nn.Module):
    def __init__(self, dim, heads, attn_dim, hidden):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), RefAttention(dim, heads, attn_dim)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), RefMlp(dim, hidden)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class RefPatchEmbed(nn.Module):
    def __init__(self, chans, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(chans, dim, patch, patch)


class RefViT(nn.Module):
    """timm's VisionTransformer (pre-norm blocks, class token with a position row, final norm,
    token or average pooling) written plainly; position embedding resized bicubically."""

    def __init__(self, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=10,
                 attn_dims=None, mlp_dims=None, class_token=True, global_pool="token", in_chans=3):
        super().__init__()
        heads = num_heads if isinstance(num_heads, list) else [num_heads] * depth
        attn_dims = attn_dims or [embed_dim] * depth
        mlp_dims = mlp_dims or [4 * embed_dim] * depth
        self.patch, self.grid, self.pool, self.prefix = patch_size, img_size // patch_size, global_pool, int(class_token)
        self.patch_embed = RefPatchEmbed(in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.prefix + self.grid ** 2, embed_dim))
        self.blocks = nn.Sequential(*[RefBlock(embed_dim, heads[i], attn_dims[i], mlp_dims[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Linear(embed_dim, num_classes)

    def pos(self, gh, gw):
        pe = self.pos_embed
        if (gh, gw) == (self.grid, self.grid):
            return pe
        D = pe.shape[-1]
        grid = pe[:, self.prefix:].reshape(1, self.grid, self.grid, D).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
        return torch.cat([pe[:, :self.prefix], grid.permute(0, 2, 3, 1).reshape(1, gh * gw, D)], 1)

    def forward(self, x):
        B, _, H, W = x.shape
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(B, -1, -1), t], 1)
        t = self.norm(self.blocks(t + self.pos(H // self.patch, W // self.patch)))
        return self.head(t[:, 0] if self.pool == "token" else t[:, self.prefix:].mean(1))


def randomize(model: nn.Module) -> nn.Module:
    """Random values everywhere (non-zero biases, LayerNorm affine off 1/0), of sizes that keep the
    softmax away from saturation."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            elif name in ("cls_token", "pos_embed"):
                p.normal_(0, 0.5)
            else:
                p.normal_(0, p[0].numel() ** -0.5)
    return model


def pair(dtype=torch.float64, **cfg):
    """(reference in float64, ViT in ``dtype``) sharing the same random parameters."""
    cfg = {**SMALL, **cfg}
    ref = randomize(RefViT(**cfg)).to(dtype)
    ours = ViT(**cfg).to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.double(), ours


def check_forward_backward(ref, ours, x, dtype, params=("blocks.0.attn.qkv.weight", "pos_embed")):
    """Logits, input gradient and some parameter gradients of ``ours`` in ``dtype`` against ``ref``."""
    xr = x.detach().double().clone().requires_grad_()
    xo = x.detach().to(dtype).clone().requires_grad_()
    out_r, out_o = ref(xr), ours(xo)
    assert out_o.dtype == dtype
    assert rel_err(out_o, out_r) <= TOL[dtype]
    w = torch.randn_like(out_r)
    (out_r * w).sum().backward()
    (out_o * w.to(dtype)).sum().backward()
    assert rel_err(xo.grad, xr.grad) <= TOL[dtype]
    pr, po = dict(ref.named_parameters()), dict(ours.named_parameters())
    for name in params:
        assert rel_err(po[name].grad, pr[name].grad) <= TOL[dtype], name


# ----------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pool,class_token", [("token", True), ("avg", True), ("avg", False)])
def test_matches_plain_vit(dtype, pool, class_token):
    torch.manual_seed(0)
    ref, ours = pair(dtype, global_pool=pool, class_token=class_token)
    assert ours.pos_embed.shape == (1, int(class_token) + 16, 48)
    assert (ours.cls_token is None) == (not class_token)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    params = ["blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.bias", "pos_embed", "patch_embed.proj.weight"]
    check_forward_backward(ref, ours, x, dtype, params + (["cls_token"] if pool == "token" else []))
    feats = ours.forward_features(x.to(dtype))
    assert feats.shape == (2, int(class_token) + 16, 48)
    assert rel_err(ours.forward_head(feats), ours(x.to(dtype)).double()) <= TOL[dtype]


@pytest.mark.parametrize("pool,class_token", [("token", True), ("avg", False)])
def test_matches_timm(pool, class_token):
    if import_timm() is None:
        pytest.skip("timm does not import")
    import timm.models.vision_transformer as timm_vit
    torch.manual_seed(0)
    theirs = timm_vit.VisionTransformer(**SMALL, global_pool=pool, class_token=class_token, fc_norm=False)
    randomize(theirs).double().eval()
    ours = ViT(**SMALL, global_pool=pool, class_token=class_token).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    check_forward_backward(theirs, ours, x, torch.float64)
    check_forward_backward(theirs, ours.float(), x, torch.float32)


def test_per_layer_widths():
    torch.manual_seed(0)
    cfg = dict(depth=3, num_heads=[2, 3, 1], attn_dims=[16, 36, 8], mlp_dims=[20, 96, 7])
    ref, ours = pair(**cfg)
    for i, (a, m) in enumerate(zip(cfg["attn_dims"], cfg["mlp_dims"])):
        blk = ours.blocks[i]
        assert blk.attn.qkv.weight.shape == (3 * a, 48) and blk.attn.proj.weight.shape == (48, a)
        assert blk.mlp.fc1.weight.shape == (m, 48) and blk.mlp.fc2.weight.shape == (48, m)
        assert blk.attn.num_heads == cfg["num_heads"][i]
    assert ours.num_heads == [2, 3, 1] and ours.attn_dims == [16, 36, 8] and ours.mlp_dims == [20, 96, 7]
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    check_forward_backward(ref, ours, x, torch.float64, ["blocks.1.attn.qkv.weight", "blocks.2.mlp.fc2.weight"])
    # num_heads as a list with the default widths
    assert [b.attn.head_dim for b in ViT(**{**SMALL, "num_heads": [3, 6]}).blocks] == [16, 8]


@pytest.mark.parametrize("size", [(48, 48), (48, 32), (16, 24)])
def test_variable_resolution(size):
    torch.manual_seed(0)
    ref, ours = pair()
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    check_forward_backward(ref, ours, x, torch.float64)
    assert ours.forward_features(x).shape[1] == 1 + (size[0] // 8) * (size[1] // 8)


def test_non_divisible_input_is_refused():
    ours = ViT(**SMALL)
    with pytest.raises(ValueError, match="input size 36x32.*patch size 8x8"):
        ours(torch.randn(1, 3, 36, 32))
    with pytest.raises(ValueError, match="images\\[1\\].*36x40"):
        ours.forward_packed([torch.randn(3, 32, 32), torch.randn(3, 36, 40)])
    with pytest.raises(ValueError, match="channels"):
        ours(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="images"):
        ours.forward_packed([])


def _counting(monkeypatch):
    """Count varlen attention launches made by nn.Attention."""
    mod = importlib.import_module("asvit_kernels.nn.attention")
    real, calls = mod.varlen_attention, []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(mod, "varlen_attention", counted)
    return calls


# timm VisionTransformer options (architectures that use them in parentheses)
TIMM_OPTIONS = {
    "reg4_layerscale": dict(reg_tokens=4, init_values=1e-5),                      # DINOv2-reg
    "distilled": dict(distilled=True),                                            # deit_*_distilled
    "no_embed_class_gap_fcnorm": dict(no_embed_class=True, class_token=False, global_pool="avg", fc_norm=True),
    "qk_norm_tanh_gelu": dict(qk_norm=True, act_layer="gelu_tanh"),               # SigLIP-style MLP
    "pre_norm_quick_gelu": dict(pre_norm=True, act_layer="quick_gelu"),           # OpenAI CLIP
    "max_pool": dict(global_pool="max", fc_norm=None),
    "avgmax_no_final_norm": dict(global_pool="avgmax", final_norm=False),
}


@pytest.mark.parametrize("opts", TIMM_OPTIONS.values(), ids=TIMM_OPTIONS.keys())
def test_timm_options_packed_equals_per_image(opts):
    """Each option computes the same per image in the batched and the packed path (prefix tokens,
    position embedding, pooling, heads), forward and gradients."""
    torch.manual_seed(0)
    ours = randomize(ViT(**SMALL, **opts)).double()
    images = [torch.randn(3, h, w, dtype=torch.float64) for h, w in ((32, 32), (48, 32), (16, 16))]
    out = ours.forward_packed(images)
    want = torch.cat([ours(im[None]) for im in images])
    assert out.shape == (3, 10) and rel_err(out, want) <= 1e-10
    w = torch.randn_like(out)
    params = list(ours.parameters())
    # scale: some gradients are 0 up to rounding (k_norm's bias cannot change a softmax)
    for a, b in zip(torch.autograd.grad((out * w).sum(), params), torch.autograd.grad((want * w).sum(), params)):
        assert rel_err(a, b, scale=1e-4) <= 1e-10


def test_activation_is_config_not_state():
    """Same state dict, different activations, different functions: the activation travels in the
    config (act_layer), and from_timm reads it from the timm model."""
    torch.manual_seed(0)
    exact = randomize(ViT(**SMALL)).double()
    tanh = ViT(**SMALL, act_layer="gelu_tanh").double()
    tanh.load_state_dict(exact.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    assert rel_err(tanh(x), exact(x)) > 1e-8
    assert isinstance(tanh.blocks[0].mlp.act, nn.GELU) and tanh.blocks[0].mlp.act.approximate == "tanh"
    assert tanh.act_layer == "gelu_tanh"


# timm architectures ViT.from_timm builds (a cross-section of the families counted in the README)
# and ones it refuses with the option named.
FROM_TIMM = {"vit_tiny_patch16_224": 32, "vit_small_patch14_reg4_dinov2": 28, "deit_tiny_distilled_patch16_224": 32,
             "deit3_small_patch16_224": 32, "vit_base_patch16_clip_quickgelu_224": 32,
             "vit_base_patch32_siglip_gap_256": 64, "vit_medium_patch16_gap_256": 32}
REFUSED = {"vit_base_patch16_siglip_224": "attention pooling", "vit_base_patch16_rope_reg1_gap_256": "Eva",
           "vit_small_r26_s32_224": "HybridEmbed", "vit_relpos_small_patch16_224": "VisionTransformerRelPos"}


@pytest.mark.parametrize("name", sorted(FROM_TIMM))
def test_from_timm_loads_strictly_and_computes_the_same(name):
    timm = import_timm()
    if timm is None:
        pytest.skip("timm does not import")
    torch.manual_seed(0)
    size = FROM_TIMM[name]
    # depth=2: the family's options at a fraction of the CPU time
    theirs = timm.create_model(name, pretrained=False, img_size=size, num_classes=10, depth=2)
    theirs = randomize(theirs).double().eval()
    ours = ViT.from_timm(theirs)
    assert ours.pos_embed.dtype == torch.float64 and not ours.training
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    check_forward_backward(theirs, ours, x, torch.float64)
    assert rel_err(ours.forward_packed(list(x)), theirs(x)) <= 1e-10
    if "siglip" in name:
        assert ours.act_layer == "gelu_tanh"
    if "quickgelu" in name:
        assert ours.act_layer == "quick_gelu"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_from_timm_refuses_what_it_does_not_implement(name):
    timm = import_timm()
    if timm is None:
        pytest.skip("timm does not import")
    model = timm.create_model(name, pretrained=False, device="meta")
    with pytest.raises(ValueError, match=REFUSED[name]):
        ViT.from_timm(model)


@pytest.mark.parametrize("pool,class_token", [("token", True), ("avg", True), ("avg", False)])
def test_forward_packed_equals_per_image(monkeypatch, pool, class_token):
    torch.manual_seed(0)
    _, ours = pair(global_pool=pool, class_token=class_token)
    images = [torch.randn(3, h, w, dtype=torch.float64) for h, w in ((32, 32), (48, 32), (16, 16), (32, 32))]
    calls = _counting(monkeypatch)
    out = ours.forward_packed(images)
    prefix = int(class_token)
    assert calls == [sum(prefix + h * w // 64 for _, h, w in (im.shape for im in images))] * ours.depth
    want = torch.cat([ours(im[None]) for im in images])
    assert out.shape == (4, 10) and rel_err(out, want) <= 1e-10
    assert rel_err(ours.forward_packed(images, pre_logits=True),
                   torch.cat([ours.forward_head(ours.forward_features(im[None]), pre_logits=True) for im in images])) <= 1e-10
    # gradients flow and equal the per-image ones
    w = torch.randn_like(out)
    names = ["blocks.1.attn.qkv.weight", "pos_embed", "patch_embed.proj.weight"]
    g_packed = torch.autograd.grad((ours.forward_packed(images) * w).sum(), [dict(ours.named_parameters())[n] for n in names])
    g_loop = torch.autograd.grad((torch.cat([ours(im[None]) for im in images]) * w).sum(),
                                 [dict(ours.named_parameters())[n] for n in names])
    for n, a, b in zip(names, g_packed, g_loop):
        assert rel_err(a, b) <= 1e-10, n
    tokens, cu = ours.forward_features_packed(images)
    assert cu.dtype == torch.int32 and cu.tolist()[-1] == tokens.shape[0]


def test_ntk_fast_path():
    torch.manual_seed(0)
    model = ViT(img_size=16, patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=5).double().eval()
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    K, info = ak.ntk(model, x, return_info=True)
    assert info["path"] == "fast", info
    assert rel_err(K, ak.reference.ntk_loop(model, x)) <= 1e-6


def test_init_like_timm_and_deterministic():
    torch.manual_seed(0)
    a = ViT(**SMALL)
    torch.manual_seed(0)
    b = ViT(**SMALL)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert a.cls_token.abs().max() < 1e-5 and 0.01 < a.pos_embed.std() < 0.03
    for name, p in a.named_parameters():
        if "norm" in name:
            assert torch.all(p == (1.0 if name.endswith("weight") else 0.0)), name
        elif name.endswith("bias") and "patch_embed" not in name:
            assert torch.all(p == 0), name
    assert 0.015 < a.blocks[0].mlp.fc1.weight.std() < 0.025
    assert a.no_weight_decay() == {"pos_embed", "cls_token"}
    assert a.num_patches == a.patch_embed.num_patches == 16 and a.grid_size == a.patch_embed.grid_size == (4, 4)
    headless = ViT(**{**SMALL, "num_classes": 0})
    assert isinstance(headless.head, nn.Identity) and headless(torch.randn(2, 3, 32, 32)).shape == (2, 48)
    assert "head.weight" not in headless.state_dict()


def test_drop_path_schedule_and_effect():
    torch.manual_seed(0)
    model = ViT(**{**SMALL, "depth": 3}, drop_path_rate=0.2)
    assert [b.drop_path1.drop_prob for b in model.blocks] == pytest.approx([0.0, 0.1, 0.2])
    model.set_drop_path(0.4)
    assert model.drop_path_rate == 0.4 and [b.drop_path2.drop_prob for b in model.blocks] == pytest.approx([0, 0.2, 0.4])
    model.drop_path_rate = 0.0
    assert all(b.drop_path1.drop_prob == 0 for b in model.blocks)
    with pytest.raises(ValueError, match="drop_path_rate"):
        model.set_drop_path(1.5)

    # rate 1: the last block's branches are always dropped, so training = the model without it
    _, ours = pair(depth=3)
    shallow = copy.deepcopy(ours)
    shallow.blocks = shallow.blocks[:2]
    ours.set_drop_path(1.0)
    ours.blocks[1].drop_path1.drop_prob = ours.blocks[1].drop_path2.drop_prob = 0.0
    ours.train()
    images = [torch.randn(3, 32, 32, dtype=torch.float64), torch.randn(3, 16, 24, dtype=torch.float64)]
    assert rel_err(ours(images[0][None]), shallow(images[0][None])) <= 1e-12
    assert rel_err(ours.forward_packed(images), shallow.forward_packed(images)) <= 1e-12
    # a rate in (0, 1) changes training outputs but not eval ones
    ours.set_drop_path(0.5)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    torch.manual_seed(1)
    assert not torch.allclose(ours(x), ours.eval()(x))


def test_drop_path_packed_draws_one_decision_per_sample():
    torch.manual_seed(0)
    lens = [3, 1, 4, 2, 5, 3]
    sample = torch.repeat_interleave(torch.arange(6), torch.tensor(lens))
    packing = _Packing(ak.cu_seqlens_from_lengths(lens), 5, sample, 6)
    dp = DropPath(0.5).train()
    out = dp(torch.ones(sum(lens), 4, dtype=torch.float64), packing)
    per_sample = [seg for seg in out.split(lens)]
    assert all(torch.all(seg == seg[0, 0]) and seg[0, 0].item() in (0.0, 2.0) for seg in per_sample)
    assert {seg[0, 0].item() for seg in per_sample} == {0.0, 2.0}
    batched = dp(torch.ones(64, 3, 2))
    assert all(torch.all(b == b[0, 0]) for b in batched) and 0 < (batched[:, 0, 0] == 0).sum() < 64


@pytest.mark.parametrize("kwargs,name", [
    (dict(num_heads=[3, 5]), r"num_heads\[1\]=5 must divide attn_dims\[1\]=48"),
    (dict(num_heads=[3, 3], attn_dims=[48, 64]), r"num_heads\[1\]=3 must divide attn_dims\[1\]=64"),
    (dict(num_heads=[3, 3, 3]), "num_heads"),
    (dict(num_heads=0), "num_heads"),
    (dict(attn_dims=[48, 0]), r"attn_dims\[1\]"),
    (dict(mlp_dims=[96]), "mlp_dims"),
    (dict(mlp_dims=[96, 2.5]), r"mlp_dims\[1\]"),
    (dict(img_size=30), "img_size"),
    (dict(patch_size=0), "patch_size"),
    (dict(embed_dim=0), "embed_dim"),
    (dict(depth=-1), "depth"),
    (dict(num_classes=-1), "num_classes"),
    (dict(in_chans=0), "in_chans"),
    (dict(mlp_ratio=0.0), "mlp_ratio"),
    (dict(global_pool="map"), "global_pool"),
    (dict(act_layer="gelu_erf"), "act_layer"),
    (dict(reg_tokens=-1), "reg_tokens"),
    (dict(distilled=True, reg_tokens=4), "distilled"),
    (dict(init_values="1e-5"), "init_values"),
    (dict(class_token=False), "class_token"),
    (dict(drop_path_rate=-0.1), "drop_path_rate"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(backend="cudnn"), "backend"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ViT(**{**SMALL, **kwargs})
