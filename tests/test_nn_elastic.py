"""ElasticLinear / ElasticLayerNorm: nn.Linear / nn.LayerNorm state dicts and outputs at full
range, sub-network switching with set_range, and gradients landing in the shared parameters."""
import pytest
import torch
from torch import nn

from asvit_kernels import reference
from asvit_kernels.nn import ElasticLayerNorm, ElasticLinear
from asvit_kernels.ranges import cyclic_ranges

from _util import TOL, cases, rel_err


@pytest.mark.parametrize("device,backend", cases("elastic_linear"))
def test_full_range_is_nn_linear(device, backend):
    torch.manual_seed(0)
    dense = nn.Linear(24, 40).to(device)
    el = ElasticLinear(24, 40, backend=backend).to(device)
    el.load_state_dict(dense.state_dict(), strict=True)
    x = torch.randn(3, 11, 24, device=device)
    assert rel_err(el(x), dense(x).double()) <= TOL[torch.float32] * 10


@pytest.mark.parametrize("device,backend", cases("elastic_layer_norm"))
def test_full_range_is_nn_layer_norm(device, backend):
    torch.manual_seed(0)
    dense = nn.LayerNorm(24).to(device)
    nn.init.normal_(dense.weight)
    nn.init.normal_(dense.bias)
    el = ElasticLayerNorm(24, backend=backend).to(device)
    el.load_state_dict(dense.state_dict(), strict=True)
    x = torch.randn(5, 24, device=device)
    assert rel_err(el(x), dense(x).double()) <= TOL[torch.float32] * 10


def test_set_range_switches_sub_networks_and_accumulates_shared_grads():
    torch.manual_seed(0)
    fc = ElasticLinear(16, 12)
    ln = ElasticLayerNorm(16)
    ranges = cyclic_ranges([6, 10, 16], 16)
    assert ranges == {6: (0, 6), 10: (6, 10), 16: (0, 16)}
    ref_gw = torch.zeros(12, 16, dtype=torch.float64)
    for w in (6, 10):
        ln.set_range(ranges[w])
        fc.set_range(ranges[w], [(0, 3), (6, 3)])
        assert fc.in_width == w and fc.out_width == 6 and ln.width == w
        x = torch.randn(4, w)
        fc(ln(x)).sum().backward()
        wd = fc.weight.detach().double().requires_grad_()
        h = reference.elastic_layer_norm(x.double(), ln.weight.double(), ln.bias.double(), ranges[w])
        reference.elastic_linear(h, wd, fc.bias.double(), ranges[w], [(0, 3), (6, 3)]).sum().backward()
        ref_gw += wd.grad
    assert rel_err(fc.weight.grad, ref_gw) <= TOL[torch.float32] * 10
    assert "in_range=(6, 10)" in repr(fc)


def test_set_range_validates_immediately():
    fc = ElasticLinear(8, 8)
    with pytest.raises(ValueError, match="in_range"):
        fc.set_range((0, 9))
    with pytest.raises(ValueError, match="channel_range"):
        ElasticLayerNorm(8).set_range((0, 0))


def test_parameters_match_nn_linear_init_statistics():
    torch.manual_seed(0)
    el = ElasticLinear(256, 512)
    bound = 1 / 256 ** 0.5
    assert el.weight.abs().max() <= bound and el.bias.abs().max() <= bound
    assert el.weight.std() > 0.5 * bound / 3 ** 0.5
