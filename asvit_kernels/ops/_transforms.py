"""Whether a call runs under a ``torch.func`` transform (vmap, grad, vjp, jvp, jacrev...).

Custom ops with ``register_autograd`` cannot be transformed, so the ops switch to the torch
backend's composite form there: the same function, traced op by op, no fused kernel.
"""
import torch


def active() -> bool:
    return torch._C._are_functorch_transforms_active()
