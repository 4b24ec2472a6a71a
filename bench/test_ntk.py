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

REPEATS = {"cpu": 1, "cuda": 5}   # initialisations averaged per kappa (one: the single-model autograd path)
BATCH = {"cpu": 4, "cuda": 32}
LE_POINTS = {"cpu": 2, "cuda": ntk.LE_POINTS}   # points of the circle curve
CFG = ntk.model_configs(small=True, vit_depth=None, vit_img=None)["proxy"]
# L^E's loop takes one backward per output feature and point: on CPU the proxy gets a 16-way head
# (the script's 256) so the baseline stays seconds, not minutes
LE_CFG = {"cpu": dict(CFG, num_classes=16), "cuda": CFG}
KAPPA_METHODS = ("ours", "vmap_jacrev", "loop")
LE_METHODS = ("ours", "loop")


@pytest.fixture(scope="module")
def kappa_case(device):
    dtype = torch.float32
    kind = "cpu" if device == "cpu" else "cuda"
    models = ntk.build_models(CFG, REPEATS[kind], device, dtype)
    x = ntk.make_input(CFG, BATCH[kind], device, dtype)
    loop_value = ntk.kappa_methods()["loop"][0]
    return models, x, loop_value(models, x)


@pytest.mark.parametrize("name", KAPPA_METHODS)
def test_kappa(name, kappa_case, measure):
    models, x, ref = kappa_case
    value = ntk.kappa_methods()[name][0]
    got = value(models, x)
    assert ntk._rel(got, ref) <= 10 * ntk.KAPPA_TOL[torch.float32], f"{name}: kappa {got} vs loop {ref}"
    measure(f"ntk kappa: {ntk.model_label('proxy', CFG)}, B={x.shape[0]}, mean of {len(models)} inits",
            lambda: value(models, x), method=name)


@pytest.fixture(scope="module")
def le_case(device):
    kind = "cpu" if device == "cpu" else "cuda"
    cfg = LE_CFG[kind]
    model = ntk.build_models(cfg, 1, device, torch.float32)[0]
    pts, tans = ntk.circle_points(cfg, device, torch.float32)
    n = LE_POINTS[kind]
    pts, tans = pts[:n], tans[:n]
    return model, pts, tans, ntk.le_methods()["loop"][0](model, pts, tans), cfg


@pytest.mark.parametrize("name", LE_METHODS)
def test_length_distortion(name, le_case, measure):
    model, pts, tans, ref, cfg = le_case
    value = ntk.le_methods()[name][0]
    got = value(model, pts, tans)
    assert ntk._rel(got, ref) <= 10 * ntk.LE_TOL[torch.float32], f"{name}: L^E {got} vs loop {ref}"
    measure(f"ntk L^E: {ntk.model_label('proxy', cfg)}, {pts.shape[0]} points, {cfg['num_classes']} outputs",
            lambda: value(model, pts, tans), method=name)
