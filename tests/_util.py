"""Shared helpers: error measures, tolerances, the backends/devices this machine can test."""
import torch

from asvit_kernels import backends

# Relative-error bounds against a float64 reference, per compute dtype. fp32 allows for the
# cancellation in long reductions (a bias gradient summing hundreds of signed rows).
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor, scale: float = 1e-6) -> float:
    """||out - ref|| / max(||ref||, scale) in float64; NaN anywhere gives inf (never passes).

    ``scale`` is the size errors are measured against when the exact answer is (near) zero, e.g. a
    LayerNorm of width 1, whose input gradient is 0 up to rounding noise of the size of dy."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise AssertionError(f"shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return float("inf")
    return ((out - ref).norm() / max(ref.norm().item(), scale)).item()


def cases(op: str):
    """(device, backend) pairs runnable here; GPU ones carry the gpu mark."""
    import pytest
    out = []
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for b in backends.OP_BACKENDS[op]:
            # torch_flash takes only fp16/bf16 at head dims that are multiples of 8, where the generic
            # tests use fp32 and odd head dims: it has its own tests (test_dispatch_table.py).
            if b != "torch_flash" and backends.why_unavailable(b, torch.device(dev)) is None:
                marks = [pytest.mark.gpu] if dev == "cuda" else []
                out.append(pytest.param(dev, b, id=f"{dev}-{b}", marks=marks))
    return out


def dtypes_for(device: str, backend: str):
    return [d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
            if backends.why_dtype_unsupported(backend, torch.device(device), d) is None]
