"""Model families built on asvit_kernels.nn / ops, installed as ``asvit_kernels.models``."""
from __future__ import annotations

from torch import nn

__all__ = ["count_params"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements; shared parameters (one tensor reachable twice) count once."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
