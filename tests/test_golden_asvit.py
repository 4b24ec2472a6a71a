"""As-ViT's indicators against the released code's own figures (tests/data/golden/asvit_kappa):
the NTK and kappa of the pre-norm pooled feature, and L^E with LayerNorms bypassed, on the same
float64 weights, inputs and circles the released code ran on."""
import math

import pytest
import torch
from safetensors.torch import load_file

import asvit_kernels as ak
from asvit_kernels.models import count_params
from asvit_kernels.models.asvit import AsViT
from asvit_kernels.search import indicators as ind

from _golden import expected, golden_dir
from _util import rel_err

DIR = golden_dir("asvit_kappa")
E = expected("asvit_kappa")
NAMES = sorted(E["genotypes"])


def _loaded(g) -> AsViT:
    m = AsViT.from_genotype(g["genotype"], num_classes=E["num_classes"], img_size=E["img_size"]).double()
    m.load_state_dict(load_file(DIR / g["weights_file"]), strict=True)   # float16 on disk, exact in float64
    return m


@pytest.fixture(scope="module")
def inputs():
    return load_file(DIR / E["inputs_file"])[E["inputs_key"]]


@pytest.mark.parametrize("name", NAMES)
def test_outputs_and_pooled_features_match_release(name, inputs):
    g = E["genotypes"][name]
    m, out = _loaded(g), load_file(DIR / g["outputs_file"])
    with torch.no_grad():   # float64 rounding only (summation order differs with the thread count)
        for ours, key in [(m.pooled_features(inputs), "features_prenorm"),
                          (m.forward_features(inputs), "features_normed"), (m(inputs), "logits")]:
            assert rel_err(ours, out[key]) <= 1e-12, key


@pytest.mark.parametrize("name", NAMES)
def test_ntk_and_kappa_match_release(name, inputs):
    g = E["genotypes"][name]
    m = _loaded(g)
    K, info = ak.ntk(m, inputs, params="weights", output_fn=ind.features, return_info=True)
    assert info["path"] == "fast", info          # the one-pass Gram serves the search's output
    K_ref = torch.tensor(g["ntk"]["matrix"], dtype=torch.float64)
    assert (K - K_ref).abs().max() <= 1e-9 * K_ref.abs().max()
    # The search's own entry point; a factory hands it the loaded weights.
    kappa = ind.kappa(lambda _seed: m, inputs, repeats=1, dtype=torch.float64)
    assert math.isclose(kappa, g["ntk"]["kappa"], rel_tol=1e-9)


@pytest.mark.parametrize("name", NAMES)
def test_length_distortion_matches_release(name):
    g = E["genotypes"][name]
    circle = load_file(DIR / g["circle_file"])
    le = ind._length_distortion_of([_loaded(g)], [(circle["points"], circle["tangents"])])
    assert math.isclose(le, g["length_distortion"]["LE"], rel_tol=1e-12)


def test_prenorm_output_is_what_kappa_needs(inputs):
    """The normed feature's NTK is (nearly) the Gram of norm.weight alone: far from the release's."""
    g = E["genotypes"]["seed"]
    m = _loaded(g)
    K_normed = ak.ntk(m, inputs, params="weights", output_fn=lambda mm, z: mm.forward_features(z))
    K_ref = torch.tensor(g["ntk"]["matrix"], dtype=torch.float64)
    assert (K_normed - K_ref).norm() / K_ref.norm() > 0.5


@pytest.mark.parametrize("name", NAMES)
def test_params_at_224_match_release(name):
    g = E["genotypes"][name]
    big = AsViT.from_genotype(g["genotype"], num_classes=1000, img_size=224)
    assert count_params(big) == g["size_224px_1000_classes"]["params"]
