"""elastic_linear (a sub-network's slice of a supernet's shared fc1 weight, no copy) against the
stock PyTorch ways to run that sub-network: a dense nn.Linear of the sub-network's shape, and
copy-slicing the shared weight (bench/elastic.py's baselines); forward+backward, first-k and wrapped
(cyclic) ranges, one group each."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import harness

import asvit_kernels as ak

elastic = harness.script("elastic")

DIM = 384                                   # the supernet layer is (4 * DIM, DIM), as in the script
TOKENS = {"cpu": 2 * 197, "cuda": 64 * 197}
CASES = {  # name -> (in_range, out_range) of a half-width sub-network
    "first-k": ((0, DIM // 2), (0, 2 * DIM)),
    "wrapped": ((DIM - DIM // 4, DIM // 2), (4 * DIM - 2 * DIM // 3, 2 * DIM)),
}


def methods_for(device, timed_backends):
    return [f"elastic_{b}" for b in timed_backends("elastic_linear", device)] + ["dense_linear", "copy_slice"]


@pytest.fixture(scope="module")
def layer(device, dtype):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4 * DIM, DIM, generator=g).to(device, dtype).requires_grad_()
    b = torch.randn(4 * DIM, generator=g).to(device, dtype).requires_grad_()
    return w, b


def _sub(method, case, w, b, device, dtype):
    in_r, out_r = CASES[case]
    if method.startswith("elastic_"):
        return (lambda x: ak.elastic_linear(x, w, b, in_r, out_r, backend=method[len("elastic_"):])), [w, b]
    if method == "dense_linear":
        dense = torch.nn.Linear(in_r[1], out_r[1], device=device, dtype=dtype)
        return dense, list(dense.parameters())
    in_idx, out_idx = ak.channel_indices(in_r, DIM, device), ak.channel_indices(out_r, 4 * DIM, device)
    return (lambda x: F.linear(x, w[out_idx][:, in_idx], b[out_idx])), [w, b]


@pytest.mark.parametrize("case", list(CASES))
def test_elastic_linear(case, method, layer, device, dtype, measure):
    w, b = layer
    in_r, out_r = CASES[case]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS["cpu" if device == "cpu" else "cuda"], in_r[1], generator=g).to(device, dtype)
    dy = torch.randn(x.shape[0], out_r[1], generator=g).to(device, dtype)
    f, params = _sub(method, case, w, b, device, dtype)
    if method != "dense_linear":  # the dense layer has its own weights: nothing to agree with
        ref = ak.reference.elastic_linear(x.double(), w.double(), b.double(), in_r, out_r)
        with torch.no_grad():
            err = (f(x).double() - ref).norm() / ref.norm()
        assert err < (1e-5 if dtype == torch.float32 else 3e-2), f"{method}: relative error {err:.2e}"
    measure(f"elastic_linear fwd+bwd {case}: {x.shape[0]} tokens, {out_r[1]}x{in_r[1]} of "
            f"{4 * DIM}x{DIM}", elastic.fwd_bwd(f, params, x, dy), method=method)
