"""ViTAS evolutionary search: mutation / crossover stay in the space and take layers from the
right parent; every candidate is new and inside the FLOPs window; parents are the history's top-k;
selection improves fitness; seeded runs repeat; an interrupted run resumes to the uninterrupted
result; supernet_accuracy measures top-1; calibrate_identity_prob puts the mean FLOPs in the window."""
import functools
import math

import pytest
import torch

from asvit_kernels.models.elastic_vit import ElasticViT
from asvit_kernels.models.subnet import SubnetConfig, SubnetSpace, sample_subnet, subnet_flops
from asvit_kernels.search import evolution as ev

SPACE = SubnetSpace.tiny()


@pytest.fixture(scope="module")
def supernet() -> ElasticViT:
    torch.manual_seed(0)
    return ElasticViT(SPACE, img_size=32, num_classes=10)


@pytest.fixture(scope="module")
def window(supernet) -> tuple[int, int]:
    """The middle half of random sub-networks' FLOPs (25th to 75th percentile)."""
    g = torch.Generator().manual_seed(123)
    flops = sorted(supernet.subnet_flops(sample_subnet(g, SPACE)) for _ in range(1000))
    return flops[250], flops[750]


def toy_fitness(config: SubnetConfig) -> float:
    """Deterministic fitness with a structure selection can exploit: wide MLPs, embed*depth near 100."""
    return sum(config.mlp_dim) / 100 - abs(config.embed_dim * config.depth - 100) / 10


def key(record: dict) -> tuple:
    c = ev.config_from_dict(record["config"])
    return c.patch_size, c.embed_dim, c.heads, c.qkv_dim, c.mlp_dim


def run(supernet, window, tmp=None, fitness=toy_fitness, **kw):
    kw = {"population": 12, "generations": 5, "parents": 4, "seed": 7, "progress": False, **kw}
    return ev.search(supernet, fitness, window, run_dir=tmp, **kw)


# ----------------------------------------------------------------------------- operators

def test_mutate_zero_prob_is_identity_and_full_prob_resamples():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        c = sample_subnet(g, SPACE)
        assert ev.mutate(c, SPACE, g, 0.0) == c
    changed = 0
    for _ in range(50):
        c = sample_subnet(g, SPACE)
        m = ev.mutate(c, SPACE, g, 1.0)
        assert SPACE.validate(m) == m
        changed += m != c
    assert changed >= 45  # every dimension redrawn: nearly always a different network


def test_mutate_keeps_layers_in_canonical_order_when_depth_changes():
    """A depth change keeps the first layers (identities go to the end) and draws new ones after."""
    g = torch.Generator().manual_seed(1)
    c = SubnetConfig(8, 24, (2, 3, 4), (16, 24, 32), (32, 48, 96), active_layers=(0, 2, 3))  # distinct layers
    layers = list(zip(c.heads, c.qkv_dim, c.mlp_dim))
    depths, aligned, changed = set(), 0, 0
    for _ in range(1500):
        m = ev.mutate(c, SPACE, g, 0.1)
        assert SPACE.validate(m) == m and m.active_layers is None
        depths.add(m.depth)
        if m.depth != c.depth:
            changed += 1
            n = min(m.depth, c.depth)
            aligned += list(zip(m.heads, m.qkv_dim, m.mlp_dim))[:n] == layers[:n]
    assert depths == set(SPACE.depths) and changed > 50
    assert aligned > 0.5 * changed  # a misaligned prefix (e.g. the last layers kept) would never match


def test_crossover_takes_each_gene_from_a_parent_at_the_same_layer():
    g = torch.Generator().manual_seed(2)
    a = SubnetConfig(8, 24, (2, 3), (16, 24), (32, 48))
    b = SubnetConfig(16, 48, (4, 4, 2, 2), (32, 16, 32, 16), (96, 96, 96, 32), active_layers=(0, 1, 2, 3))
    kids = [ev.crossover(a, b, g) for _ in range(200)]
    for k in kids:
        assert SPACE.validate(k) == k
        assert k.patch_size in (8, 16) and k.embed_dim in (24, 48) and k.depth in (2, 4)
        for l in range(k.depth):
            pairs = {(p.heads[l], p.qkv_dim[l]) for p in (a, b) if p.depth > l}
            assert (k.heads[l], k.qkv_dim[l]) in pairs  # attention comes as a pair from one parent
            assert k.mlp_dim[l] in {p.mlp_dim[l] for p in (a, b) if p.depth > l}
    # both parents contribute: some child mixes a's first layer with b's embed dim
    assert any(k.embed_dim == 48 and k.qkv_dim[0] == 16 and k.heads[0] == 2 for k in kids)
    assert len(set(kids)) > 10


