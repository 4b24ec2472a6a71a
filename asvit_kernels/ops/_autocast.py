"""Autocast for the custom ops. ``torch.autocast`` does not look inside a custom op, so each public
op applies autocast's rule for its aten counterpart itself, before validation and dispatch; the
casts are ordinary differentiable ``.to`` calls, so gradients reach the fp32 parameters in fp32.

* matmul-like ops (``elastic_linear``, attention): floating inputs other than float64 are cast to
  the autocast dtype of their device, as ``F.linear`` / SDPA are.
* ``elastic_layer_norm``: as ``F.layer_norm`` under autocast: float32 on CUDA (its fp32 list); on
  the CPU ``layer_norm`` is on no list and runs in the input's dtype, so the affine parameters
  follow ``x``. Statistics are float32 inside every backend either way.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

Tensor = torch.Tensor
_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def enabled(device: torch.device) -> bool:
    """Whether autocast is on for ``device``'s type (never for "meta": autocast has no such type,
    and shape-only passes such as FLOP counting run there)."""
    return device.type != "meta" and torch.is_autocast_enabled(device.type)


def _to(dtype: torch.dtype, tensors) -> tuple[Optional[Tensor], ...]:
    return tuple(t.to(dtype) if isinstance(t, Tensor) and t.dtype in _CASTABLE else t for t in tensors)


def matmul_inputs(device: torch.device, *tensors: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """``tensors`` as a matmul-like op sees them under the current autocast (unchanged without it)."""
    if not enabled(device):
        return tensors
    return _to(torch.get_autocast_dtype(device.type), tensors)


def layer_norm_inputs(x: Tensor, *params: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
    """``(x, *params)`` as ``F.layer_norm`` sees them under the current autocast (see module doc)."""
    if not enabled(x.device) or x.dtype == torch.float64:
        return (x, *params)
    if x.device.type == "cuda":
        return _to(torch.float32, (x, *params))
    return (x, *_to(x.dtype, params))


def off(fn):
    """Run a custom op's body with autocast off on its first tensor's device: the inputs were cast
    already, and a kernel body must see exactly the dtypes it allocated its outputs for."""
    @functools.wraps(fn)
    def body(*args, **kwargs):
        t = next(a for a in args if isinstance(a, Tensor))
        if not enabled(t.device):
            return fn(*args, **kwargs)
        with torch.autocast(t.device.type, enabled=False):
            return fn(*args, **kwargs)
    return body
