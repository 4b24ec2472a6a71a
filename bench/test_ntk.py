"""The training-free indicators on bench/ntk.py's search proxy (an As-ViT-style ViT on 32x32, 64
tokens + class token): the NTK condition number kappa, ours (one forward + one backward over the
batch) against the stock PyTorch torch.func way (vmap over samples of jacrev) and the As-ViT/TENAS
per-sample loop; and the length distortion L^E, ours (forward-mode JVPs) against the
per-output-coordinate backward loop. Each value is checked against the loop before timing."""
from __future__ import annotations

import functools

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


def test_methods_of_a_row_are_timed_interleaved(monkeypatch):
    """The methods of a row take turns in short slices (harness.interleaved_ms, here on a fake clock);
    ms is the mean per call of the middle half of its slices; a method whose timing fails is n/a and
    takes no further turns while the others go on."""
    calls, now = [], [0.0]
    cost = {"a": 0.005, "b": 0.002}   # seconds per call on the fake clock

    def timed_fn(name):
        def fn():
            calls.append(name)
            if name == "bad":
                raise RuntimeError("out of memory\nmore")
            now[0] += cost[name]
        return fn

    monkeypatch.setattr(ntk.harness, "interleaved_ms",
                        functools.partial(ntk.harness.interleaved_ms, clock=lambda: now[0]))
    monkeypatch.setattr(ntk, "measure_memory", lambda spec, args, argv: "off")
    args = type("Args", (), {"rounds": 3, "min_run_time": 0.0})()
    rows = [{"method": m} for m in ("a", "bad", "b", "skipped")]
    ntk.time_and_measure(rows, {m: timed_fn(m) for m in ("a", "bad", "b")}, {m: {} for m in "ab"} | {"bad": {}},
                         args, [])
    turns = [m for i, m in enumerate(calls) if i == 0 or calls[i - 1] != m]   # runs of one method
    assert turns == ["a", "bad", "b", "a", "b", "a", "b"] and calls.count("bad") == 1
    assert [r.get("ms") for r in rows] == [pytest.approx(5.0), "n/a", pytest.approx(2.0), None]
    assert rows[1]["note"] == "n/a: RuntimeError: out of memory"
    assert rows[0]["peak_mem_MB"] == "off" and "peak_mem_MB" not in rows[1]
