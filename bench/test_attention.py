"""varlen_attention against the stock PyTorch attention on bench/attention.py's workloads a-c
(ViT 197 tokens; mixed 50/197/257; 49-token windows) at small batch counts: padded SDPA with a
key-padding mask (every SDPA backend on CUDA) and, on CUDA, nested-tensor SDPA. One group per
workload and pass (forward; forward+backward)."""
from __future__ import annotations

import pytest
import torch

import harness

attention = harness.script("attention")

SCALE = {"cpu": 1 / 128, "cuda": 1 / 4}   # CPU: a = 2 x 197 tokens, c = 8 windows of 49
WORKLOADS = ("a", "b", "c")
HEADS = 6


def methods_for(device, timed_backends):
    ours = [f"varlen_{b}" for b in timed_backends("varlen_attention", device)]
    # nested-tensor SDPA is seconds per call on CPU: a GPU baseline only
    stock = [m for m in attention.methods(device, []) if m.startswith("sdpa_padded")
             or (m == "sdpa_nested" and device != "cpu")]
    return ours + stock


@pytest.fixture(scope="module")
def works(device, dtype):
    out = {}
    for key in WORKLOADS:
        lens, head_dim = attention.workloads(SCALE["cpu" if device == "cpu" else "cuda"], 64)[key]
        w = attention.make_work(lens, HEADS, head_dim, device, dtype)
        out[key] = (w, attention.reference(w))
    return out


@pytest.mark.parametrize("key", WORKLOADS)
@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
def test_attention(pass_, key, method, works, device, dtype, measure):
    w, (out_ref, _) = works[key]
    m = attention.methods(device, [method[len("varlen_"):]] if method.startswith("varlen_") else [])[method](w)
    q, k, v = (m.native(x) for x in (w.q, w.k, w.v))
    try:
        with torch.no_grad():
            out = m.packed(m.attn(q, k, v))
    except RuntimeError as e:  # an SDPA backend that does not take this shape / dtype
        pytest.skip(f"{method}: {str(e).splitlines()[0][:160]}")
    err = (out.float() - out_ref.float()).abs().max().item()
    assert err <= attention.TOLERANCE[dtype] * max(1.0, out_ref.abs().max().item()), f"{method}: max diff {err}"
    if pass_ == "fwd":
        def fn():
            with torch.no_grad():
                m.attn(q, k, v)
    else:
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        dout = m.native(w.dout)

        def fn():
            for p in leaves:
                p.grad = None
            m.attn(*leaves).backward(dout)
    measure(f"attention {pass_} {key}: {w.shape}", fn, method=method, flops=w.flops)
