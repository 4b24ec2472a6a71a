"""Against real timm (skipped when timm does not import; nothing is installed at test time):
``patch_timm`` on timm ViTs gives the same logits and gradients as the unpatched model (fp32 and
fp64), with timm's masks, ``forward_intermediates``, ``features_only``, FX feature extraction and
TorchScript; ``timm.create_model(..., attn_layer=asvit_kernels.nn.Attention)``; models with
attention classes of their own are left alone; gated attention keeps its gate.

timm is imported through ``_timm.import_timm`` (its docstring says what the torchvision workaround
does).
"""
import copy
import inspect

import pytest
import torch
from torch import nn

from asvit_kernels.nn import Attention, count_patched, patch_timm

from _timm import import_timm
from _util import rel_err

timm = import_timm()
if timm is None:
    pytest.skip("timm does not import", allow_module_level=True)

# name -> input size (small, so a CPU run stays short; the position embedding is built for it)
MODELS = {"vit_tiny_patch16_224": 32, "vit_small_patch16_224": 32, "deit_tiny_patch16_224": 32,
          "vit_base_patch16_224": 32, "vit_small_patch14_reg4_dinov2": 28}
_BUILT = {}


def _model(name):
    """A timm model (pretrained=False, fixed seed), built once per session; callers deep-copy it."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = timm.create_model(name, pretrained=False, img_size=MODELS[name], num_classes=7).eval()
    return _BUILT[name]


def _logits_and_grads(model, x, cot):
    model.zero_grad()
    out = model(x)
    (out * cot.to(out.dtype)).sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_patched_matches_unpatched_logits_and_grads(name):
    """fp64: patched equals unpatched to 1e-10. fp32: the patched model's error against the fp64
    model is at most 2x the unpatched fp32 model's error plus 1e-6 (flash-attn's criterion)."""
    base = _model(name)
    size = MODELS[name]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, size, size, generator=g, dtype=torch.float64)
    cot = torch.randn(2, 7, generator=g, dtype=torch.float64)
    ref64 = copy.deepcopy(base).double()
    out_ref, grads_ref = _logits_and_grads(ref64, x, cot)
    patched64, n = patch_timm(copy.deepcopy(base).double(), return_count=True)
    assert n == len(base.blocks) == count_patched(patched64)
    out, grads = _logits_and_grads(patched64, x, cot)
    assert rel_err(out, out_ref) <= 1e-10
    assert grads.keys() == grads_ref.keys()
    for k in grads:
        assert rel_err(grads[k], grads_ref[k]) <= 1e-10, k

    out32_ref, grads32_ref = _logits_and_grads(copy.deepcopy(base), x.float(), cot)
    patched32 = patch_timm(copy.deepcopy(base))
    out32, grads32 = _logits_and_grads(patched32, x.float(), cot)
    assert rel_err(out32, out_ref) <= 2 * rel_err(out32_ref, out_ref) + 1e-6
    for k in grads32:
        assert rel_err(grads32[k], grads_ref[k]) <= 2 * rel_err(grads32_ref[k], grads_ref[k]) + 1e-6, k


def test_timm_masks_and_causal_through_the_patched_model():
    """timm >= 1.0.26 passes attn_mask / is_causal down to every block: a key-padding mask (the
    kernel path), a general additive mask (the SDPA fallback) and is_causal, patched vs unpatched."""
    base = copy.deepcopy(_model("vit_tiny_patch16_224")).double()
    patched = patch_timm(copy.deepcopy(base))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    N = 1 + 4
    keep = torch.ones(2, N, dtype=torch.bool)
    keep[1, 3:] = False
    general = torch.randn(2, 1, N, N, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    accepted = inspect.signature(base.forward).parameters  # older timm has no is_causal / attn_mask here
    if "attn_mask" not in accepted:
        pytest.skip(f"timm {timm.__version__}'s VisionTransformer.forward takes no attn_mask")
    for kwargs in (dict(attn_mask=keep[:, None, None, :]), dict(attn_mask=general), dict(is_causal=True)):
        if set(kwargs) <= set(accepted):
            assert rel_err(patched(x, **kwargs), base(x, **kwargs)) <= 1e-10, kwargs


def test_forward_intermediates_and_features_only():
    base = _model("vit_small_patch14_reg4_dinov2")
    patched = patch_timm(copy.deepcopy(base))
    x = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(4))
    fin, inter = base.forward_intermediates(x, indices=[1, 3, 5])
    pfin, pinter = patched.forward_intermediates(x, indices=[1, 3, 5])
    assert rel_err(pfin, fin) <= 1e-5 and len(pinter) == len(inter) == 3
    for a, b in zip(pinter, inter):
        assert a.shape == b.shape and rel_err(a, b) <= 1e-5
    torch.manual_seed(0)
    feats = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, features_only=True,
                              out_indices=(2, 11)).eval()
    xx = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    want = feats(xx)
    got = patch_timm(copy.deepcopy(feats), return_count=True)
    assert got[1] == 12
    for a, b in zip(got[0](xx), want):
        assert rel_err(a, b) <= 1e-5


def test_fx_feature_extraction_and_torchscript_of_a_patched_model():
    from timm.models import create_feature_extractor
    base = _model("deit_tiny_patch16_224")
    patched = patch_timm(copy.deepcopy(base))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    nodes = ["blocks.3", "norm"]
    want = create_feature_extractor(base, return_nodes=nodes)(x)
    got = create_feature_extractor(patched, return_nodes=nodes)(x)  # our Attention is an FX leaf
    for k in nodes:
        assert rel_err(got[k], want[k]) <= 1e-5
    scripted = torch.jit.script(patched)
    assert rel_err(scripted(x), base(x)) <= 1e-5


def test_create_model_with_our_attention_layer():
    torch.manual_seed(0)
    ours = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=7,
                             attn_layer=Attention).eval()
    assert count_patched(ours) == 12
    base = _model("deit_tiny_patch16_224")  # same architecture
    ours.load_state_dict(base.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    assert rel_err(ours(x), base(x)) <= 1e-5
    # qk_norm: timm hands its norm_layer to the attention layer
    torch.manual_seed(0)
    qk = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=7, qk_norm=True).eval()
    qk_ours = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=7, qk_norm=True,
                                attn_layer=Attention).eval()
    qk_ours.load_state_dict(qk.state_dict(), strict=True)
    assert rel_err(qk_ours(x), qk(x)) <= 1e-5


def test_models_with_their_own_attention_are_left_alone():
    """tiny_vit's Attention is not timm.layers.Attention (its logits were off by 1.36 once swapped)."""
    torch.manual_seed(0)
    m = timm.create_model("tiny_vit_5m_224", pretrained=False, num_classes=7).eval()
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    before = m(x)
    m2, n = patch_timm(m, return_count=True)
    assert m2 is m and n == 0 and torch.equal(m(x), before)


def test_gated_attention_keeps_its_gate_and_unknown_children_are_refused():
    from timm.layers import Attention as TimmAttention
    if "gated" not in TimmAttention.__init__.__code__.co_varnames:
        pytest.skip("this timm's Attention has no gated option")
    torch.manual_seed(0)
    model = nn.Sequential(TimmAttention(48, 4, qkv_bias=True, gated=True)).eval()
    x = torch.randn(2, 9, 48)
    before, keys = model(x), set(model.state_dict())
    patch_timm(model)
    assert isinstance(model[0], Attention) and set(model.state_dict()) == keys and "0.gate.weight" in keys
    assert rel_err(model(x), before) <= 1e-5
    odd = TimmAttention(48, 4)
    odd.rope = nn.Identity()  # a child ours would not use
    with pytest.raises(ValueError, match="rope"):
        patch_timm(nn.Sequential(odd))


def test_bf16_cpu_autocast_on_a_patched_model():
    base = _model("vit_tiny_patch16_224")
    patched = patch_timm(copy.deepcopy(base))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = patched(x), base(x)
    got.float().sum().backward()
    assert got.dtype == want.dtype and rel_err(got, want) <= 3e-2
