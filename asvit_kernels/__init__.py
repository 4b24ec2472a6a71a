"""asvit-kernels: GPU kernels (Triton, CUDA C++) behind PyTorch ops for Vision-Transformer search
and training, and the layers that use them.

Importing never fails for lack of the compiled extension or of a GPU: ``build_info()`` says what
this install has and why anything is missing.
"""
from __future__ import annotations

import torch

from . import _ext, backends, compat, nn, reference
from ._version import __version__
from .ops import (attention, circle_curve, cu_seqlens_from_lengths, elastic_layer_norm, elastic_linear,
                  length_distortion, ntk, ntk_condition_number, pack, per_sample_grad_gram, unpack,
                  varlen_attention)
from .ranges import channel_indices

__all__ = ["__version__", "build_info", "channel_indices", "elastic_linear", "elastic_layer_norm",
           "varlen_attention", "attention", "pack", "unpack", "cu_seqlens_from_lengths",
           "per_sample_grad_gram", "ntk", "ntk_condition_number", "circle_curve", "length_distortion",
           "backends", "compat", "nn", "reference"]


def _cuda_devices() -> "list[tuple[int, str, tuple[int, int]]]":
    """(index, name, capability) of every CUDA device torch sees; [] without one (or a driver)."""
    try:
        if not torch.cuda.is_available():
            return []
        return [(i, torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
                for i in range(torch.cuda.device_count())]
    except Exception:  # noqa: BLE001 - a broken driver must not break build_info()
        return []


def _dispatch() -> dict:
    """Per op and dtype, on this machine's default device: the backend auto-dispatch picks and why
    each other one is not picked (``asvit info --op`` for one call with a head dim or features)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    for op in backends.OP_BACKENDS:
        out[op] = {}
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            chosen, *others = backends.explain(op, device, dtype)
            out[op][str(dtype)[6:]] = {"chosen": chosen.backend, "tensor_cores": chosen.tensor_cores,
                                       "not_chosen": {v.backend: v.reason for v in others}}
    return out


def build_info() -> dict:
    """What this install has: version, the CUDA extension and its build, the usable backends.

    With ``_C`` built: ``cuda_version`` (the toolkit), ``cuda_sass_archs`` / ``cuda_ptx_archs`` (read
    from the module itself), ``min_driver`` (the oldest NVIDIA driver series for the SASS, and for
    JIT-compiling the PTX). On a machine with GPUs, ``gpus`` says per device whether SASS or PTX
    covers its compute capability, and ``gpu_not_covered`` is one sentence naming the devices the
    ``cuda`` backend cannot run on (None when all are covered). ``dispatch``: per op and dtype,
    the backend auto-dispatch picks here and why each other one is not picked.
    """
    cfg = _ext.BUILD_CONFIG
    usable = ["torch"]
    if backends.why_unavailable("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu")) is None:
        usable.append("triton")
    if _ext.cuda_device_available():
        usable.append("cuda")
    archs, version = list(cfg["cuda_archs"]), cfg["cuda_version"]
    if _ext.C is not None:  # the module's own record of what it holds
        archs, version = list(_ext.C.compiled_archs()), _ext.C.cuda_version()
    ptx = _ext.ptx_archs(archs)
    gpus, not_covered = _ext.gpu_coverage(_cuda_devices(), archs, ptx, version) if _ext.C is not None \
        else ([], None)
    return {
        "version": __version__,
        "cuda_extension": _ext.C is not None,
        "cuda_extension_missing_reason": _ext.MISSING_REASON,
        "cuda_archs": list(cfg["cuda_archs"]),
        "cuda_version": version,
        "cuda_sass_archs": [f"sm_{a}" for a in archs],
        "cuda_ptx_archs": [f"compute_{a}" for a in ptx],
        "min_driver": _ext.min_driver(version) if archs else {"sass": None, "ptx_jit": None},
        "cuda_device_available": _ext.cuda_device_available(),
        "gpus": gpus,
        "gpu_not_covered": not_covered,
        "backends_available": usable,
        "triton_interpreted": backends.triton_interpreted(),
        "dispatch": _dispatch(),
        "torch_version": torch.__version__,
    }
