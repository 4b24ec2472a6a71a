"""The training-free indicators on bench/ntk.py's search proxy (an As-ViT-style ViT on 32x32, 64
tokens + class token): the NTK condition number kappa, ours (one forward + one backward over the
batch) against the stock PyTorch torch.func way (vmap over samples of jacrev) and the As-ViT/TENAS
per-sample loop; and the length distortion L^E, ours (forward-mode JVPs) against the
per-output-coordinate backward loop. Each value is checked against the loop before timing."""
from __future__ import annotations

import pytest
import torch

import harness

ntk = harness.script("ntk")

REPEATS = 2          # initialisations averaged per kappa (the search uses more; the script sets it)
BATCH = {"cpu": 4, "cuda": 32}
LE_POINTS = {"cpu": 1, "cuda": ntk.LE_POINTS}   # points of the circle curve (the loop: 256 backwards each)
CFG = ntk.model_configs(small=True, vit_depth=None, vit_img=None)["proxy"]
KAPPA_METHODS = ("ours", "vmap_jacrev", "loop")
LE_METHODS = ("ours", "loop")


@pytest.fixture(scope="module")
def kappa_case(device):
    dtype = torch.float32
    models = ntk.build_models(CFG, REPEATS, device, dtype)
    x = ntk.make_input(CFG, BATCH["cpu" if device == "cpu" else "cuda"], device, dtype)
    loop_value = ntk.kappa_methods()["loop"][0]
    return models, x, loop_value(models, x)


@pytest.mark.parametrize("name", KAPPA_METHODS)
def test_kappa(name, kappa_case, measure):
    models, x, ref = kappa_case
    value = ntk.kappa_methods()[name][0]
    got = value(models, x)
    assert ntk._rel(got, ref) <= 10 * ntk.KAPPA_TOL[torch.float32], f"{name}: kappa {got} vs loop {ref}"
    measure(f"ntk kappa: {ntk.model_label('proxy', CFG)}, B={x.shape[0]}, mean of {REPEATS} inits",
            lambda: value(models, x), method=name)


@pytest.fixture(scope="module")
def le_case(device):
    model = ntk.build_models(CFG, 1, device, torch.float32)[0]
    pts, tans = ntk.circle_points(CFG, device, torch.float32)
    n = LE_POINTS["cpu" if device == "cpu" else "cuda"]
    pts, tans = pts[:n], tans[:n]
    return model, pts, tans, ntk.le_methods()["loop"][0](model, pts, tans)


@pytest.mark.parametrize("name", LE_METHODS)
def test_length_distortion(name, le_case, measure):
    model, pts, tans, ref = le_case
    value = ntk.le_methods()[name][0]
    got = value(model, pts, tans)
    assert ntk._rel(got, ref) <= 10 * ntk.LE_TOL[torch.float32], f"{name}: L^E {got} vs loop {ref}"
    measure(f"ntk L^E: {ntk.model_label('proxy', CFG)}, {pts.shape[0]} points, {CFG['num_classes']} outputs",
            lambda: value(model, pts, tans), method=name)