# ----------------------------------------------------------------------------- the search

def test_candidates_are_new_and_inside_the_window(supernet, window):
    r = run(supernet, window)
    lo, hi = window
    assert 0 < len(r.history) <= 12 * 5
    keys = [key(h) for h in r.history]
    assert len(set(keys)) == len(keys)
    for h in r.history:
        cfg = ev.config_from_dict(h["config"])
        assert h["flops"] == supernet.subnet_flops(cfg) and lo <= h["flops"] <= hi
        assert h["fitness"] == toy_fitness(cfg)
    origins = {h["origin"] for h in r.history if h["generation"] > 0}
    assert origins == {"mutation", "crossover"}
    assert {h["origin"] for h in r.history if h["generation"] == 0} == {"random"}
    best = max(r.history, key=lambda h: h["fitness"])
    assert r.best_fitness == best["fitness"] and r.best_config == ev.config_from_dict(best["config"])


def test_selection_improves_fitness(supernet, window):
    r = run(supernet, window, population=16, generations=6)
    assert [s["generation"] for s in r.generations] == list(range(6))
    assert r.generations[-1]["mean"] > r.generations[0]["mean"] + 1.0
    assert r.best_fitness > r.generations[0]["best"]


def test_parents_are_the_top_k_of_the_history(supernet, window, monkeypatch):
    seen_parents = []
    history = []
    real_mutate, real_cross = ev.mutate, ev.crossover

    def fitness(cfg):
        f = toy_fitness(cfg)
        history.append((cfg, f))
        return f

    def top(k=4):
        return {c for c, _ in sorted(history, key=lambda t: -t[1])[:k]}

    def spy_mutate(c, *a, **kw):
        assert c in top()
        seen_parents.append(c)
        return real_mutate(c, *a, **kw)

    def spy_cross(a, b, g):
        assert a != b and {a, b} <= top()
        seen_parents.append(a)
        return real_cross(a, b, g)

    monkeypatch.setattr(ev, "mutate", spy_mutate)
    monkeypatch.setattr(ev, "crossover", spy_cross)
    run(supernet, window, fitness=fitness, generations=3)
    assert len(seen_parents) >= 2 * 12


def test_seeded_runs_repeat_and_seeds_differ(supernet, window):
    a, b, c = run(supernet, window), run(supernet, window), run(supernet, window, seed=8)
    assert a.history == b.history and a.best_config == b.best_config
    assert [key(h) for h in a.history] != [key(h) for h in c.history]


def test_generation_is_evaluated_through_map_fn(supernet, window):
    calls = []

    def map_fn(fn, items):
        calls.append(len(items))
        return [fn(x) for x in items]

    r = run(supernet, window, map_fn=map_fn)
    assert calls == [s["evaluated"] for s in r.generations] and len(calls) == 5


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("fail_at", [3, 12 + 5, 3 * 12 + 11])
def test_interrupted_run_resumes_to_the_same_result(supernet, window, tmp_path, fail_at):
    full = run(supernet, window, tmp_path / "full")
    calls = {"n": 0}

    def flaky(cfg):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise Interrupt
        return toy_fitness(cfg)

    with pytest.raises(Interrupt):
        run(supernet, window, tmp_path / "cut", fitness=flaky)
    done_before = len(torch.load(tmp_path / "cut" / ev.STATE_FILE, weights_only=True)["history"])
    assert done_before < fail_at  # the interrupted generation was not recorded
    evaluated = []
    resumed = run(supernet, window, tmp_path / "cut", fitness=lambda c: evaluated.append(c) or toy_fitness(c))
    assert resumed.history == full.history and resumed.generations == full.generations
    assert resumed.best_config == full.best_config and resumed.best_fitness == full.best_fitness
    assert len(evaluated) == len(full.history) - done_before  # nothing finished was re-evaluated
    assert (tmp_path / "cut" / ev.JSON_FILE).exists()


def test_finished_run_extends_like_a_longer_run(supernet, window, tmp_path):
    long = run(supernet, window, generations=6)
    run(supernet, window, tmp_path, generations=3)
    again = run(supernet, window, tmp_path, generations=3, fitness=lambda c: pytest.fail("re-evaluated"))
    assert len(again.generations) == 3
    extended = run(supernet, window, tmp_path, generations=6)
    assert extended.history == long.history


