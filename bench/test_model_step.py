"""One training step (forward, cross-entropy, backward) of whole models, bench/models.py's methods:
As-ViT seed with our packed-window varlen_attention against the released reshape-window attention
with plain matmuls and with stock SDPA; an ElasticViT sub-network through ElasticLinear /
ElasticLayerNorm (no weight copies) against copy-slicing the shared weights and against the dense
extracted ViT. Same model object, weights and batch per group; loss and gradient norm are checked
against ours before timing."""
from __future__ import annotations

import pytest
import torch

import harness

models = harness.script("models")

SIZES = {"cpu": dict(img=64, batch=2, elastic_scale=0.5, elastic_img=64, elastic_batch=2),
         "cuda": dict(img=224, batch=32, elastic_scale=1.0, elastic_img=224, elastic_batch=64)}
ASVIT_METHODS = ("ours", "plain", "plain_sdpa")
ELASTIC_METHODS = ("ours", "copy_slicing", "dense")
SHARING, SUBNET, PATCH = "cyclic", "middle", 16


def _check_and_time(group, method, m, x, y, ref, measure):
    m.model.train()
    step = models.train_step(m.model, x, y)
    with m.context():
        loss, gnorm = step().item(), models._grad_norm(m.model)
        tol = models.LOSS_TOL[x.dtype]
        assert models._rel(loss, ref[0]) <= tol, f"{method}: loss {loss} vs ours {ref[0]}"
        assert models._rel(gnorm, ref[1]) <= models.GRAD_TOL_FACTOR * tol, f"{method}: grad norm {gnorm} vs {ref[1]}"
        measure(group, step, method=method)


def _reference(model, x, y):
    step = models.train_step(model.train(), x, y)
    return step().item(), models._grad_norm(model)


@pytest.fixture(scope="module")
def asvit_case(device, dtype):
    s = SIZES["cpu" if device == "cpu" else "cuda"]
    torch.manual_seed(0)
    model = models.asvit_mod.AsViT.from_genotype(models.SEED, img_size=s["img"]).to(device, dtype)
    x, y = models._batch(s["batch"], s["img"], 1000, device, dtype)
    return model, x, y, _reference(model, x, y), f"b{s['batch']} {s['img']}px"


@pytest.mark.parametrize("method", ASVIT_METHODS)
def test_asvit_step(method, asvit_case, measure):
    model, x, y, ref, shape = asvit_case
    context = {"ours": None, "plain": models.as_vit_plain(False), "plain_sdpa": models.as_vit_plain(True)}[method]
    m = models.Method(method, model, context) if context else models.Method(method, model)
    _check_and_time(f"model step As-ViT seed {models.SEED}: {shape}", method, m, x, y, ref, measure)


@pytest.fixture(scope="module")
def elastic_case(device, dtype):
    s = SIZES["cpu" if device == "cpu" else "cuda"]
    space = models.elastic_space(s["elastic_scale"], s["elastic_img"])
    cfg = models.subnets(space, PATCH)[SUBNET]
    torch.manual_seed(0)
    supernet = models.elastic_mod.ElasticViT(space, s["elastic_img"], sharing=SHARING).to(device, dtype)
    supernet.set_subnet(cfg)
    x, y = models._batch(s["elastic_batch"], s["elastic_img"], 1000, device, dtype)
    return supernet, supernet.extract_subnet(cfg), x, y, _reference(supernet, x, y), \
        f"b{s['elastic_batch']} {s['elastic_img']}px, {SHARING} sharing, {models._describe(cfg)}"


@pytest.mark.parametrize("method", ELASTIC_METHODS)
def test_elastic_vit_step(method, elastic_case, measure):
    supernet, dense, x, y, ref, shape = elastic_case
    m = {"ours": models.Method("ours", supernet), "copy_slicing": models.Method("copy_slicing", supernet,
                                                                              models.copy_slicing),
         "dense": models.Method("dense", dense)}[method]
    _check_and_time(f"model step ElasticViT sub-network: {shape}", method, m, x, y, ref, measure)
