"""AutoProg's growth against the released code's own figures (tests/data/golden/autoprog_growth):
MoGrow's source maps (model from the slowest EMA, each EMA copy from its own), the layers a
depth-l sub-network of a grown supernet runs, and the growth-schedule candidates."""
import pytest
import torch

from asvit_kernels.models.growth import new_layer_slots, new_layer_sources, supernet_slots
from asvit_kernels.train.autoprog import AutoProg, search_candidates

from _golden import expected
from test_train_autoprog import FakeTrainer, tiny_model

E = expected("autoprog_growth")
DECAYS = E["ema_decays"]                        # fastest first: ema0 .. ema3


@pytest.mark.parametrize("case", E["new_idx"], ids=lambda c: f"{c['old']}to{c['new']}")
def test_new_layer_sources_and_slots(case):
    assert new_layer_sources(case["old"], case["new"]) == case["sources"]
    assert new_layer_slots(case["old"], case["new"]) == case["new_layer_slots"]


def _tag(module, source: int) -> None:
    """Block slot j of copy ``source`` holds 1000 * source + j; everything else 1000 * source + 99."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            j = int(name.split(".")[1]) if name.startswith("blocks.") else 99
            p.fill_(1000 * source + j)


def _read(module, slot: int) -> tuple[int, int]:
    """(source, old block) a slot's weights came from."""
    v = int(module.blocks[slot].mlp["fc1"].weight.flatten()[0])
    return divmod(v, 1000)


def _copy_name(source: int) -> str:
    return "model" if source == 0 else f"ema{source - 1}"


def _stage_pairs():
    """Each growth of each VOLO stage, as (case, stage key, old, new). A stage that keeps its depth
    while the other grows has no counterpart in our one-stage ViT (no growth happens there)."""
    for case in E["mogrow"]:
        for s, (old, new) in enumerate(zip(case["stage_layers_old"], case["stage_layers_new"])):
            if 0 < old < new:
                yield pytest.param(case, f"network.{2 * (s > 0)}", old, new, id=f"{case['l_old']}to{case['l_new']}-s{s}")


@pytest.mark.parametrize("case,key,old,new", list(_stage_pairs()))
def test_mogrow_sources_match_release(case, key, old, new):
    """The strategy's growth, traced by tags: the model from the slowest EMA (ema3), EMA copy k
    from old EMA copy k, old layer new_layer_sources(old, new)[slot] in every slot."""
    model = tiny_model(depth=new)
    t = FakeTrainer(model, epochs=2, decays=DECAYS)
    s = AutoProg(max_size=32, max_depth=new, stages=2, search=False, size_multiple=8, depths=[old, new])
    s.on_train_start(t, resumed=False)
    s.on_epoch_start(t, 0)
    _tag(model, 0)
    for k, e in enumerate(t.emas):
        _tag(e.module, k + 1)
    s.on_epoch_start(t, 1)
    copies = [("model", model, case["model"])] + [(f"ema{k}", e.module, case["emas"][k]) for k, e in enumerate(t.emas)]
    for _, module, want in copies:
        got = [_read(module, j) for j in range(new)]
        assert [_copy_name(src) for src, _ in got] == want[key]["from"]
        assert [blk for _, blk in got] == want[key]["old_block"]
        assert [_copy_name(int(module.norm.weight[0]) // 1000)] == want["non_block_parameters_from"]
    assert t.ema_resets == 0


@pytest.mark.parametrize("row", E["supernet_depth_single_stage"]["rows"], ids=lambda r: f"l{r['l']}")
def test_supernet_depth_runs_every_old_layer(row):
    """Grown 9 -> 18 and sampled at depth l: the released active slots and the old block each holds."""
    lo, hi = E["supernet_depth_single_stage"]["grown"]
    assert supernet_slots(row["l"], lo, hi) == row["active_slots"]
    model = tiny_model(depth=hi)
    _tag(model, 0)
    model.grow(lo, hi)
    s = AutoProg(max_size=32, max_depth=hi, search=False, size_multiple=8)
    s._layout = (lo, hi)
    assert s.slots_for(row["l"]) == row["active_slots"]
    assert [_read(model, k)[1] for k in row["active_slots"]] == row["old_block_of_each"]


@pytest.mark.parametrize("row", E["supernet_depth"]["rows"], ids=lambda r: f"l{r['l']}")
def test_supernet_depth_per_stage_matches_release(row):
    """The same rule on each of VOLO's two stages (their 0.23 split of l)."""
    total = {s: len(v["active_slots"]) for s, v in row["stages"].items()}
    grown = {"network.0": (2, 4), "network.2": (7, 14)}                  # 9 -> 18 per stage
    for key, stage in row["stages"].items():
        assert supernet_slots(total[key], *grown[key]) == stage["active_slots"]
        srcs = new_layer_sources(*grown[key])
        assert [srcs[k] for k in stage["active_slots"]] == stage["old_block_of_each"]


def test_depth_old_of_a_grown_supernet_is_the_pre_growth_network():
    model = tiny_model(depth=12).double()
    s = AutoProg(max_size=32, max_depth=12, stages=2, search=False, size_multiple=8, depths=[6, 12])
    t = FakeTrainer(model, epochs=2, decays=())
    s.on_train_start(t, resumed=False)
    s.on_epoch_start(t, 0)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
        s.on_epoch_start(t, 1)                      # grows 6 -> 12
        s._select(model, 6)
        assert torch.equal(model(x), before)


@pytest.mark.parametrize("name", sorted(E["candidates"]))
def test_growth_schedule_candidates_match_release(name):
    c, sch = E["candidates"][name], E["schedule"]
    current = None if name == "stage0" else tuple(c["current"])
    got = search_candidates(max_size=sch["r_max"], max_depth=sch["l_max"], size_multiple=32, sizes=sch["r_list"],
                            depths=sch["l_list"], current=current)
    assert [f"r{r}_l{l}" for r, l in got] == c["configs_evaluated"]
