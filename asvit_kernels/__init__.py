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


def build_info() -> dict:
    """What this install has: version, the CUDA extension and its build, the usable backends."""
    cfg = _ext.BUILD_CONFIG
    usable = ["torch"]
    if backends.why_unavailable("triton", torch.device("cuda" if torch.cuda.is_available() else "cpu")) is None:
        usable.append("triton")
    if _ext.cuda_device_available():
        usable.append("cuda")
    return {
        "version": __version__,
        "cuda_extension": _ext.C is not None,
        "cuda_extension_missing_reason": _ext.MISSING_REASON,
        "cuda_archs": list(cfg["cuda_archs"]),
        "cuda_version": cfg["cuda_version"],
        "cuda_device_available": _ext.cuda_device_available(),
        "backends_available": usable,
        "triton_interpreted": backends.triton_interpreted(),
        "torch_version": torch.__version__,
    }
