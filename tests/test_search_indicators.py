"""search.indicators: kappa and L^E of As-ViT proxies against the per-sample / per-coordinate loops
(asvit_kernels.reference) on independently built models and circles, determinism, evaluate()'s
sizes, degenerate networks, argument errors."""
import math

import pytest
import torch
from torch import nn

import asvit_kernels as ak
from asvit_kernels.models import count_flops, count_params
from asvit_kernels.models.asvit import AsViT
from asvit_kernels.models.genotype import Genotype
from asvit_kernels.reference import length_distortion_loop, ntk_loop
from asvit_kernels.search import indicators as ind

TINY = "4,2,3|2,2,2|3,1,4|4,1,2|16"  # windows in stages 1-2, odd K3
SIDE = 32
F64 = torch.float64


def images(batch: int = 4, dtype=F64, seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def models_by_rule(genotype, repeats, seed, embed_dim=8, depths=None):
    """The documented rule, written out: model r under torch.manual_seed(1000 * seed + r)."""
    out = []
    for r in range(repeats):
        torch.manual_seed(1000 * seed + r)
        out.append(AsViT.from_genotype(genotype, embed_dim=embed_dim, depths=depths, num_classes=0,
                                       img_size=SIDE).to(F64).eval())
    return out


def circles_by_rule(repeats, seed, n_points=10):
    out = []
    for r in range(repeats):
        g = torch.Generator().manual_seed(1000 * seed + r + 2 ** 40)
        out.append(tuple(t.to(F64) for t in ak.circle_curve((3, SIDE, SIDE), n_points, generator=g)))
    return out


def features(m, x):
    return m.pooled_features(x)


# ----------------------------------------------------------------------------- against the loops

@pytest.mark.parametrize("seed,depths", [(0, None), (3, (1, 2, 1, 1))])
def test_kappa_matches_per_sample_loop(seed, depths):
    x = images()
    got = ind.kappa(TINY, x, repeats=2, embed_dim=8, depths=depths, seed=seed)
    kappas = []
    for m in models_by_rule(TINY, 2, seed, depths=depths):
        ev = torch.linalg.eigvalsh(ntk_loop(m, x, features, "weights"))
        kappas.append((ev[-1] / ev[0]).item())
    assert rel(got, sum(kappas) / 2) <= 1e-6
    assert kappas[0] != kappas[1]  # two different initialisations were averaged


def test_length_distortion_matches_per_coordinate_loop():
    seed = 1
    got = ind.length_distortion(TINY, (3, SIDE, SIDE), repeats=2, n_points=4, embed_dim=8, seed=seed, dtype=F64)
    curves = circles_by_rule(2, seed, n_points=4)
    assert not torch.equal(curves[0][0], curves[1][0])  # a fresh circle per initialisation
    values = [length_distortion_loop(m.set_norm(False), pts, tans, features)
              for m, (pts, tans) in zip(models_by_rule(TINY, 2, seed), curves)]
    assert rel(got, sum(values) / 2) <= 1e-6
    # images give the shape (and dtype): the same value
    assert ind.length_distortion(TINY, images(1), repeats=2, n_points=4, embed_dim=8, seed=seed) == got


def test_indicators_share_models_and_match_the_single_calls():
    x = images()
    both = ind.indicators(TINY, x, repeats=2, n_points=3, embed_dim=8, seed=2)
    assert both == {"kappa": ind.kappa(TINY, x, repeats=2, embed_dim=8, seed=2),
                    "length_distortion": ind.length_distortion(TINY, x, repeats=2, n_points=3, embed_dim=8, seed=2)}


# ----------------------------------------------------------------------------- determinism

def test_determinism_and_caller_rng_untouched():
    x = images(4, torch.float32)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = ind.indicators(TINY, x, repeats=2, n_points=3, embed_dim=8, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    b = ind.indicators(TINY, x, repeats=2, n_points=3, embed_dim=8, seed=5)
    c = ind.indicators(TINY, x, repeats=2, n_points=3, embed_dim=8, seed=6)
    assert a == b
    assert a["kappa"] != c["kappa"] and a["length_distortion"] != c["length_distortion"]
    ind.evaluate(TINY, x, repeats=1, n_points=2, embed_dim=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert isinstance(a["kappa"], float) and isinstance(a["length_distortion"], float)


def test_factory_gets_the_initialisation_seed_under_that_seed():
    calls = []

    def factory(s):
        calls.append((s, torch.initial_seed()))
        return AsViT.from_genotype(TINY, embed_dim=8, num_classes=0, img_size=SIDE)

    x = images()
    got = ind.kappa(factory, x, repeats=2, seed=4)
    assert calls == [(4000, 4000), (4001, 4001)]
    assert rel(got, ind.kappa(TINY, x, repeats=2, embed_dim=8, seed=4)) <= 1e-12


# ----------------------------------------------------------------------------- evaluate

def test_evaluate_reports_full_model_sizes():
    g = Genotype.parse(TINY)
    x = images()
    out = ind.evaluate(g, x, repeats=2, n_points=3, embed_dim=8, num_classes=10)
    assert set(out) == {"kappa", "length_distortion", "params", "flops", "seconds"}
    assert all(isinstance(out[k], float) for k in ("kappa", "length_distortion", "seconds"))
    assert all(type(out[k]) is int for k in ("params", "flops"))
    full = AsViT.from_genotype(g, num_classes=10, img_size=SIDE)  # hidden 32, not the proxy's 8
    assert out["params"] == count_params(full)
    assert out["flops"] == count_flops(full, SIDE)
    assert out["kappa"] == ind.kappa(g, x, repeats=2, embed_dim=8)
    assert out["length_distortion"] == ind.length_distortion(g, x, repeats=2, n_points=3, embed_dim=8)
    big = ind.evaluate(TINY, x, repeats=1, n_points=2, embed_dim=8, num_classes=10, count_size=64)
    assert big["params"] == out["params"] and big["flops"] == count_flops(full, 64)


class Constant(nn.Module):
    """Features that ignore the weights (NTK = 0) or, with norms off, overflow."""

    def __init__(self, blow_up: bool = False):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.blow_up, self.use_norm = blow_up, True

    def set_norm(self, enabled: bool):
        self.use_norm = enabled
        return self

    def pooled_features(self, x):
        y = self.lin(x.mean((2, 3)))
        if self.blow_up and not self.use_norm:
            return y * math.inf
        return y * 0.0


def test_degenerate_networks_rank_worst_without_errors():
    x = images(4, torch.float32)
    assert ind.kappa(lambda s: Constant(), x, repeats=2) == math.inf
    assert ind.length_distortion(lambda s: Constant(), x, repeats=2) == 0.0
    out = ind.indicators(lambda s: Constant(blow_up=True), x, repeats=2)
    assert out == {"kappa": math.inf, "length_distortion": 0.0}  # inf/NaN L^E -> 0.0, never NaN


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("call,match", [
    (lambda x: ind.kappa(TINY, x[0]), "images"),                               # 3-D
    (lambda x: ind.kappa(TINY, x[:1]), "images"),                              # B = 1
    (lambda x: ind.kappa(TINY, x[:, :1]), "images"),                           # 1 channel
    (lambda x: ind.kappa(TINY, x.long()), "images"),                           # integer
    (lambda x: ind.kappa(TINY, x.numpy()), "images"),                          # not a tensor
    (lambda x: ind.kappa(TINY, x, repeats=0), "repeats"),
    (lambda x: ind.kappa(TINY, x, repeats=1.0), "repeats"),
    (lambda x: ind.kappa(TINY, x, seed=-1), "seed"),
    (lambda x: ind.kappa(TINY, x, embed_dim=0), "embed_dim"),
    (lambda x: ind.kappa(TINY, x, depths=(1, 1, 1)), "depths"),
    (lambda x: ind.kappa(TINY, x, depths=(1, 1, 1, 1.5)), "depths"),
    (lambda x: ind.kappa(TINY, x, dtype=torch.int32), "dtype"),
    (lambda x: ind.kappa(42, x), "genotype_or_model_factory"),
    (lambda x: ind.kappa(lambda s: nn.Linear(2, 2), x), "genotype_or_model_factory"),
    (lambda x: ind.kappa(lambda s: Constant(), x, embed_dim=8), "embed_dim"),
    (lambda x: ind.length_distortion(TINY, (SIDE, SIDE)), "input_shape_or_images"),
    (lambda x: ind.length_distortion(TINY, (3, SIDE, 0)), "input_shape_or_images"),
    (lambda x: ind.length_distortion(TINY, x[0]), "input_shape_or_images"),
    (lambda x: ind.length_distortion(TINY, x, n_points=0), "n_points"),
    (lambda x: ind.evaluate(lambda s: Constant(), x), "genotype"),
    (lambda x: ind.evaluate(TINY, x, count_size=(1, 2, 3)), "count_size"),
    (lambda x: ind.evaluate(TINY, x, num_classes=-1), "num_classes"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(images(4, torch.float32))