def test_resume_refuses_other_settings(supernet, window, tmp_path):
    run(supernet, window, tmp_path, generations=1)
    with pytest.raises(ValueError, match="other settings"):
        run(supernet, window, tmp_path, generations=2, seed=9)


@pytest.mark.parametrize("drop, needle", [("summaries", "missing key(s) 'summaries'"),
                                          ("exhausted", "missing key(s) 'exhausted'")])
def test_a_state_missing_a_key_is_named_damaged(supernet, window, tmp_path, drop, needle):
    from asvit_kernels import atomic
    from asvit_kernels.search import runstate
    run(supernet, window, tmp_path, generations=1)
    path = runstate.state_path(tmp_path, ev.RUN_NAME)
    state = atomic.torch_load(path)
    del state[drop]
    atomic.torch_save(path, state)
    with pytest.raises(ValueError, match=f"{ev.STATE_FILE} is damaged") as info:
        run(supernet, window, tmp_path, generations=2)
    assert needle in str(info.value)


def test_bad_arguments(supernet, window):
    with pytest.raises(ValueError, match="flops_range"):
        run(supernet, (window[1], window[0]))
    with pytest.raises(ValueError, match="population"):
        run(supernet, window, population=0)
    with pytest.raises(ValueError, match="mutate_prob"):
        run(supernet, window, mutate_prob=1.5)
    with pytest.raises(ValueError, match="no random sub-network"):
        run(supernet, (1, 2), max_tries=5)
    with pytest.raises(TypeError, match="ElasticViT"):
        ev.search(SPACE, toy_fitness, window)


def test_non_finite_fitness_ranks_last(supernet, window):
    r = run(supernet, window, generations=2, fitness=lambda c: math.nan if c.patch_size == 8 else toy_fitness(c))
    assert r.best_config.patch_size == 16 and math.isfinite(r.best_fitness)


# ----------------------------------------------------------------------------- fitness helper

def test_supernet_accuracy_counts_top1_and_restores_mode(supernet):
    cfg = SubnetConfig(16, 36, (3, 2), (24, 16), (48, 32))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(20, 3, 32, 32, generator=g)
    supernet.train()
    supernet.set_subnet(cfg)
    with torch.no_grad():
        pred = supernet.eval()(x).argmax(-1)
    supernet.train()
    labels = pred.clone()
    labels[:5] = (labels[:5] + 1) % 10  # 5 of 20 wrong
    acc = ev.supernet_accuracy(supernet, (x, labels), cfg)
    assert acc == pytest.approx(0.75)
    assert supernet.training and supernet.config == cfg
    batches = [(x[:7], labels[:7]), (x[7:], labels[7:])]
    assert ev.supernet_accuracy(supernet, batches, cfg) == pytest.approx(0.75)
    assert all(p.grad is None for p in supernet.parameters())
    fit = functools.partial(ev.supernet_accuracy, supernet, (x, pred))
    assert fit(cfg) == 1.0
    with pytest.raises(ValueError, match="no labelled"):
        ev.supernet_accuracy(supernet, [], cfg)


# ----------------------------------------------------------------------------- identity probability

def test_calibrated_identity_prob_puts_mean_flops_in_window():
    space = SubnetSpace.vitas(scale=0.25)
    lo, hi = 8.0e7, 1.0e8
    p = ev.calibrate_identity_prob(space, 224, (lo, hi), samples=128)
    assert 0 < p < 1
    g = torch.Generator().manual_seed(99)  # an independent generator from the calibration's
    flops = [subnet_flops(sample_subnet(g, space, p), 224) for _ in range(1500)]
    assert lo <= sum(flops) / len(flops) <= hi
    p_low = ev.calibrate_identity_prob(space, 224, (4.0e7, 5.0e7), samples=128)
    assert p_low > p  # a smaller budget needs more identities
    assert ev.calibrate_identity_prob(space, 224, (lo, hi), samples=128) == p  # fixed generator


def test_calibration_rejects_unreachable_windows():
    with pytest.raises(ValueError, match="deepest"):
        ev.calibrate_identity_prob(SPACE, 32, (1e12, 2e12), num_classes=10, samples=16)
    with pytest.raises(ValueError, match="shallowest"):
        ev.calibrate_identity_prob(SPACE, 32, (1, 2), num_classes=10, samples=16)
