"""ViTAS's channel slicing against the released code's own index lists
(tests/data/golden/vitas_slices): for side left/right (our sharing "first"/"last") and every
recorded width mix, the rows and columns each layer of a sub-network reads, the q/k rows of the
private q/k weight, and the fixed supernet softmax scale."""
import pytest
import torch

from asvit_kernels.models.elastic_vit import ElasticViT, released_softmax_scale
from asvit_kernels.models.subnet import SubnetConfig, SubnetSpace

from _golden import expected

E = expected("vitas_slices")
NET = E["supernet"]
SHARING = {"left": "first", "right": "last"}


def _space() -> SubnetSpace:
    w = E["widths_of_each_fraction"].values()
    return SubnetSpace(patch_sizes=(NET["patch_size"],), embed_dims=[x["embed"] for x in w], depths=(1,),
                       heads=NET["heads_choices"], qkv_dims=[x["v"] for x in w], mlp_dims=[x["mlp"] for x in w])


@pytest.fixture(scope="module")
def supernets():
    torch.manual_seed(0)
    return {side: ElasticViT(_space(), img_size=NET["img_size"], num_classes=1000, sharing=rule, private_qk=True)
            for side, rule in SHARING.items()}


def _rows_cols(slices, name, rows=None):
    """(rows, cols) index lists of dense parameter ``name`` (the part at ``rows``)."""
    for s in slices:
        if s.name == name and s.rows == rows:
            return [None if i is None else i.tolist() for i in s.index]
    raise KeyError(name)


@pytest.mark.parametrize("case", E["cases"], ids=lambda c: f"{c['side']}-" + "-".join(map(str, c["fractions"].values())))
def test_slices_match_release(case, supernets):
    m, wd = supernets[case["side"]], case["widths"]
    w = wd["v"]
    cfg = SubnetConfig(NET["patch_size"], wd["embed"], (NET["heads_choices"][0],), (w,), (wd["mlp"],))
    sl = m._slices(m.space.validate(cfg))
    blk, pi = case["block"], case["patch_init"]
    assert _rows_cols(sl, "patch_embed.proj.weight")[0] == pi["patch_embed.proj"]["rows"]
    assert _rows_cols(sl, "cls_token")[2] == pi["cls_token_channels"]
    assert _rows_cols(sl, "pos_embed")[2] == pi["pos_embed_channels"]
    assert _rows_cols(sl, "blocks.0.norm1.weight")[0] == blk["norm1"]["channels"]
    assert _rows_cols(sl, "blocks.0.norm2.weight")[0] == blk["norm2"]["channels"]
    qk_rows, qk_cols = _rows_cols(sl, "blocks.0.attn.qkv.weight", slice(0, 2 * w))
    assert (qk_rows, qk_cols) == (blk["attn.qk{h}"]["rows"], blk["attn.qk{h}"]["cols"])
    assert qk_rows[:w] == blk["q_rows_of_qk"] and qk_rows[w:] == blk["k_rows_of_qk"]
    v_rows, v_cols = _rows_cols(sl, "blocks.0.attn.qkv.weight", slice(2 * w, 3 * w))
    assert v_rows == blk["v_rows_of_v"] == blk["attn.v"]["rows"] and v_cols == blk["attn.v"]["cols"]
    for ours, theirs in [("attn.proj", "attn.proj"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]:
        assert _rows_cols(sl, f"blocks.0.{ours}.weight") == [blk[theirs]["rows"], blk[theirs]["cols"]], ours
    assert _rows_cols(sl, "norm.weight")[0] == case["final_norm"]["channels"]
    assert _rows_cols(sl, "head.weight")[1] == case["fc"]["cols"]


def test_released_softmax_scale_is_fixed_for_every_subnetwork():
    assert released_softmax_scale(NET["embed"]) == pytest.approx(E["softmax_scale"]["value"], rel=1e-15)
    assert all(h["softmax_scale_measured"] == pytest.approx(E["softmax_scale"]["value"])
               for c in E["cases"] for h in c["heads_choices"])
