"""AutoProg growth: MoGrow's layer mapping, depth growth copying the EMA source exactly (dense ViT
and the elastic supernet), and width growth keeping the function exactly."""
import pytest
import torch

from asvit_kernels.models.elastic_vit import ElasticViT
from asvit_kernels.models.growth import grow_depth, grow_width, new_layer_sources
from asvit_kernels.models.subnet import SubnetSpace
from asvit_kernels.models.vit import ViT

from _util import rel_err


def vit(seed=0, **kw) -> ViT:
    """A tiny float64 ViT with heterogeneous layers and every parameter random."""
    torch.manual_seed(seed)
    args = dict(img_size=32, patch_size=8, num_classes=10, embed_dim=24, depth=3, num_heads=[2, 3, 4],
                attn_dims=[16, 24, 32], mlp_dims=[32, 48, 64])
    m = ViT(**{**args, **kw}).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def test_new_layer_sources():
    assert new_layer_sources(7, 14) == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]
    assert new_layer_sources(7, 10) == [0, 1, 2, 3, 4, 4, 5, 5, 6, 6]
    assert new_layer_sources(5, 5) == [0, 1, 2, 3, 4]
    assert new_layer_sources(3, 10) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2]
    assert new_layer_sources(1, 3) == [0, 0, 0]
    with pytest.raises(ValueError, match="remove"):
        new_layer_sources(4, 3)
    with pytest.raises(ValueError):
        new_layer_sources(0, 3)


def test_grow_depth_copies_the_source_exactly():
    model, ema = vit(0), vit(1)  # the EMA copy holds different values: they must win
    grown = grow_depth(model, 5, source=ema)
    srcs = new_layer_sources(3, 5)
    assert srcs == [0, 1, 1, 2, 2] and grown.depth == 5
    assert grown.num_heads == [2, 3, 3, 4, 4] and grown.attn_dims == [16, 24, 24, 32, 32]
    assert grown.mlp_dims == [32, 48, 48, 64, 64]
    ema_state = ema.state_dict()
    for name, t in grown.state_dict().items():
        if name.startswith("blocks."):
            _, k, rest = name.split(".", 2)
            ref = ema_state[f"blocks.{srcs[int(k)]}.{rest}"]
        else:
            ref = ema_state[name]
        assert t.dtype == ref.dtype and torch.equal(t, ref), name
        assert t.untyped_storage().data_ptr() != ref.untyped_storage().data_ptr()  # copies, not aliases
    assert torch.equal(grow_depth(model, 3)(X), model(X))  # no growth: the same function
    with pytest.raises(ValueError, match="architecture"):
        grow_depth(model, 5, source=vit(depth=2, num_heads=[2, 3], attn_dims=[16, 24], mlp_dims=[32, 48]))


@pytest.mark.parametrize("growth", [
    dict(mlp_dims=[40, 96, 65]),
    dict(attn_dims=[24, 32, 40]),
    dict(embed_dim=48),
    dict(embed_dim=72, mlp_dims=80, attn_dims=[32, 40, 48]),
], ids=["mlp", "heads", "embed_x2", "all"])
def test_grow_width_keeps_the_function(growth):
    model = vit()
    g = torch.Generator().manual_seed(0)
    grown = grow_width(model, generator=g, **growth)
    D = growth.get("embed_dim", 24)
    assert grown.embed_dim == D and grown.cls_token.shape[-1] == D
    for l, (a, h) in enumerate(zip(grown.attn_dims, grown.num_heads)):
        assert a // h == model.attn_dims[l] // model.num_heads[l]  # heads copied whole
        assert grown.blocks[l].attn.qkv.weight.shape == (3 * a, D)
    if "mlp_dims" in growth:
        assert grown.blocks[0].mlp.fc1.out_features > model.blocks[0].mlp.fc1.out_features
    assert rel_err(grown(X), model(X)) <= 1e-10
    # The same seed draws the same copies.
    again = grow_width(model, generator=torch.Generator().manual_seed(0), **growth)
    assert all(torch.equal(a, b) for a, b in zip(grown.state_dict().values(), again.state_dict().values()))


def test_grow_width_copies_existing_units():
    model = vit()
    grown = grow_width(model, mlp_dims=[40, 48, 64], generator=torch.Generator().manual_seed(3))
    W, W2 = model.blocks[0].mlp.fc1.weight, grown.blocks[0].mlp.fc1.weight
    assert torch.equal(W2[:32], W)
    for row in W2[32:]:  # every new unit is a copy of an old one
        assert (row == W).all(1).any()


def test_grow_width_from_the_ema_source_and_without_class_token():
    model, ema = vit(0), vit(1)
    grown = grow_width(model, embed_dim=48, mlp_dims=64, source=ema, generator=torch.Generator().manual_seed(0))
    assert rel_err(grown(X), ema(X)) <= 1e-10
    avg = vit(class_token=False, global_pool="avg")
    assert rel_err(grow_width(avg, embed_dim=72)(X), avg(X)) <= 1e-10


def test_grow_width_rejects_what_it_cannot_preserve():
    model = vit()
    with pytest.raises(ValueError, match="whole multiple"):
        grow_width(model, embed_dim=36)  # LayerNorm statistics would change
    with pytest.raises(ValueError, match="head dim"):
        grow_width(model, attn_dims=[20, 24, 32])  # layer 0's head dim is 8
    with pytest.raises(ValueError, match=">= the current"):
        grow_width(model, mlp_dims=[16, 48, 64])
    with pytest.raises(ValueError, match="one entry per layer"):
        grow_width(model, mlp_dims=[64, 64])


# ----------------------------------------------------------------------------- the supernet


def elastic(seed: int) -> ElasticViT:
    torch.manual_seed(seed)
    m = ElasticViT(SubnetSpace.tiny(), img_size=32, num_classes=10, sharing="cyclic", private_qk=True).double()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.3)
    return m


def test_elastic_grow_copies_source_slots():
    model, ema = elastic(0), elastic(1)
    untouched = model.blocks[3].state_dict()
    untouched = {k: v.clone() for k, v in untouched.items()}
    model.grow(2, 3, source=ema)  # sources [0, 1, 1]
    for k, s in enumerate([0, 1, 1]):
        for (n, a), b in zip(model.blocks[k].state_dict().items(), ema.blocks[s].state_dict().values()):
            assert torch.equal(a, b), (k, n)
    for (n, a), b in zip(model.state_dict().items(), ema.state_dict().values()):
        if not n.startswith("blocks."):
            assert torch.equal(a, b), n
    assert all(torch.equal(v, model.blocks[3].state_dict()[k]) for k, v in untouched.items())


def test_elastic_grow_from_itself_reads_the_old_slots():
    model = elastic(0)
    old = [{k: v.clone() for k, v in b.state_dict().items()} for b in model.blocks]
    model.grow(2, 4)  # sources [0, 0, 1, 1]: slot 1 is overwritten before slot 2 reads old slot 1
    for k, s in enumerate([0, 0, 1, 1]):
        assert all(torch.equal(v, old[s][n]) for n, v in model.blocks[k].state_dict().items()), k
    with pytest.raises(ValueError, match="slots"):
        model.grow(2, 5)
