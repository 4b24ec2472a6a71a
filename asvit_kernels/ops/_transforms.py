"""Whether a call runs under a ``torch.func`` transform (vmap, grad, vjp, jvp, jacrev...).

Custom ops with ``register_autograd`` cannot be transformed, so the ops switch to the torch
backend's composite form there: the same function, traced op by op, no fused kernel.
"""
import torch


def active() -> bool:
    return torch._C._are_functorch_transforms_active()


def plain_eager() -> bool:
    """Plain eager autograd: not compiling, no dispatch mode (FakeTensorMode, FlopCounterMode...)
    active. There an op may run its bodies under a ``torch.autograd.Function`` instead of its
    custom op, whose Python dispatch and autograd wrapper cost ~0.5 ms per call on a CPU; the
    custom op stays for torch.compile and the modes, which need its schema and fake."""
    return not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0
