"""The elastic ops are proper torch.library custom ops: schema, fake impls and autograd registration
pass opcheck, and they trace into one graph under torch.compile(fullgraph=True)."""
import pytest
import torch

import asvit_kernels as ak
from asvit_kernels import reference

from _util import TOL, rel_err


def linear_samples():
    x, w, b = torch.randn(3, 5, 10), torch.randn(24, 16), torch.randn(24)
    yield (x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), [9, 10], [20, 6, 2, 4], "torch")
    yield (torch.randn(7, 16), torch.randn(24, 16).requires_grad_(), None, [0, 16], [0, 24], "torch")


def test_opcheck_elastic_linear():
    for args in linear_samples():
        torch.library.opcheck(torch.ops.asvit.elastic_linear.default, args)


def test_opcheck_elastic_layer_norm():
    x, w, b = torch.randn(4, 6, 12).requires_grad_(), torch.randn(20).requires_grad_(), torch.randn(20).requires_grad_()
    torch.library.opcheck(torch.ops.asvit.elastic_layer_norm.default, (x, w, b, 15, 1e-5, "torch"))
    torch.library.opcheck(torch.ops.asvit.elastic_layer_norm.default, (x.detach(), w, None, 0, 1e-6, "torch"))


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_fullgraph_compile_forward_backward(compile_backend):
    def block(x, w1, b1, g, w2):
        h = ak.elastic_layer_norm(x, g, None, (10, 12))
        h = ak.elastic_linear(h, w1, b1, (30, 12), [(0, 8), (40, 8)])
        return ak.elastic_linear(torch.relu(h), w2, None, (2, 16), (5, 6))

    torch._dynamo.reset()
    fn = torch.compile(block, fullgraph=True, backend=compile_backend)
    args = [torch.randn(2, 9, 12), torch.randn(48, 32), torch.randn(48), torch.randn(20), torch.randn(8, 24)]
    leaves = [a.clone().requires_grad_() for a in args]
    y = fn(*leaves)
    y.square().sum().backward()

    ref_leaves = [a.double().requires_grad_() for a in args]

    def ref_block(x, w1, b1, g, w2):
        h = reference.elastic_layer_norm(x, g, None, (10, 12))
        h = reference.elastic_linear(h, w1, b1, (30, 12), [(0, 8), (40, 8)])
        return reference.elastic_linear(torch.relu(h), w2, None, (2, 16), (5, 6))

    yr = ref_block(*ref_leaves)
    yr.square().sum().backward()
    assert rel_err(y, yr) <= 10 * TOL[torch.float32]
    for got, want in zip(leaves, ref_leaves):
        assert rel_err(got.grad, want.grad) <= 10 * TOL[torch.float32]
