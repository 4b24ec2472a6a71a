"""Fixed cost per call of the fused ops against the stock PyTorch call they replace, on inputs so
small that the arithmetic is negligible: what is left is validation, autocast handling, backend
choice, dispatch and autograd bookkeeping (ours) against the stock op's own dispatch.

    python bench/overhead.py            # CPU; writes bench/results/overhead_<machine>.{json,md}

Rows: varlen_attention (one 4-token sequence; and the same call passing cu_seqlens_k and the
maximum lengths) vs ``F.scaled_dot_product_attention``; elastic_linear on a first-k range vs
``F.linear`` on weight views; elastic_layer_norm vs ``F.layer_norm`` on views. Forward under no_grad,
and forward + backward. overhead_us = ours - stock, median of ``harness.time_ms``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import asvit_kernels as ak  # noqa: E402


def cases(device: str) -> dict:
    """name -> (ours, stock, inputs): callables of the same leaf tensors."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)
    q, k, v = rand(4, 2, 8), rand(4, 2, 8), rand(4, 2, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32, device=device)

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(*(t.unsqueeze(0).transpose(1, 2) for t in (a, b, c)))
    x, w, b = rand(8, 32), rand(64, 32), rand(64)
    xn, wn, bn = rand(8, 16), rand(32), rand(32)
    return {
        "varlen_attention": (lambda a, b_, c: ak.varlen_attention(a, b_, c, cu), sdpa, (q, k, v)),
        "varlen_attention (cu_k, max given)": (
            lambda a, b_, c: ak.varlen_attention(a, b_, c, cu, cu, 4, 4), sdpa, (q, k, v)),
        "elastic_linear first-k": (lambda a, w_, b_: ak.elastic_linear(a[:, :16], w_, b_, (0, 16), (0, 32)),
                                   lambda a, w_, b_: F.linear(a[:, :16], w_[:32, :16], b_[:32]), (x, w, b)),
        "elastic_layer_norm first-k": (lambda a, w_, b_: ak.elastic_layer_norm(a, w_, b_, (0, 16)),
                                       lambda a, w_, b_: F.layer_norm(a, (16,), w_[:16], b_[:16]), (xn, wn, bn)),
    }


def measure(fn, inputs, backward: bool, min_run_time: float) -> float:
    leaves = [t.detach().clone().requires_grad_(backward) for t in inputs]
    if not backward:
        def call():
            with torch.no_grad():
                fn(*leaves)
    else:
        def call():
            for t in leaves:
                t.grad = None
            fn(*leaves).sum().backward()
    call()
    return 1e3 * harness.time_ms(call, min_run_time)   # us


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-run-time", type=float, default=0.5)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args(argv)
    rows = []
    for name, (ours, stock, inputs) in cases(a.device).items():
        for backward in (False, True):
            o, s = (measure(f, inputs, backward, a.min_run_time) for f in (ours, stock))
            rows.append({"op": name, "pass": "fwd+bwd" if backward else "fwd", "ours_us": o, "stock_us": s,
                         "overhead_us": o - s})
    cols = ["op", "pass", "ours_us", "stock_us", "overhead_us"]
    print(harness.table(rows, cols))
    if not a.no_write:
        info = harness.machine(a.device)
        harness.write("overhead", info, rows, cols,
                      "Fixed cost per call (tiny inputs), median us; overhead_us = ours - stock.")


if __name__ == "__main__":
    main()
