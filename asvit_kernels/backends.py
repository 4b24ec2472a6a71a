"""Which implementation serves a call: ``backend`` argument > ``ASVIT_BACKEND`` env > auto.

Auto: CPU tensors take plain PyTorch (interpreted Triton is a correctness tool, never chosen). CUDA
tensors take, in the op's preference order (``capabilities.PREFERENCE``), the first backend that
can take the call and is tensor-core by construction for its dtype and arch; if none is, the first
that can take it; else plain PyTorch. ``explain`` gives the choice and the reason every other
backend was not chosen. An explicit choice that cannot run raises ``RuntimeError`` saying why,
never silently falls back.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Callable, NamedTuple, Optional

import torch

from . import _ext, capabilities
from .capabilities import TABLE

BACKENDS = ("torch", "triton", "cuda", "torch_flash")

# Which backends implement each op (the torch backend implements all of them).
OP_BACKENDS: dict[str, tuple[str, ...]] = {op: tuple(caps) for op, caps in TABLE.items()}


# Looked up once: a module lookup inside a traced function would break torch.compile graphs.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
_FLASH2 = getattr(torch.ops.aten, "_flash_attention_forward", None) is not None


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
    if name == "torch_flash":
        if not _FLASH2:
            return "this PyTorch build has no aten::_flash_attention_forward"
        if device.type != "cuda":
            return f"PyTorch's FlashAttention-2 needs CUDA tensors, got {device.type} tensors"
        if not torch.cuda.is_available():
            return "PyTorch sees no CUDA device"
        return None
    raise ValueError(f"backend must be one of None, 'auto', {', '.join(map(repr, BACKENDS))}; got {name!r}")


def _interpreter_refuses(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if name == "triton" and device.type == "cpu" and dtype == torch.bfloat16:
        return "the Triton interpreter (CPU) has no bfloat16"
    return None


def why_dtype_unsupported(name: str, device: torch.device, dtype: torch.dtype,
                          op: str = "varlen_attention") -> Optional[str]:
    """None when backend ``name`` computes in ``dtype``, else why not."""
    dtypes = TABLE[op][name].dtypes
    if dtype not in dtypes:
        return f"the {name} backend takes {', '.join(str(d)[6:] for d in dtypes)}, not {str(dtype)[6:]}"
    return _interpreter_refuses(name, device, dtype)


Check = Callable[[str], Optional[str]]


def device_arch(device: torch.device) -> Optional[int]:
    """CUDA compute capability as an int (80 for sm_80); None for other devices."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


class Verdict(NamedTuple):
    backend: str
    reason: Optional[str]    # None: it can take the call
    tensor_cores: bool       # its products run on tensor cores for this dtype and arch
    chosen: bool


def _why_not(op: str, name: str, device: torch.device, dtype: torch.dtype, limits: Optional[Check],
             arch: Optional[int], head_dim: Optional[int], features, check_available: bool) -> Optional[str]:
    if check_available and (why := why_unavailable(name, device)):
        return why
    return (_interpreter_refuses(name, device, dtype) or capabilities.refusal(op, name, device.type, dtype, arch, head_dim, features)
            or (limits(name) if limits is not None else None))


def why_not(name: str, device: torch.device, dtype: torch.dtype, limits: Optional[Check] = None,
            op: str = "varlen_attention", **call) -> Optional[str]:
    """None when backend ``name`` can take this call, else the first reason it cannot."""
    return _why_not(op, name, device, dtype, limits, call.get("arch", device_arch(device)),
                    call.get("head_dim"), call.get("features", ()), True)


def available(op: str, device: torch.device, dtype: torch.dtype = torch.float32) -> list[str]:
    """The backends that can serve ``op`` on ``dtype`` tensors of ``device`` right now."""
    return [b for b in OP_BACKENDS[op] if why_not(b, device, dtype, op=op) is None]


def explain(op: str, device: torch.device, dtype: torch.dtype = torch.float32, *, limits: Optional[Check] = None,
            arch: Optional[int] = None, head_dim: Optional[int] = None, features=(),
            check_available: bool = True) -> list[Verdict]:
    """Auto-dispatch for one call, backend by backend: the chosen one first, then each other one
    with the reason it was not chosen. ``arch`` (e.g. 80) overrides the device's; with
    ``check_available=False`` a hypothetical machine is described (nothing needs to be installed)."""
    if op not in TABLE:
        raise ValueError(f"op must be one of {', '.join(TABLE)}; got {op!r}")
    if arch is None:
        arch = device_arch(device)
    cands = {name: _why_not(op, name, device, dtype, limits, arch, head_dim, features, check_available)
             for name in OP_BACKENDS[op]}
    tensor_cores = {name: device.type == "cuda" and TABLE[op][name].tensor_cores(dtype, arch) for name in cands}
    chosen = "torch"
    if device.type == "cuda":
        takers = [name for name in capabilities.PREFERENCE[op] if cands[name] is None]
        chosen = ([name for name in takers if tensor_cores[name]] or takers or ["torch"])[0]
    verdicts = [Verdict(chosen, None, tensor_cores[chosen], True)]
    for name, reason in cands.items():
        if name == chosen:
            continue
        if reason is None:
            if device.type != "cuda":
                reason = "auto never picks it off CUDA (the interpreter is a correctness tool)"
            elif name == "torch":
                reason = "plain PyTorch is the last resort on CUDA"
            elif tensor_cores[chosen] and not tensor_cores[name]:
                reason = f"not tensor-core for {str(dtype)[6:]} on sm_{arch}; {chosen} is"
            else:
                reason = f"{chosen} comes first in the preference order"
        verdicts.append(Verdict(name, reason, tensor_cores[name], False))
    return verdicts


def requested(backend: Optional[str]) -> tuple[Optional[str], str]:
    """The backend a call asks for and where that came from: the ``backend`` argument, else the
    ``ASVIT_BACKEND`` environment variable; None (and "auto") means automatic choice."""
    if backend not in (None, "auto"):
        return backend, "backend argument"
    env = os.environ.get("ASVIT_BACKEND", "").strip().lower()
    if env and env != "auto":
        return env, "ASVIT_BACKEND"
    return None, "backend argument"


def pick(op: str, device: torch.device, backend: Optional[str] = None, dtype: torch.dtype = torch.float32,
         limits: Optional[Check] = None, *, head_dim: Optional[int] = None, features=()) -> str:
    """Resolve the backend for one call of ``op`` on ``dtype`` tensors living on ``device``.

    ``limits(backend)`` may add an op-specific reason a backend cannot take this call (a size limit);
    ``head_dim`` and ``features`` (attention) are checked against ``capabilities.TABLE``.
    """
    if backend is not None and not isinstance(backend, str):
        raise TypeError(f"backend must be a str or None, got {type(backend).__name__}")
    backend, source = requested(backend)
    if backend is None:
        if device.type != "cuda":
            return "torch"
        return explain(op, device, dtype, limits=limits, head_dim=head_dim, features=features)[0].backend
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of 'auto', {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    if backend not in OP_BACKENDS[op]:
        raise RuntimeError(f"{op} has no {backend} implementation (asked for by the {source}); "
                           f"it has: {', '.join(OP_BACKENDS[op])}")
    reason = _why_not(op, backend, device, dtype, limits, device_arch(device), head_dim, features, True)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} (from the {source}) cannot run here: {reason}")
    return backend
