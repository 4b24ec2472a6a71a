"""As-ViT: the genotype and its search space, window attention against a plain loop over windows,
stage shapes, re-tokenization, the LayerNorm switch, the NTK fast path and the Large model's size."""
import math
import random

import pytest
import torch
from torch import nn

import asvit_kernels as ak
from asvit_kernels.models.asvit import AsViT, WindowAttention, same_padding, window_layout
from asvit_kernels.models.genotype import DIMENSIONS, LARGE, SEED, SPACE, Genotype, space_size
from asvit_kernels.reference import ntk_loop

from _util import rel_err

TINY = "4,2,3|2,2,2|3,1,4|4,1,2|16"  # K1 = 4, odd K3, windows in stages 1-2


def tiny(genotype: str = TINY, embed_dim: int = 8, img_size: int = 32, **kw) -> AsViT:
    torch.manual_seed(0)
    return AsViT.from_genotype(genotype, embed_dim=embed_dim, img_size=img_size, num_classes=5, **kw)


def stage_outputs(model: AsViT, x: torch.Tensor, with_output: bool = False):
    """Shapes (B, H, W, C) leaving each stage (and the logits, if asked), from one no-grad forward."""
    shapes = []
    hooks = [s.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape))) for s in model.stages]
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        for h in hooks:
            h.remove()
    assert out.shape == (x.shape[0], model.num_classes)
    return (shapes, out) if with_output else shapes


# ----------------------------------------------------------------------------- genotype

def test_space_size_and_order():
    assert space_size() == 4_556_250
    assert DIMENSIONS == ("K1", "K2", "K3", "K4", "S1", "S2", "S3", "S4", "E1", "E2", "E3", "E4", "H")
    assert math.prod(len(SPACE[d]) for d in DIMENSIONS) == 4_556_250


@pytest.mark.parametrize("s", [SEED, LARGE])
def test_paper_strings_round_trip(s):
    g = Genotype.parse(s)
    assert str(g) == s == g.to_string()
    assert Genotype.parse(str(g)) == g
    assert g.validate() is g


def test_large_fields():
    g = Genotype.parse(LARGE)
    assert (g.kernels, g.splits, g.expansions, g.depths) == ((8, 4, 4, 4), (2, 1, 1, 1), (3, 2, 4, 6), (5, 2, 5, 2))
    assert (g.heads, g.hidden) == (32, 180)
    assert g.widths == (180, 360, 720, 1024) and g.stage_heads == (4, 8, 16, 32)
    seed = Genotype.parse(SEED)
    assert (seed.depths, seed.hidden) == ((1, 1, 1, 1), 32)


def test_canonical_form_omits_defaults():
    g = Genotype.parse("8,2,3,1|4,1,2,1|4,1,4,1|4,1,6,1|32,32")
    assert g == Genotype.parse(SEED) and str(g) == SEED
    mixed = Genotype.parse("8,2,3,2|4,1,2|4,1,4|4,1,6|32")  # a stage without L has depth 1
    assert mixed.depths == (2, 1, 1, 1) and str(mixed) == "8,2,3,2|4,1,2,1|4,1,4,1|4,1,6,1|32"


def test_random_genotypes_round_trip():
    rng = random.Random(0)
    for _ in range(200):
        idx = tuple(rng.randrange(len(SPACE[d])) for d in DIMENSIONS)
        g = Genotype.from_choices(idx, depths=tuple(rng.randint(1, 4) for _ in range(4)),
                                  hidden=rng.choice([8, 9, 32, 33, 180]))
        assert Genotype.parse(str(g)) == g
        assert g.to_indices() == idx
        assert Genotype.from_choices(g.to_choices(), depths=g.depths, hidden=g.hidden) == g


