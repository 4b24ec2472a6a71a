"""ElasticViT: a sub-network of the supernet equals its extracted dense ViT and an independent dense
computation (every sharing rule, wrapping cyclic ranges, private q/k, identity layers); the forward
copies no weight slice; gradients reach only the used channels; validation, sampling, MAC count."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

from asvit_kernels import reference
from asvit_kernels.models.elastic_vit import ElasticViT
from asvit_kernels.models.subnet import SubnetConfig, SubnetSpace, sample_subnet, subnet_flops, width_range
from asvit_kernels.models.vit import ViT
from asvit_kernels.ranges import channel_indices

from _util import rel_err

SPACE = SubnetSpace.tiny()
# Under cyclic sharing every width here wraps: embed 36 -> (24, 36), q/k/v 24 -> (16, 24),
# 32 -> (8, 32), MLP 96 -> (80, 96).
WRAPPING = SubnetConfig(8, 36, (3, 4, 2), (24, 32, 16), (96, 48, 32))


def supernet(sharing="first", private_qk=False, seed=0, dtype=torch.float64, softmax_scale=None) -> ElasticViT:
    """A tiny supernet with every parameter random (biases and LayerNorm affines included), so a
    wrong channel anywhere changes the output."""
    torch.manual_seed(seed)
    m = ElasticViT(SPACE, img_size=32, num_classes=10, sharing=sharing, private_qk=private_qk,
                   softmax_scale=softmax_scale).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def dense_reference(m: ElasticViT, cfg: SubnetConfig, x: torch.Tensor) -> torch.Tensor:
    """The sub-network written out with plain torch ops on gathered weights (no elastic op, no ViT)."""
    r = m.channel_ranges(cfg)
    e = channel_indices(r.embed, m.max_embed)
    p, key, Q, eps = cfg.patch_size, str(cfg.patch_size), m.max_qkv, m.norm_eps
    pe = m.patch_embed[key]
    t = F.conv2d(x, pe.weight[e].reshape(-1, 3, p, p), pe.bias[e], stride=p).flatten(2).transpose(1, 2)
    t = torch.cat([m.cls_token[key][..., e].expand(len(x), -1, -1), t], 1) + m.pos_embed[key][..., e]
    d = len(e)
    for l in range(cfg.depth):
        blk, H = m.blocks[l], cfg.heads[l]
        q, mm = channel_indices(r.qkv[l], Q), channel_indices(r.mlp[l], m.max_mlp)
        if m.private_qk:  # one block of 2w q/k rows: q its first half, k its second (released ViTAS)
            qk, v = blk.attn.qk[str(H)], blk.attn.v
            w = len(q)
            qkr = channel_indices(r.qk[l], 2 * Q)
            Wq, Wk, Wv = qk.weight[qkr[:w]], qk.weight[qkr[w:]], v.weight[q]
            bq, bk, bv = qk.bias[qkr[:w]], qk.bias[qkr[w:]], v.bias[q]
        else:
            W, b = blk.attn.qkv.weight, blk.attn.qkv.bias
            Wq, Wk, Wv, bq, bk, bv = W[q], W[q + Q], W[q + 2 * Q], b[q], b[q + Q], b[q + 2 * Q]
        h = F.layer_norm(t, (d,), blk.norm1.weight[e], blk.norm1.bias[e], eps)

        def split(W, b):  # (B, N, H*hd) -> (B, H, N, hd)
            return F.linear(h, W[:, e], b).unflatten(-1, (H, -1)).transpose(1, 2)

        qq, kk, vv = split(Wq, bq), split(Wk, bk), split(Wv, bv)
        scale = qq.shape[-1] ** -0.5 if m.softmax_scale is None else m.softmax_scale
        att = torch.softmax(qq @ kk.transpose(-1, -2) * scale, -1) @ vv
        t = t + F.linear(att.transpose(1, 2).flatten(2), blk.attn.proj.weight[e][:, q], blk.attn.proj.bias[e])
        h = F.layer_norm(t, (d,), blk.norm2.weight[e], blk.norm2.bias[e], eps)
        fc1, fc2 = blk.mlp["fc1"], blk.mlp["fc2"]
        t = t + F.linear(F.gelu(F.linear(h, fc1.weight[mm][:, e], fc1.bias[mm])), fc2.weight[e][:, mm], fc2.bias[e])
    t = F.layer_norm(t, (d,), m.norm.weight[e], m.norm.bias[e], eps)
    return F.linear(t[:, 0], m.head.weight[:, e], m.head.bias)


def configs():
    g = torch.Generator().manual_seed(123)
    return [WRAPPING, SPACE.largest(), SPACE.largest(patch_size=16)] + [sample_subnet(g, SPACE) for _ in range(3)]


@pytest.mark.parametrize("softmax_scale", [None, 0.3], ids=["head_dim_scale", "fixed_scale"])
@pytest.mark.parametrize("private_qk", [False, True], ids=["shared_qk", "private_qk"])
@pytest.mark.parametrize("sharing", ["first", "last", "cyclic"])
def test_subnet_equals_extracted_vit_and_dense_reference(sharing, private_qk, softmax_scale):
    m = supernet(sharing, private_qk, softmax_scale=softmax_scale)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for cfg in configs():
        m.set_subnet(cfg)
        y = m(x)
        vit = m.extract_subnet(cfg)
        assert isinstance(vit, ViT) and vit.depth == cfg.depth and vit.embed_dim == cfg.embed_dim
        assert vit.num_heads == list(cfg.heads) and vit.attn_dims == list(cfg.qkv_dim)
        assert rel_err(y, vit(x)) <= 1e-10, cfg
        assert rel_err(y, dense_reference(m, cfg, x)) <= 1e-10, cfg
    if sharing == "cyclic":  # the wrapping ranges this test relies on really wrap
        r = m.channel_ranges(WRAPPING)
        assert r.embed == (24, 36) and r.qkv[:2] == ((16, 24), (8, 32)) and r.mlp[0] == (80, 96)


def test_full_width_cyclic_ranges_run_in_natural_order():
    """A full-width cyclic range (embed 48 at 12, MLP 96 at 80, q/k/v 32 at 8) is a rotation: the ops
    get the plain range (0, C) (no wrapped gather), except q/k/v whose offset is not a whole number
    of heads (2 heads of 16: 8 would split heads) and private q/k; outputs, features (in the
    config's channel order) and gradients still match the extracted ViT."""
    for private_qk in (False, True):
        m = supernet("cyclic", private_qk)
        cfg = SubnetConfig(8, 48, (2, 4), (32, 32), (96, 96))
        m.set_subnet(cfg)
        r = m.channel_ranges(cfg)
        assert r.embed == (12, 48) and r.qkv == ((8, 32), (8, 32)) and r.mlp == ((80, 96), (80, 96))
        b0, b1 = m.blocks[0], m.blocks[1]
        assert b0.norm1.channel_range == (0, 48) and m.head.in_range == (0, 48)
        assert b1.mlp["fc1"].out_range == ((0, 96),) and b1.mlp["fc2"].in_range == (0, 96)
        if private_qk:
            assert b1.attn.v.out_range == ((8, 32),) and b1.attn.proj.in_range == (8, 32)
        else:
            assert b0.attn.proj.in_range == (8, 32) and b1.attn.proj.in_range == (0, 32)
            assert b1.attn.qkv.out_range == ((0, 32), (32, 32), (64, 32))
        x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
        vit = m.extract_subnet(cfg)
        assert rel_err(m.forward_features(x), vit.forward_features(x)) <= 1e-10
        assert rel_err(m(x), vit(x)) <= 1e-10 and rel_err(m(x), dense_reference(m, cfg, x)) <= 1e-10
        m(x).square().sum().backward()
        vit(x).square().sum().backward()
        dense = dict(vit.named_parameters())
        for s in m._slices(cfg):  # each dense gradient is its slice of the supernet's
            g = s.src.grad
            for dim, i in enumerate(s.index):
                if i is not None:
                    g = g.index_select(dim, i)
            want = dense[s.name].grad if s.rows is None else dense[s.name].grad[s.rows]
            assert rel_err(g.reshape(want.shape), want) <= 1e-10, s.name


def test_identity_layers_shift_to_the_end():
    m = supernet("cyclic", private_qk=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    cfg = SubnetConfig(8, 36, (3, 4), (24, 32), (96, 48))
    shifted = SubnetConfig(8, 36, (3, 4), (24, 32), (96, 48), active_layers=(1, 3))
    assert shifted.canonical() == cfg and m.set_subnet(shifted) == cfg
    y = m(x)
    with torch.no_grad():  # slots 2 and 3 are identities: changing them changes nothing
        for p in list(m.blocks[2].parameters()) + list(m.blocks[3].parameters()):
            p.add_(1.0)
    assert torch.equal(m(x), y)
    assert rel_err(y, m.extract_subnet(shifted)(x)) <= 1e-10
    with torch.no_grad():  # slot 1 runs the second active block
        m.blocks[1].mlp["fc2"].bias.add_(torch.randn_like(m.blocks[1].mlp["fc2"].bias))
    assert rel_err(m(x), y) > 1e-3


def test_other_input_sizes_resample_position_embeddings_like_vit():
    m = supernet("cyclic")
    m.set_subnet(WRAPPING)
    x = torch.randn(2, 3, 48, 40, dtype=torch.float64)
    assert rel_err(m(x), m.extract_subnet(WRAPPING)(x)) <= 1e-10
    with pytest.raises(ValueError, match="divisible"):
        m(torch.randn(1, 3, 36, 32, dtype=torch.float64))


def test_load_subnet_writes_a_dense_vit_back_into_its_slices():
    m, before = supernet("cyclic", private_qk=True), supernet("cyclic", private_qk=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    vit = m.extract_subnet(WRAPPING)
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0, 0.3)
    m.load_subnet(WRAPPING, vit)
    m.set_subnet(WRAPPING)
    assert rel_err(m(x), vit(x)) <= 1e-10
    # Outside the config's slices nothing moved: patch 16, slot 3, embed channels 12..23 (36 uses
    # 24..47 and 0..11), the private q/k of 2 heads in layer 0 (it has 3).
    assert torch.equal(m.patch_embed["16"].weight, before.patch_embed["16"].weight)
    assert torch.equal(m.blocks[3].mlp["fc1"].weight, before.blocks[3].mlp["fc1"].weight)
    assert torch.equal(m.norm.weight[12:24], before.norm.weight[12:24])
    assert torch.equal(m.blocks[0].attn.qk["2"].weight, before.blocks[0].attn.qk["2"].weight)
    assert not torch.equal(m.norm.weight[:12], before.norm.weight[:12])
    with pytest.raises(ValueError, match="shape"):
        m.load_subnet(SubnetConfig(16, 24, (2,), (16,), (32,)), vit)


# ----------------------------------------------------------------------------- no weight copies


class StorageLog(TorchDispatchMode):
    """(op, storages of its tensor inputs) for every op dispatched while active (the mode is off
    inside an op, so a custom op is one entry; its kernels are checked by test_zero_copy.py)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((func, {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                                  if isinstance(t, torch.Tensor)}))
        return out


def ops_on(log: StorageLog, tensors) -> set[str]:
    ptrs = {t.untyped_storage().data_ptr() for t in tensors}
    return {str(f) for f, ins in log.calls if ins & ptrs}


ALLOWED = {"asvit.elastic_linear.default", "asvit.elastic_linear_backward.default",
           "asvit.elastic_layer_norm.default", "asvit.elastic_layer_norm_backward.default"}


@pytest.mark.parametrize("private_qk", [False, True], ids=["shared_qk", "private_qk"])
def test_forward_and_backward_copy_no_weight_slice(private_qk):
    m = supernet("cyclic", private_qk, dtype=torch.float32)
    m.set_subnet(WRAPPING)
    weights = [p for n, p in m.named_parameters() if not n.startswith(("cls_token", "pos_embed"))]
    x = torch.randn(2, 3, 32, 32)
    with StorageLog() as log:
        m(x).sum().backward()
    used = ops_on(log, weights)
    assert "asvit.elastic_linear.default" in used and "asvit.elastic_layer_norm.default" in used
    assert used <= ALLOWED, used - ALLOWED
    # The detector sees a gather when there is one: the reference implementation copies the slice.
    fc1 = m.blocks[0].mlp["fc1"]
    with StorageLog() as log:
        reference.elastic_linear(torch.randn(4, 36), fc1.weight, fc1.bias, (24, 36), (80, 96))
    assert ops_on(log, [fc1.weight]) - ALLOWED


def test_gradients_reach_only_the_used_channels():
    m = supernet("first")
    cfg = SubnetConfig(8, 24, (2, 4), (16, 16), (32, 48))
    m.set_subnet(cfg)
    m(torch.randn(2, 3, 32, 32, dtype=torch.float64)).sum().backward()

    def check(grad, used_index):
        mask = torch.zeros_like(grad, dtype=torch.bool)
        mask[used_index] = True
        assert (grad[~mask] == 0).all() and (grad[mask] != 0).all()

    e, Q = slice(0, 24), 32
    blk = m.blocks[0]
    q_rows = torch.cat([torch.arange(16) + k * Q for k in range(3)])
    check(blk.attn.qkv.weight.grad, (q_rows[:, None], torch.arange(24)[None, :]))
    check(blk.attn.proj.weight.grad, (e, slice(0, 16)))
    check(blk.mlp["fc1"].weight.grad, (slice(0, 32), e))
    check(m.blocks[1].mlp["fc2"].weight.grad, (e, slice(0, 48)))
    check(blk.norm1.weight.grad, (e,))
    check(m.pos_embed["8"].grad, (slice(None), slice(None), e))
    check(m.head.weight.grad, (slice(None), e))
    for p in list(m.blocks[2].parameters()) + list(m.patch_embed["16"].parameters()) + [m.pos_embed["16"]]:
        assert p.grad is None


# ----------------------------------------------------------------------------- configs and space


def test_set_subnet_rejects_configs_outside_the_space():
    m = ElasticViT(SPACE, img_size=32, num_classes=10)
    good = dict(patch_size=8, embed_dim=24, heads=(2, 4), qkv_dim=(16, 32), mlp_dim=(32, 48))
    m.set_subnet(SubnetConfig(**good))
    for change, match in [(dict(patch_size=4), "patch_size=4"), (dict(embed_dim=30), "embed_dim=30"),
                          (dict(heads=(2, 8)), "layer 1: heads=8"), (dict(qkv_dim=(16, 20)), "layer 1: qkv_dim=20"),
                          (dict(mlp_dim=(64, 48)), "layer 0: mlp_dim=64"),
                          (dict(heads=(3, 4)), "heads=3 does not divide qkv_dim=16"),
                          (dict(heads=(2,) * 5, qkv_dim=(16,) * 5, mlp_dim=(32,) * 5), "depth=5"),
                          (dict(active_layers=(2, 4)), "slot")]:
        with pytest.raises(ValueError, match=match):
            m.set_subnet(SubnetConfig(**{**good, **change}))
    for bad in [dict(heads=(2,)), dict(active_layers=(1, 1)), dict(embed_dim=0), dict(heads=())]:
        with pytest.raises(ValueError):
            SubnetConfig(**{**good, **bad})
    assert m.config == SubnetConfig(**good)  # a rejected config leaves the active one alone
    with pytest.raises(ValueError, match="sharing"):
        ElasticViT(SPACE, img_size=32, sharing="middle")
    with pytest.raises(ValueError, match="divisible"):
        ElasticViT(SPACE, img_size=40)


def test_sample_subnet_is_deterministic_and_valid():
    draw = lambda seed, **kw: [sample_subnet(torch.Generator().manual_seed(seed), SPACE, **kw)]  # noqa: E731
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = [sample_subnet(g1, SPACE) for _ in range(30)]
    assert a == [sample_subnet(g2, SPACE) for _ in range(30)]
    g3 = torch.Generator().manual_seed(8)
    assert a != [sample_subnet(g3, SPACE) for _ in range(30)]
    for cfg in a:
        assert SPACE.validate(cfg) == cfg
    assert {c.depth for c in a} == set(SPACE.depths) and any(3 in c.heads for c in a)
    assert all(c.depth == 4 for c in draw(0, p_identity=0.0) + draw(1, p_identity=0.0))
    with pytest.raises(ValueError, match="p_identity"):
        draw(0, p_identity=1.5)
    # A ViTAS space at a scale where some (heads, width) pairs do not divide: only valid ones drawn.
    small = SubnetSpace.vitas(0.3)
    assert len(small.usable_qkv_dims) < len(small.qkv_dims)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        small.validate(sample_subnet(g, small, p_identity=0.5))


def test_p_identity_sets_the_depth_distribution():
    g = torch.Generator().manual_seed(0)
    depths = [sample_subnet(g, SPACE, p_identity=0.5).depth for _ in range(4000)]
    # Binomial(4, 1/2) conditioned on depth >= 1: P(d) = C(4, d) / 15.
    for d in SPACE.depths:
        assert abs(depths.count(d) / len(depths) - math.comb(4, d) / 15) < 0.03


def test_vitas_space():
    s = SubnetSpace.vitas()
    assert s.patch_sizes == (14, 16, 32) and s.num_slots == 16 and s.heads == (3, 6, 12, 16)
    assert s.embed_dims == (38, 77, 115, 154, 192, 230, 269, 307, 346, 384)
    assert s.qkv_dims == tuple(range(48, 481, 48)) and s.mlp_dims == tuple(range(144, 1441, 144))
    assert all(s.heads_for(q) == s.heads for q in s.qkv_dims)
    assert s.largest() == SubnetConfig(14, 384, (16,) * 16, (480,) * 16, (1440,) * 16)


def test_width_ranges_per_sharing_rule():
    assert width_range("first", (24, 36, 48), 48, 36) == (0, 36)
    assert width_range("last", (24, 36, 48), 48, 36) == (12, 36)
    assert width_range("cyclic", (24, 36, 48), 48, 36) == (24, 36)
    assert width_range("cyclic", (24, 36, 48), 48, 48) == (12, 48)


def test_subnet_flops_hand_count_and_flop_counter():
    cfg = SubnetConfig(16, 24, (2, 3), (16, 24), (32, 48))
    # 4 patches, N = 5 tokens: patch 4*3*16*16*24; layer 1: 5*24*48 + 2*25*16 + 5*16*24 + 2*5*24*32;
    # layer 2: 5*24*72 + 2*25*24 + 5*24*24 + 2*5*24*48; head 24*10.
    hand = 73728 + (5760 + 800 + 1920 + 7680) + (8640 + 1200 + 2880 + 11520) + 240
    assert subnet_flops(cfg, 32, num_classes=10) == hand
    m = ElasticViT(SPACE, img_size=32, num_classes=10)
    assert m.subnet_flops(cfg) == hand
    # FlopCounterMode counts 2 flops per MAC (convolution, matmuls, and the attention op's QK^T and AV).
    vit = m.extract_subnet(cfg)
    with FlopCounterMode(display=False) as fc:
        vit(torch.randn(1, 3, 32, 32))
    assert fc.get_total_flops() == 2 * hand
    m.set_subnet(cfg)  # the supernet's elastic ops count the same
    with FlopCounterMode(display=False) as fc:
        m(torch.randn(1, 3, 32, 32))
    assert fc.get_total_flops() == 2 * hand


def test_drop_path_spreads_over_the_active_depth_and_is_validated():
    m = ElasticViT(SPACE, img_size=32, num_classes=10, drop_path_rate=0.3)
    assert m.drop_path_rate == 0.3
    probs = lambda: [(b.drop_path1.drop_prob, b.drop_path2.drop_prob) for b in m.blocks]  # noqa: E731
    assert probs() == [(0.3 * i / 3,) * 2 for i in range(4)]
    m.set_subnet(sample_subnet(torch.Generator().manual_seed(0), SubnetSpace(
        (8,), (48,), (2,), (4,), (32,), (96,))))  # depth 2 of the 4 slots
    assert probs() == [(0.0, 0.0), (0.3, 0.3), (0.0, 0.0), (0.0, 0.0)]
    m.set_drop_path(0.1)  # kept across set_subnet, re-spread over the new depth
    m.set_subnet(SPACE.largest())
    assert probs() == [(0.1 * i / 3,) * 2 for i in range(4)]
    m.drop_path_rate = 0.0
    assert all(p == (0.0, 0.0) for p in probs())
    for bad in (-0.1, 1.5, True, "0.1", None):
        with pytest.raises(ValueError, match="drop_path_rate"):
            m.set_drop_path(bad)
    with pytest.raises(ValueError, match="drop_path_rate"):
        ElasticViT(SPACE, img_size=32, num_classes=10, drop_path_rate=2.0)
    assert m.extract_subnet(SPACE.largest()).drop_path_rate == 0.0


def test_drop_path_acts_only_in_training_mode():
    m0 = supernet(seed=1)
    m = supernet(seed=1)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64)
    m0.train()
    m.train()
    m.set_drop_path(0.0)
    torch.manual_seed(0)
    assert torch.equal(m(x), m0(x))  # rate 0: unchanged, even in training mode
    m.set_drop_path(0.9)
    m.eval()
    assert torch.equal(m(x), m0(x))  # eval mode ignores drop path
    m.train()
    torch.manual_seed(0)
    assert not torch.allclose(m(x), m0(x))


def test_explicit_slots_run_those_blocks_and_extract_them():
    """AutoProg's grown supernet runs chosen slots (not 0..d-1): set_subnet(config, slots)."""
    m = supernet("first")
    cfg = SubnetConfig(8, 36, (3, 4), (24, 32), (96, 48))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    m.set_subnet(cfg, (1, 3))
    assert m.slots == (1, 3)
    y = m(x)
    with torch.no_grad():  # slots 0 and 2 are identities now
        for p in list(m.blocks[0].parameters()) + list(m.blocks[2].parameters()):
            p.add_(1.0)
    assert torch.equal(m(x), y)
    assert rel_err(y, m.extract_subnet(cfg, (1, 3))(x)) <= 1e-10
    assert rel_err(y, m.extract_subnet(cfg)(x)) > 1e-3     # slots 0, 1 hold other weights
    m.set_subnet(cfg)
    assert m.slots == (0, 1)
    for bad in [(1,), (3, 1), (0, SPACE.num_slots), (1, 1), (-1, 2), (0, 1.0)]:
        with pytest.raises(ValueError, match="slots"):
            m.set_subnet(cfg, bad)
    with pytest.raises(TypeError, match="slots"):
        m.set_subnet(cfg, "01")


def test_grow_from_explicit_old_slots():
    m = supernet("first")
    src = {k: m.blocks[k].mlp["fc1"].weight.clone() for k in range(SPACE.num_slots)}
    m.grow(2, 4, old_slots=(1, 3))                            # old layers live in slots 1 and 3
    for k, old in enumerate([1, 1, 3, 3]):
        assert torch.equal(m.blocks[k].mlp["fc1"].weight, src[old])
