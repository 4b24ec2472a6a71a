"""Triton kernels: pure functions of tensors, no autograd, no module state.

Imported lazily by ``asvit_kernels.ops`` on the first call that picks the Triton backend, so that
``TRITON_INTERPRET=1`` set after ``import asvit_kernels`` still takes effect.
"""