@pytest.mark.parametrize("s, err, match", [
    ("8,2,3|4,1,2|4,1,4|32", ValueError, "5 '\\|'-separated fields"),
    ("8,2,3|4,1|4,1,4|4,1,6|32", ValueError, "stage 2: expected 3 or 4 comma-separated ints, got '4,1'"),
    ("8,2,3|4,1,2|4,1,4,5,6|4,1,6|32", ValueError, "stage 3: expected 3 or 4"),
    ("8,2,x|4,1,2|4,1,4|4,1,6|32", ValueError, "stage 1: expected comma-separated ints"),
    ("8,2,3|4,1,2|4,1,4|4,1,6|", ValueError, "H field"),
    ("8,2,3|4,1,2|4,1,4|4,1,6|32,180,1", ValueError, "H field: expected H or H,hidden"),
    ("0,2,3|4,1,2|4,1,4|4,1,6|32", ValueError, "K1 must be >= 1"),
    ("8,2,3|4,0,2|4,1,4|4,1,6|32", ValueError, "S2 must be >= 1"),
    ("8,2,3,1|4,1,2,1|4,1,4,0|4,1,6,1|32", ValueError, "L3 must be >= 1"),
    ("8,2,3|4,1,2|4,1,4|4,1,6|0", ValueError, "H \\(heads\\) must be >= 1"),
    ("8,2,3|4,1,2|4,1,4|4,1,6|32,0", ValueError, "hidden must be >= 1"),
    ("8,2,3|4,1,2|4,1,4|4,1,6|64,4", ValueError, "hidden=4 is too narrow for H=64"),
])
def test_malformed_strings(s, err, match):
    with pytest.raises(err, match=match):
        Genotype.parse(s)


def test_bad_types():
    with pytest.raises(TypeError, match="genotype"):
        Genotype.parse(123)
    with pytest.raises(ValueError, match="kernels"):
        Genotype((8, 4, 4), (2, 1, 1, 1), (3, 2, 4, 6), 32)
    with pytest.raises(TypeError, match="heads"):
        Genotype((8, 4, 4, 4), (2, 1, 1, 1), (3, 2, 4, 6), 32.0)
    with pytest.raises(TypeError, match="choices"):
        Genotype.from_choices("K1")


OUT_OF_SPACE = {"K1": 9, "K2": 5, "K3": 1, "K4": 6, "S1": 1, "S2": 8, "S3": 4, "S4": 2,
                "E1": 1, "E2": 7, "E3": 8, "E4": 9, "H": 48}


@pytest.mark.parametrize("dim", DIMENSIONS)
def test_validate_names_the_field(dim):
    choices = Genotype.parse(SEED).to_choices()
    choices[dim] = OUT_OF_SPACE[dim]
    g = Genotype.from_choices(choices)  # structurally fine: only validate() checks the space
    with pytest.raises(ValueError, match=f"^{dim} must be one of \\({', '.join(map(str, SPACE[dim]))},?\\), "
                                         f"got {OUT_OF_SPACE[dim]}$"):
        g.validate()
    assert g.validate(in_space=False) is g
    with pytest.raises(ValueError, match=dim):
        g.to_indices()


def test_validate_message_example():
    with pytest.raises(ValueError, match=r"^K2 must be one of \(2, 3, 4\), got 5$"):
        Genotype.parse("8,2,3|5,1,2|4,1,4|4,1,6|32").validate()


def test_from_choices_errors():
    with pytest.raises(ValueError, match="index for S3"):
        Genotype.from_choices((0,) * 6 + (2,) + (0,) * 6)
    with pytest.raises(ValueError, match="13 indices"):
        Genotype.from_choices((0,) * 12)
    with pytest.raises(ValueError, match="missing \\['H'\\]"):
        Genotype.from_choices({d: SPACE[d][0] for d in DIMENSIONS if d != "H"})


def test_with_replaces_and_rechecks():
    g = Genotype.parse(SEED).with_(depths=(2, 1, 3, 1), hidden=40)
    assert str(g) == "8,2,3,2|4,1,2,1|4,1,4,3|4,1,6,1|32,40"
    with pytest.raises(ValueError, match="L2"):
        g.with_(depths=(1, 0, 1, 1))


# ----------------------------------------------------------------------------- window attention

def loop_window_attention(attn: WindowAttention, x: torch.Tensor) -> torch.Tensor:
    """The definition, window by window: softmax(q k^T / sqrt(d)) v per head, edge windows smaller."""
    B, H, W, C = x.shape
    h, d = attn.num_heads, attn.head_dim
    wh, ww = max(1, H // attn.split), max(1, W // attn.split)
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv[..., :h * d], qkv[..., h * d:2 * h * d], qkv[..., 2 * h * d:]
    out = torch.zeros(B, H, W, h * d, dtype=x.dtype)
    for b in range(B):
        for r in range(0, H, wh):
            for c in range(0, W, ww):
                win = (b, slice(r, r + wh), slice(c, c + ww))
                qw, kw, vw = (t[win].reshape(-1, h, d).transpose(0, 1) for t in (q, k, v))
                p = torch.softmax(qw @ kw.transpose(1, 2) / math.sqrt(d), dim=-1)
                n_r, n_c = out[win].shape[:2]
                out[win] = (p @ vw).transpose(0, 1).reshape(n_r, n_c, h * d)
    return out @ attn.proj.weight.T + attn.proj.bias


def _randomized(attn: WindowAttention) -> WindowAttention:
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.5)  # large enough that the softmax is far from uniform
    return attn


