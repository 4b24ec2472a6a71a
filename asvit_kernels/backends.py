"""Which implementation serves a call: ``backend`` argument > ``ASVIT_BACKEND`` env > auto.

Auto: CUDA tensors take the compiled extension when the op has a kernel there, else Triton, else
plain PyTorch; CPU tensors take PyTorch. An explicit choice that cannot run raises ``RuntimeError``
saying why, never silently falls back.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, Optional

import torch

from . import _ext

BACKENDS = ("torch", "triton", "cuda")

# Which backends implement each op (the torch backend implements all of them).
OP_BACKENDS: dict[str, tuple[str, ...]] = {
    "elastic_linear": ("torch", "triton"),
    "elastic_layer_norm": ("torch", "triton", "cuda"),
    "varlen_attention": ("torch", "triton", "cuda"),
    "per_sample_grad_gram": ("torch", "triton", "cuda"),
}


# Looked up once: a module lookup inside a traced function would break torch.compile graphs.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through the interpreter (must be set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(name: str, device: torch.device) -> Optional[str]:
    """None when backend ``name`` can run on tensors of ``device``, else the reason it cannot."""
    if name == "torch":
        return None
    if name == "triton":
        if not _TRITON_INSTALLED:
            return "triton is not installed (pip install triton; Linux only)"
        if device.type == "cpu" and not triton_interpreted():
            return "triton on CPU needs TRITON_INTERPRET=1 set before triton is imported"
        if device.type not in ("cpu", "cuda"):
            return f"triton does not run on {device.type} tensors"
        return None
    if name == "cuda":
        if _ext.C is None:
            return f"the CUDA extension is not available: {_ext.MISSING_REASON}"
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
        if not _ext.cuda_device_available():
            return ("the CUDA extension is built but sees no CUDA device (no GPU, or a driver older than "
                    "the toolkit it was built with needs: CUDA 13 needs driver >= 580)")
        return None
    raise ValueError(f"backend must be one of None, 'auto', {', '.join(map(repr, BACKENDS))}; got {name!r}")


def why_dtype_unsupported(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """None when backend ``name`` computes in ``dtype``, else why not."""
    if name == "torch":
        return None
    if dtype not in _KERNEL_DTYPES:
        return f"the {name} kernels take float32, float16 and bfloat16, not {dtype}"
    if name == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        return "the Triton interpreter (CPU) has no bfloat16"
    return None


Check = Callable[[str], Optional[str]]


def why_not(name: str, device: torch.device, dtype: torch.dtype, limits: Optional[Check] = None) -> Optional[str]:
    """None when backend ``name`` can take this call, else the first reason it cannot."""
    return (why_unavailable(name, device) or why_dtype_unsupported(name, device, dtype)
            or (limits(name) if limits is not None else None))


def available(op: str, device: torch.device, dtype: torch.dtype = torch.float32) -> list[str]:
    """The backends that can serve ``op`` on ``dtype`` tensors of ``device`` right now."""
    return [b for b in OP_BACKENDS[op] if why_not(b, device, dtype) is None]


def pick(op: str, device: torch.device, backend: Optional[str] = None, dtype: torch.dtype = torch.float32,
         limits: Optional[Check] = None) -> str:
    """Resolve the backend for one call of ``op`` on ``dtype`` tensors living on ``device``.

    ``limits(backend)`` may add an op-specific reason a backend cannot take this call (a size limit).
    """
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    source = "backend argument"
    if backend in (None, "auto"):
        env = os.environ.get("ASVIT_BACKEND", "").strip().lower()
        if env and env != "auto":
            backend, source = env, "ASVIT_BACKEND"
        else:
            backend = None
    if backend is None:
        if device.type == "cuda":
            for b in ("cuda", "triton"):
                if b in OP_BACKENDS[op] and why_not(b, device, dtype, limits) is None:
                    return b
        return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend not in OP_BACKENDS[op]:
        raise RuntimeError(f"{op} has no {backend} implementation (asked for by the {source}); "
                           f"it has: {', '.join(OP_BACKENDS[op])}")
    reason = why_not(backend, device, dtype, limits)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} (from the {source}) cannot run here: {reason}")
    return backend
