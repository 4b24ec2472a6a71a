"""Importing the real timm in tests, or None when it does not import (nothing is installed here).

torchvision workaround (test-only). timm imports torchvision; PyPI's torchvision wheel is a CUDA
build whose compiled ``torchvision/_C.so`` fails to load next to the CPU torch (it links CUDA
libraries), after which ``import torchvision`` dies registering fake kernels for the operators
``torchvision::nms`` and ``torchvision::qnms`` that the library would have defined. When (and only
when) loading ``_C.so`` fails, ``import_timm`` defines exactly those two operator schemas,
``nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor`` and the same for ``qnms``, with
``torch.library.Library("torchvision", "DEF")`` and no kernel, before importing timm. Nothing here
calls them (NMS is detection post-processing); calling one would raise "no kernel" errors.
"""
import importlib.util
import os

import torch

_TV_LIB = None  # keeps the schema definitions alive for the session


def import_timm():
    """timm, or None when it (or torchvision) does not import."""
    global _TV_LIB
    spec = importlib.util.find_spec("torchvision")
    if spec is not None and spec.submodule_search_locations and _TV_LIB is None:
        so = os.path.join(list(spec.submodule_search_locations)[0], "_C.so")
        try:
            torch.ops.load_library(so)
        except (OSError, RuntimeError):
            if not hasattr(torch.ops.torchvision, "nms"):
                _TV_LIB = torch.library.Library("torchvision", "DEF")
                for op in ("nms", "qnms"):
                    _TV_LIB.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    try:
        import timm
    except ImportError:
        return None
    return timm