GRIDS = [(8, 8, 2), (7, 7, 2), (5, 7, 2), (7, 5, 4), (6, 9, 1), (3, 3, 8)]


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("H, W, split", GRIDS)
def test_window_attention_matches_loop(H, W, split, dtype, tol):
    torch.manual_seed(H * 10 + W + split)
    attn = _randomized(WindowAttention(12, 3, split)).to(dtype)
    x = torch.randn(2, H, W, 12, dtype=dtype, requires_grad=True)
    out, ref = attn(x), loop_window_attention(attn, x)
    assert rel_err(out, ref) <= tol
    dy = torch.randn_like(out)
    params = list(attn.parameters())
    got = torch.autograd.grad(out, [x] + params, dy)
    want = torch.autograd.grad(ref, [x] + params, dy)
    for g, w in zip(got, want):
        assert rel_err(g, w) <= tol


def test_window_attention_floors_head_dim():
    attn = _randomized(WindowAttention(10, 4, 1)).double()  # head dim 2, q/k/v 8 wide
    assert attn.qkv.out_features == 24 and attn.proj.in_features == 8
    x = torch.randn(1, 3, 4, 10, dtype=torch.float64)
    assert rel_err(attn(x), loop_window_attention(attn, x)) <= 1e-10
    with pytest.raises(ValueError, match="num_heads"):
        WindowAttention(3, 4, 1)


def test_window_layout_ragged_and_cached():
    perm, inverse, cu, max_len = window_layout(7, 7, 3, 3, 2, torch.device("cpu"))
    sizes = (cu[1:] - cu[:-1]).tolist()
    assert sizes == [9, 9, 3, 9, 9, 3, 3, 3, 1] * 2 and cu.dtype == torch.int32 and max_len == 9
    assert torch.equal(perm[inverse], torch.arange(49))
    assert perm[:9].tolist() == [0, 1, 2, 7, 8, 9, 14, 15, 16]  # first window, row-major
    assert window_layout(7, 7, 3, 3, 2, torch.device("cpu"))[0] is perm
    single = window_layout(4, 6, 4, 6, 3, torch.device("cpu"))
    assert single[0] is None and single[2].tolist() == [0, 24, 48, 72]


# ----------------------------------------------------------------------------- stages and shapes

def test_seed_stages_at_224():
    seed = AsViT.from_genotype(SEED)
    info = seed.stage_info()
    assert [s["grid"] for s in info] == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert [s["width"] for s in info] == [32, 64, 128, 256]
    assert [s["heads"] for s in info] == [4, 8, 16, 32]
    assert [s["window"] for s in info] == [(28, 28), (28, 28), (14, 14), (7, 7)]
    assert [b.attn.num_heads for st in seed.stages for b in st.blocks] == [4, 8, 16, 32]
    assert seed.genotype == Genotype.parse(SEED)
    narrow = AsViT.from_genotype(SEED, embed_dim=8)  # same topology, cheap to run at 224
    shapes = stage_outputs(narrow.eval(), torch.randn(1, 3, 224, 224))
    assert shapes == [(1, 56, 56, 8), (1, 28, 28, 16), (1, 14, 14, 32), (1, 7, 7, 64)]


def test_layer_shapes():
    m = AsViT.from_genotype(LARGE, device="meta")
    conv = m.stages[0].tokenizer.proj
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (3, 180, (8, 8), (4, 4))
    merge = m.stages[3].tokenizer
    assert merge.norm.normalized_shape == (16 * 720,) and merge.reduction.weight.shape == (1024, 16 * 720)
    assert merge.reduction.bias is None
    assert [len(s.blocks) for s in m.stages] == [5, 2, 5, 2]
    assert m.stages[2].blocks[0].mlp.fc1.out_features == 4 * 720


