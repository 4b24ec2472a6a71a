"""As-ViT topology search (REINFORCE): the reward and its inf rule, the policy, learning,
determinism, and resumption (in-process, after an exception, after SIGKILL of a subprocess)."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _kill_runner import kill_when
from _search_fakes import FakeEvaluate
from _search_runner import SETTINGS, run_topology, topology_json

from asvit_kernels.atomic import torch_load
from asvit_kernels.models.genotype import DIMENSIONS, SPACE, Genotype
from asvit_kernels.search import topology
from asvit_kernels.search.topology import effective_values, relative_change_reward

EPS = 1e-6
RUNNER = Path(__file__).resolve().parent / "_search_runner.py"


def _strip_seconds(history):
    return [{k: v for k, v in rec.items() if k != "seconds"} for rec in history]


# ----------------------------------------------------------------------------- reward

def test_reward_formula_and_window():
    assert relative_change_reward([5.0], [1.0]) == 0.0  # step 0
    # kappa 20 -> 12 over a range of 10 (+0.8); L^E 1 -> 3 over a range of 2 (+1)
    r = relative_change_reward([10.0, 20.0, 12.0], [3.0, 1.0, 3.0])
    assert r == pytest.approx(8 / (10 + EPS) + 2 / (2 + EPS), rel=1e-12)
    # the ranges cover only the last `buffer` samples, current included
    kappas, lengths = [100.0, 10.0, 20.0, 12.0], [7.0, 7.0, 7.0, 7.0]
    assert relative_change_reward(kappas, lengths, buffer=3) == pytest.approx(8 / (10 + EPS))
    assert relative_change_reward(kappas, lengths, buffer=4) == pytest.approx(8 / (90 + EPS))
    with pytest.raises(ValueError, match="buffer"):
        relative_change_reward(kappas, lengths, buffer=1)


def test_inf_kappa_rule():
    flat = [1.0, 1.0, 1.0]
    # finite -> inf: inf counts as max + range (= 30), so the change is one range: -10 / 20
    assert relative_change_reward([10.0, 20.0, math.inf], flat) == pytest.approx(-10 / (20 + EPS))
    # inf -> finite: the same surrogate, positive reward
    assert relative_change_reward([10.0, math.inf, 20.0], flat) == pytest.approx(10 / (20 + EPS))
    # one finite value: the span is max(|hi|, 1), so inf is strictly worse than it
    assert relative_change_reward([5.0, math.inf], [1.0, 1.0]) == pytest.approx(-5 / (5 + EPS))
    assert effective_values([0.5, math.inf], lower_is_better=True) == [0.5, 1.5]
    # a window without a finite kappa: no kappa term; NaN is treated as inf
    assert relative_change_reward([math.inf, math.inf], [1.0, 3.0]) == pytest.approx(2 / (2 + EPS))
    assert relative_change_reward([10.0, 20.0, math.nan], flat) == relative_change_reward([10.0, 20.0, math.inf], flat)
    # L^E: NaN / -inf are its worst side, +inf its best
    assert effective_values([2.0, 4.0, math.nan, -math.inf, math.inf], lower_is_better=False) == [2, 4, 0, 0, 6]


def test_rewards_always_finite_and_bounded():
    g = torch.Generator().manual_seed(0)
    specials = [math.inf, math.nan, -math.inf]
    for _ in range(300):
        n = int(torch.randint(1, 30, (1,), generator=g))
        ks, ls = torch.rand(n, generator=g).mul(100).tolist(), torch.rand(n, generator=g).tolist()
        for seq in (ks, ls):
            for i in torch.randint(0, n, (n // 3,), generator=g).tolist():
                seq[i] = specials[i % 3]
        r = relative_change_reward(ks, ls, buffer=int(torch.randint(2, 25, (1,), generator=g)))
        assert math.isfinite(r) and abs(r) <= 2.0


def test_ema_baseline_is_bias_corrected():
    b = topology.EmaBaseline(0.9)
    b.update(2.0)
    assert b.value == pytest.approx(2.0)
    b.update(0.0)
    assert b.value == pytest.approx(0.09 * 2 / 0.19)


# ----------------------------------------------------------------------------- policy

def test_policy_init_sampling_and_genotype():
    policy = topology.CategoricalPolicy(SPACE, torch.Generator().manual_seed(0))
    assert [len(l) for l in policy.logits] == [len(SPACE[n]) for n in DIMENSIONS]
    assert all(l.abs().max() < 1e-2 and l.abs().max() > 0 for l in policy.logits if len(l) > 1)
    a = policy.sample(torch.Generator().manual_seed(1))
    assert a == policy.sample(torch.Generator().manual_seed(1))
    g = policy.genotype(a)
    assert g.to_indices() == a and g.depths == (1, 1, 1, 1) and g.hidden == 32
    expected = sum(torch.log_softmax(l.detach(), 0)[i] for l, i in zip(policy.logits, a))
    assert float(policy.log_prob(a).detach()) == pytest.approx(float(expected))
    with pytest.raises(ValueError, match="dimensions"):
        topology.CategoricalPolicy({"K1": (4,)}, torch.Generator())


# ----------------------------------------------------------------------------- search

def test_reinforce_learns_is_deterministic_and_records_everything():
    kw = dict(steps=150, repeats=1, images=torch.zeros(1))
    a = topology.reinforce(seed=0, evaluate_fn=FakeEvaluate(), **kw)
    b = topology.reinforce(seed=0, evaluate_fn=FakeEvaluate(), **kw)
    c = topology.reinforce(seed=1, evaluate_fn=FakeEvaluate(), **kw)
    assert _strip_seconds(a.history) == _strip_seconds(b.history) and a.probabilities == b.probabilities
    assert [r["genotype"] for r in a.history] != [r["genotype"] for r in c.history]
    assert len(a.history) == 150 and a.finished and a.history[0]["reward"] == 0.0
    assert all(math.isfinite(r["reward"]) for r in a.history)
    # the returned genotype is the per-dimension argmax
    argmax = {n: SPACE[n][max(range(len(p)), key=p.__getitem__)] for n, p in a.probabilities.items()}
    assert a.genotype == Genotype.from_choices(argmax)
    # the fake's L^E grows with E4 (=6 best) and its kappa falls with K1 (=8 best): learned
    for res in (a, c):
        assert res.genotype.expansions[3] == 6 and res.probabilities["E4"][-1] > 0.5
        assert res.probabilities["K1"][-1] > 0.3  # uniform: 0.2
    rec = a.history[5]
    assert rec["genotype"] == str(Genotype.from_choices(list(rec["indices"])))
    assert set(rec) >= {"kappa", "length_distortion", "params", "flops", "reward", "baseline", "advantage"}


def test_reinforce_handles_inf_kappa_and_avoids_it():
    space = {**{n: (SPACE[n][0],) for n in DIMENSIONS}, "K1": (4,), "H": (32, 64), "E4": (2, 6)}
    res = topology.reinforce(space, steps=80, seed=0, repeats=1, images=torch.zeros(1), evaluate_fn=FakeEvaluate())
    kappas = [r["kappa"] for r in res.history]
    assert math.inf in kappas and any(math.isfinite(k) for k in kappas)
    assert all(math.isfinite(r["reward"]) and math.isfinite(r["advantage"]) for r in res.history)
    assert res.genotype.heads == 32 and res.probabilities["H"][0] > 0.6  # H=64 (inf kappa) is avoided


def test_cache_reuses_measurements():
    space = {**{n: (SPACE[n][0],) for n in DIMENSIONS}, "E4": (2, 6)}
    fake = FakeEvaluate()
    res = topology.reinforce(space, steps=20, repeats=1, images=torch.zeros(1), evaluate_fn=fake)
    assert fake.calls == 2 == sum(not r["cached"] for r in res.history)
    again = topology.reinforce(space, steps=20, repeats=1, images=torch.zeros(1), evaluate_fn=FakeEvaluate(),
                               cache=False)
    assert _strip_seconds(again.history) == [dict(r, cached=False) for r in _strip_seconds(res.history)]


def test_split_repeats_averages_single_initialisations():
    fake = FakeEvaluate()
    res = topology.reinforce(steps=3, repeats=3, seed=2, images=torch.zeros(1), evaluate_fn=fake,
                             split_repeats=True)
    assert fake.calls == 9  # three single-initialisation calls per architecture
    g = res.history[1]["genotype"]
    ks = [FakeEvaluate()(g, repeats=1, seed=2000 + j)["kappa"] for j in range(3)]
    assert res.history[1]["kappa"] == pytest.approx(sum(ks) / 3)


# ----------------------------------------------------------------------------- resumption

def test_resume_in_process_matches_uninterrupted(tmp_path):
    ref = run_topology(None, FakeEvaluate())
    first = run_topology(tmp_path, FakeEvaluate(), max_steps_this_call=7)
    assert not first.finished and len(first.history) == 7
    assert torch_load(tmp_path / "topology_state.pt")["step"] == 7
    mid = run_topology(tmp_path, FakeEvaluate(), max_steps_this_call=11)
    assert len(mid.history) == 18
    fake = FakeEvaluate()
    done = run_topology(tmp_path, fake)
    assert done.finished and done.genotype == ref.genotype and done.probabilities == ref.probabilities
    assert _strip_seconds(done.history) == _strip_seconds(ref.history)
    assert fake.calls == sum(not r["cached"] for r in ref.history[18:])
    summary = json.loads((tmp_path / "topology.json").read_text())  # strict JSON, inf written as "inf"
    assert summary["step"] == 40 and summary["argmax"] == str(ref.genotype)
    # a finished run returns at once; a larger `steps` extends it like an uninterrupted longer run
    fake = FakeEvaluate()
    assert run_topology(tmp_path, fake).history == done.history and fake.calls == 0
    longer = run_topology(None, FakeEvaluate(), steps=45)
    extended = run_topology(tmp_path, FakeEvaluate(), steps=45)
    assert _strip_seconds(extended.history) == _strip_seconds(longer.history)


class _Crash(RuntimeError):
    pass


def test_resume_after_an_exception_inside_evaluate(tmp_path):
    ref = run_topology(None, FakeEvaluate())
    inner = FakeEvaluate()

    def crashing(*a, **k):
        if inner.calls == 12:
            raise _Crash("boom")
        return inner(*a, **k)
    with pytest.raises(_Crash):
        run_topology(tmp_path, crashing)
    state = torch_load(tmp_path / "topology_state.pt")
    assert 0 < state["step"] < 40
    done = run_topology(tmp_path, FakeEvaluate())
    assert _strip_seconds(done.history) == _strip_seconds(ref.history) and done.genotype == ref.genotype


def test_resume_rejects_other_settings(tmp_path):
    run_topology(tmp_path, FakeEvaluate(), max_steps_this_call=2)
    with pytest.raises(ValueError, match="seed"):
        run_topology(tmp_path, FakeEvaluate(), seed=4)
    with pytest.raises(ValueError, match="lr"):
        run_topology(tmp_path, FakeEvaluate(), lr=0.1)


def test_sigkill_and_restart_matches_uninterrupted(tmp_path):
    run_dir, out = tmp_path / "run", tmp_path / "out.json"
    cmd = [sys.executable, str(RUNNER), "topology", str(run_dir), str(out)]
    killed = kill_when(cmd + ["--delay", "0.1"], run_dir / "topology_state.pt", lambda st: st["step"] >= 3,
                       tmp_path / "runner.log")
    assert not out.exists()
    killed_at = killed["step"]
    assert 3 <= killed_at < SETTINGS["topology"]["steps"]
    subprocess.run(cmd, check=True, timeout=120)
    got = json.loads(out.read_text())
    ref = run_topology(None, FakeEvaluate())
    want = topology_json(ref)
    assert got["genotype"] == want["genotype"] and got["probabilities"] == want["probabilities"]
    assert _strip_seconds(got["history"]) == _strip_seconds(want["history"])
    # the restarted process measured only what came after the kill
    assert got["calls"] == sum(not r["cached"] for r in ref.history[killed_at:])


# ----------------------------------------------------------------------------- real indicators

def test_real_indicators_tiny_search_and_resume(one_thread, tmp_path):
    from asvit_kernels.search import indicators
    space = {**{n: (SPACE[n][0],) for n in DIMENSIONS}, "K1": (4, 8), "E4": (2, 6), "H": (16, 32)}
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    kw = dict(steps=4, seed=0, repeats=1, images=x, evaluate_fn=indicators.evaluate, embed_dim=8,
              eval_kwargs={"count_size": 32})
    ref = topology.reinforce(space, **kw)
    assert all(math.isfinite(r["length_distortion"]) and r["length_distortion"] > 0 for r in ref.history)
    assert all(r["kappa"] >= 1.0 for r in ref.history) and all(math.isfinite(r["reward"]) for r in ref.history)
    first = ref.history[0]
    direct = indicators.evaluate(Genotype.parse(first["genotype"]), x, repeats=1, seed=0, count_size=32)
    assert first["kappa"] == pytest.approx(direct["kappa"], rel=1e-6)
    assert first["length_distortion"] == pytest.approx(direct["length_distortion"], rel=1e-6)
    topology.reinforce(space, run_dir=tmp_path, max_steps_this_call=2, **kw)
    done = topology.reinforce(space, run_dir=tmp_path, **kw)
    assert _strip_seconds(done.history) == _strip_seconds(ref.history) and done.genotype == ref.genotype
