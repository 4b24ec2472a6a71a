"""Markers shared by the tests of the compiled extension."""
import pytest

from asvit_kernels import _ext

C = _ext.C
HAS_DEVICE = _ext.cuda_device_available()

needs_ext = pytest.mark.skipif(C is None, reason=f"asvit_kernels._C is not loaded: {_ext.MISSING_REASON}")
needs_no_device = pytest.mark.skipif(HAS_DEVICE, reason="a CUDA device is present")


def _gpu_skip_reason():
    if C is None:
        return f"asvit_kernels._C is not loaded: {_ext.MISSING_REASON}"
    if not HAS_DEVICE:
        return "no CUDA device visible to asvit_kernels._C"
    import torch
    if not torch.cuda.is_available():
        return "torch sees no CUDA device (CPU-only torch build?)"
    return None


def gpu(fn):
    """Mark a test as GPU-only and skip it without a CUDA device."""
    reason = _gpu_skip_reason()
    fn = pytest.mark.gpu(fn)
    return pytest.mark.skipif(reason is not None, reason=reason or "")(fn)