def test_small_and_odd_inputs():
    m = tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    assert stage_outputs(m, x) == [(2, 8, 8, 8), (2, 4, 4, 16), (2, 2, 2, 32), (2, 1, 1, 64)]
    assert stage_outputs(m, torch.randn(2, 3, 20, 36))[0][1:3] == (5, 9)
    assert m.stage_grids((20, 36)) == [(5, 9), (3, 5), (2, 3), (1, 2)]
    with pytest.raises(ValueError, match="img size 16x16"):
        m(torch.randn(1, 3, 16, 16))
    with pytest.raises(ValueError, match="img size"):
        tiny(img_size=12)
    with pytest.raises(ValueError, match="x must be"):
        m(torch.randn(1, 4, 32, 32))


def test_samples_do_not_interact():
    m = tiny().eval()
    x = torch.randn(3, 3, 32, 32)
    y = x.clone()
    y[1:] = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(m(x)[0], m(y)[0], atol=1e-6)


def test_init():
    m = tiny(embed_dim=16)
    for mod in m.modules():
        if isinstance(mod, nn.Linear):
            assert abs(mod.weight.std().item() - 0.02) < 0.01
            assert mod.bias is None or not mod.bias.any()
        elif isinstance(mod, nn.LayerNorm):
            assert (mod.weight == 1).all() and not mod.bias.any()


def test_backward_and_drop_path():
    m = tiny(drop_path_rate=0.2).train()
    m(torch.randn(2, 3, 32, 32)).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    m.eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m(x), m(x))


def test_genotype_property_round_trips():
    m = AsViT.from_genotype(SEED, embed_dim=16, depths=(2, 1, 1, 1), device="meta")
    assert str(m.genotype) == "8,2,3,2|4,1,2,1|4,1,4,1|4,1,6,1|32,16"
    again = AsViT.from_genotype(m.genotype, device="meta")
    assert [(n, p.shape) for n, p in again.named_parameters()] == [(n, p.shape) for n, p in m.named_parameters()]


def test_constructor_errors():
    with pytest.raises(TypeError, match="genotype"):
        AsViT.from_genotype(123)
    with pytest.raises(ValueError, match="num_classes"):
        AsViT.from_genotype(TINY, num_classes=-1)
    with pytest.raises(ValueError, match="drop_path_rate"):
        AsViT.from_genotype(TINY, drop_path_rate=1.5)
    with pytest.raises(ValueError, match="hidden"):
        AsViT.from_genotype(TINY, embed_dim=1)
    with pytest.raises(ValueError, match="L1"):
        AsViT.from_genotype(TINY, depths=(0, 1, 1, 1))


# ----------------------------------------------------------------------------- re-tokenization

@pytest.mark.parametrize("k1", [4, 5, 6, 7, 8])
@pytest.mark.parametrize("stride, dilation, grid", [(16, 5, 14), (8, 2, 28), (4, 1, 56)])
def test_tokenizer_grids_at_224(k1, stride, dilation, grid):
    m = AsViT.from_genotype(f"{k1},2,3|4,1,2|4,1,4|4,1,6|32", embed_dim=4, num_classes=0)
    tok = m.set_tokenization(stride, dilation).stages[0].tokenizer
    assert m.tokenization == (stride, dilation)
    with torch.no_grad():
        assert tok(torch.randn(1, 3, 224, 224)).shape == (1, grid, grid, 4)
    assert m.stage_grids()[0] == (grid, grid)


