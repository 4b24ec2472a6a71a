"""As-ViT scaling (greedy depth / width growth): candidates, the parameter filter, rank-sum
selection with its tie rule, the family, resumption (in-process, mid-step, SIGKILL), real indicators."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _kill_runner import kill_when
from _search_fakes import FakeEvaluate
from _search_runner import SETTINGS, run_scaling, scaling_json

from asvit_kernels.atomic import torch_load
from asvit_kernels.models.asvit import AsViT
from asvit_kernels.models.counting import count_params
from asvit_kernels.models.genotype import LARGE, SEED, Genotype
from asvit_kernels.search import scaling
from asvit_kernels.search.scaling import candidate_widths, dense_ranks, make_candidates, relative_spread, select

RUNNER = Path(__file__).resolve().parent / "_search_runner.py"


# ----------------------------------------------------------------------------- candidates

def test_candidate_widths_round_half_up_and_dedupe():
    assert candidate_widths(8, (0.05, 0.1, 0.15, 0.2)) == [8, 9, 10]
    assert candidate_widths(20, (0.05, 0.1, 0.15, 0.2)) == [21, 22, 23, 24]
    assert candidate_widths(2, (0.25,)) == [3]  # 2.5 rounds up (round() would give 2)


def test_make_candidates_order_and_cap():
    cands = make_candidates((1, 2, 1, 1), 8, (0.05, 0.1, 0.15, 0.2))
    assert len(cands) == 12 and len(set(cands)) == 12
    assert cands[:3] == [((2, 2, 1, 1), 8), ((2, 2, 1, 1), 9), ((2, 2, 1, 1), 10)]
    assert cands[-1] == ((1, 2, 1, 2), 10)
    assert all(sum(d) == 6 for d, _ in cands)
    ratios = (0.05, 0.1, 0.15, 0.2, 0.25)
    wide = make_candidates((1, 1, 1, 1), 100, ratios, max_candidates=100)
    assert len(wide) == 20 and make_candidates((1, 1, 1, 1), 100, ratios) == wide[:16]


def test_full_params_counts_the_full_model_on_meta():
    g = Genotype.parse(SEED).with_(depths=(2, 1, 1, 1), hidden=36)
    assert scaling.full_params(g) == count_params(AsViT.from_genotype(g))
    assert scaling.full_params(Genotype.parse(LARGE)) == 87_580_820  # ~88M, as the paper's As-ViT Large


# ----------------------------------------------------------------------------- selection

def test_dense_ranks_and_spread():
    assert dense_ranks([3.0, 1.0, 3.0, 2.0]) == [2, 0, 2, 1]
    assert dense_ranks([3.0, 1.0, 3.0, 2.0], descending=True) == [0, 2, 0, 1]
    assert dense_ranks([1.0, math.inf, math.inf]) == [0, 1, 1]
    assert relative_spread([2.0, 4.0, math.inf]) == pytest.approx(0.5)
    assert relative_spread([2.0]) == 0.0


def test_select_rank_sum():
    # kappa ranks 0,1,2; L^E ranks 2,0,1 -> sums 2,1,3
    idx, info = select([1.0, 2.0, 3.0], [1.0, 9.0, 5.0])
    assert idx == 1 and info["rank_sums"] == [2, 1, 3]


def test_select_ties_follow_the_indicator_with_the_larger_spread():
    # sums tie (1, 1); kappa spread (2-1)/2 = 0.5 > L^E spread (10-9)/10 = 0.1 -> lower kappa wins
    assert select([1.0, 2.0], [9.0, 10.0])[0] == 0
    # L^E spread (10-1)/10 = 0.9 > kappa spread (1.1-1)/1.1 -> higher L^E wins
    idx, info = select([1.0, 1.1], [1.0, 10.0])
    assert idx == 1 and info["tie_order"][0] == "length_distortion"
    # complete ties: candidate order
    assert select([1.0, 1.0], [2.0, 2.0])[0] == 0


def test_select_ranks_inf_and_nan_last():
    idx, info = select([math.inf, 5.0, math.nan], [9.0, 10.0, math.nan])
    assert info["kappa_ranks"] == [1, 0, 1] and info["length_ranks"] == [1, 0, 2] and idx == 1
    # inf kappa but the best L^E: ranks sum 1 + 0 ties with 0 + 1; L^E has the spread (kappa: one finite)
    assert select([math.inf, 5.0], [10.0, 9.0])[0] == 0


# ----------------------------------------------------------------------------- growth

def test_grow_family_with_fake_indicators():
    fake = FakeEvaluate()
    res = run_scaling(None, fake)
    lo, hi = SETTINGS["scaling"]["param_limit"]
    assert res.finished and res.stop_reason == "param_limit" and len(res.family) >= 3
    params = [a["params"] for a in res.family]
    assert params == sorted(params) and params[-1] >= lo and all(p <= hi for p in params)
    assert all(p < lo for p in params[:-1])
    prev_depths, prev_h = (1, 1, 1, 1), 8
    for arch, step in zip(res.family, res.history):
        g = Genotype.parse(arch["genotype"])
        assert g.depths == tuple(arch["depths"]) and g.hidden == 4 * arch["proxy_hidden"] == arch["hidden"]
        assert g.kernels == Genotype.parse(SEED).kernels and g.heads == 32
        assert sum(g.depths) == sum(prev_depths) + 1 and arch["proxy_hidden"] >= prev_h
        assert arch["params"] == scaling.full_params(g)
        cands = step["candidates"]
        assert [(tuple(c["depths"]), c["proxy_hidden"]) for c in cands] == make_candidates(prev_depths, prev_h,
                                                                                          (0.05, 0.1, 0.15, 0.2))
        alive = [c for c in cands if c["survives"]]
        assert all(("kappa" in c) == c["survives"] for c in cands) and all(c["params"] > hi for c in cands
                                                                           if not c["survives"])
        win, _ = select([c["kappa"] for c in alive], [c["length_distortion"] for c in alive])
        assert alive[win]["genotype"] == arch["genotype"]
        direct = FakeEvaluate()(g, None, repeats=2, embed_dim=arch["proxy_hidden"], seed=1)
        assert arch["kappa"] == direct["kappa"] and arch["flops"] == direct["flops"]
        prev_depths, prev_h = g.depths, arch["proxy_hidden"]
    assert fake.calls == sum(len(s["survivors"]) for s in res.history)


def test_grow_stops_when_nothing_fits_and_checks_heads():
    res = scaling.grow(SEED, images=torch.zeros(1), evaluate_fn=FakeEvaluate(), param_limit=(1e6, 1.2e6))
    assert res.finished and res.stop_reason == "no_candidates" and res.family == []
    assert not any(c["survives"] for c in res.history[0]["candidates"])
    with pytest.raises(ValueError, match="H / 8"):
        scaling.grow(SEED, images=torch.zeros(1), evaluate_fn=FakeEvaluate(), hidden=3)
    scaling.grow(SEED, images=torch.zeros(1), evaluate_fn=FakeEvaluate(), hidden=4, param_limit=(1e6, 3e6))


# ----------------------------------------------------------------------------- resumption

def _strip(history):
    return [{**s, "candidates": [{k: v for k, v in c.items() if k != "seconds"} for c in s["candidates"]]}
            for s in history]


def test_resume_in_process_and_mid_step(tmp_path):
    ref = run_scaling(None, FakeEvaluate())
    part = run_scaling(tmp_path / "a", FakeEvaluate(), max_steps_this_call=2)
    assert not part.finished and len(part.family) == 2
    done = run_scaling(tmp_path / "a", FakeEvaluate())
    assert done.family == ref.family and _strip(done.history) == _strip(ref.history) and done.finished
    # an exception in the middle of a step's candidates: the measured ones are kept (pending)
    inner = FakeEvaluate()
    crash_at = len(ref.history[0]["survivors"]) + 5

    def crashing(*a, **k):
        if inner.calls == crash_at:
            raise RuntimeError("boom")
        return inner(*a, **k)
    with pytest.raises(RuntimeError, match="boom"):
        run_scaling(tmp_path / "b", crashing)
    state = torch_load(tmp_path / "b" / "scaling_state.pt")
    assert state["step"] == 1 and len(state["pending"]) == 5
    fake = FakeEvaluate()
    again = run_scaling(tmp_path / "b", fake)
    assert again.family == ref.family and _strip(again.history) == _strip(ref.history)
    assert fake.calls == sum(len(s["survivors"]) for s in ref.history) - crash_at
    with pytest.raises(ValueError, match="param_limit"):
        run_scaling(tmp_path / "b", FakeEvaluate(), param_limit=(5e6, 9e6))


def test_sigkill_and_restart_matches_uninterrupted(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out.json"
    cmd = [sys.executable, str(RUNNER), "scaling", str(run_dir), str(out)]
    state = run_dir / "scaling_state.pt"
    # kill inside step 2, after some of its candidates were measured
    killed = kill_when(cmd + ["--delay", "0.05"], state, lambda st: st["step"] >= 2 and len(st["pending"]) >= 2,
                       tmp_path / "runner.log")
    assert not out.exists()
    assert not killed["stop_reason"] and killed["pending"]
    subprocess.run(cmd, check=True, timeout=120)
    got = json.loads(out.read_text())
    ref = run_scaling(None, FakeEvaluate())
    want = scaling_json(ref)
    assert got["family"] == want["family"] and got["stop_reason"] == "param_limit"
    assert _strip(got["history"]) == _strip(want["history"])
    survivors = sum(len(s["survivors"]) for s in ref.history)
    done_before = sum(len(s["survivors"]) for s in ref.history[:killed["step"]]) + len(killed["pending"])
    assert got["calls"] == survivors - done_before


# ----------------------------------------------------------------------------- real indicators

def test_real_indicators_tiny_growth(one_thread, tmp_path):
    from asvit_kernels.search import indicators
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(images=x, evaluate_fn=indicators.evaluate, param_limit=(2.5e6, 3e6), max_candidates=3, repeats=1,
              eval_kwargs={"count_size": 32})
    res = scaling.grow(SEED, run_dir=tmp_path, **kw)
    assert res.stop_reason == "param_limit" and res.family and res.family[-1]["params"] >= 2.5e6
    arch = res.family[-1]
    direct = indicators.evaluate(Genotype.parse(arch["genotype"]), x, repeats=1, embed_dim=arch["proxy_hidden"],
                                 seed=0, count_size=32)
    assert arch["kappa"] == pytest.approx(direct["kappa"], rel=1e-6) and math.isfinite(arch["kappa"])
    assert arch["length_distortion"] == pytest.approx(direct["length_distortion"], rel=1e-6)
    assert arch["flops"] == direct["flops"] and arch["params"] == direct["params"]
    fresh = scaling.grow(SEED, **kw)
    assert fresh.family == res.family