def test_same_padding_matches_released_pad_at_stride_4():
    for k in range(4, 9):
        assert same_padding(224, k, 4, 1) == ((k - 4) // 2, (k - 3) // 2, 56)


def test_set_tokenization_forward_and_windows():
    m = AsViT.from_genotype(SEED, embed_dim=8, num_classes=3).eval()
    weight = m.stages[0].tokenizer.proj.weight
    x = torch.randn(1, 3, 224, 224)
    expected = {(16, 5): [14, 7, 4, 2], (8, 2): [28, 14, 7, 4], (4, 1): [56, 28, 14, 7]}
    outs = []
    for (stride, dilation), sides in expected.items():
        m.set_tokenization(stride=stride, dilation=dilation)
        assert m.stages[0].tokenizer.proj.weight is weight
        shapes, out = stage_outputs(m, x, with_output=True)
        assert [s[1] for s in shapes] == sides
        assert m.stage_info()[0]["window"] == (sides[0] // 2, sides[0] // 2)  # S1 = 2: windows follow
        outs.append(out)
    assert not torch.allclose(outs[0], outs[2])
    assert m.tokenization == (4, 1)
    with pytest.raises(ValueError, match="stride"):
        m.set_tokenization(0, 1)
    with pytest.raises(TypeError, match="dilation"):
        m.set_tokenization(4, 1.5)


# ----------------------------------------------------------------------------- LayerNorm switch

def test_set_norm():
    m = tiny().double().eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    keys = list(m.state_dict())
    with torch.no_grad():
        on = m(x)
        calls = []
        hooks = [ln.register_forward_hook(lambda *a: calls.append(1)) for ln in m.modules()
                 if isinstance(ln, nn.LayerNorm)]
        m.set_norm(False)
        off = m(x)
        assert not calls and not m.norm_enabled
        assert list(m.state_dict()) == keys
        m.set_norm(True)
        again = m(x)
        for h in hooks:
            h.remove()
    assert not torch.allclose(on, off)
    assert torch.equal(on, again)
    assert len(calls) == sum(isinstance(ln, nn.LayerNorm) for ln in m.modules())
    with pytest.raises(TypeError, match="enabled"):
        m.set_norm(1)


# ----------------------------------------------------------------------------- NTK

@pytest.mark.parametrize("features", [False, True], ids=["logits", "features"])
def test_ntk_fast_path_matches_loop(features):
    m = tiny().double().eval()
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    fn = (lambda model, inp: model.forward_features(inp)) if features else None
    K, info = ak.ntk(m, x, output_fn=fn, params="weights", return_info=True)
    ref = ntk_loop(m, x, fn, lambda n, p: "weight" in n)
    assert rel_err(K, ref) <= 1e-6
    assert info["path"] == "fast", info["reason"]


# ----------------------------------------------------------------------------- size

def expected_params(g: Genotype, num_classes: int) -> int:
    """Closed-form parameter count of the architecture described in models/asvit.py."""
    w, k = g.widths, g.kernels
    total = 3 * k[0] ** 2 * w[0] + w[0] + 2 * w[0]                   # conv + bias, LayerNorm
    for i in range(1, 4):
        total += 2 * k[i] ** 2 * w[i - 1] + k[i] ** 2 * w[i - 1] * w[i]  # merge LayerNorm, Linear
    for i in range(4):
        d, inner, e = w[i], (w[i] // g.stage_heads[i]) * g.stage_heads[i], g.expansions[i]
        block = 4 * d + (3 * inner * d + 3 * inner) + (inner * d + d) + (2 * e * d * d + e * d + d)
        total += g.depths[i] * block
    c = w[3]
    return total + 2 * c + (c * c + c) + (c * num_classes + num_classes)   # final norm, head


def test_large_param_count():
    g = Genotype.parse(LARGE)
    m = AsViT.from_genotype(g, num_classes=1000, img_size=224, device="meta")
    n = sum(p.numel() for p in m.parameters())
    assert n == expected_params(g, 1000) == 87_580_820   # paper: about 88M
    seed = Genotype.parse(SEED)
    assert sum(p.numel() for p in AsViT.from_genotype(seed, device="meta").parameters()) == \
        expected_params(seed, 1000)


def test_ntk_over_initializations_and_length_distortion():
    """kappa's R initialisations share one vmapped fast pass; L^E (norms off) by JVP matches the loop."""
    models = [tiny().double().eval() for _ in range(2)]
    with torch.no_grad():
        for p in models[1].parameters():
            p.mul_(1.5)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    fn = lambda model, inp: model.forward_features(inp)  # noqa: E731
    K, info = ak.ntk(models, x, output_fn=fn, params="weights", return_info=True)
    assert info["path"] == "fast", info["reason"]
    for k, m in zip(K, models):
        assert rel_err(k, ntk_loop(m, x, fn, "weights")) <= 1e-6
    m = models[0].set_norm(False)
    points, tangents = (t.double() for t in ak.circle_curve((3, 32, 32), 3))
    got = ak.length_distortion(m, points, tangents, output_fn=fn)
    want = ak.reference.length_distortion_loop(m, points, tangents, fn)
    assert abs(got - want) <= 1e-8 * want
