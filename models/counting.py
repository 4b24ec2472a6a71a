"""Model size: parameters and multiply-adds (MACs) of a forward pass at a given input size."""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import asvit_kernels.ops  # noqa: F401  (registers the fused ops' FLOP formulas)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements; shared parameters (one tensor reachable twice) count once."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _input_shape(input_size: Union[int, Sequence[int]]) -> tuple[int, ...]:
    if isinstance(input_size, int) and not isinstance(input_size, bool):
        shape = (3, input_size, input_size)
    elif isinstance(input_size, (tuple, list)) and all(isinstance(s, int) for s in input_size):
        shape = tuple(input_size)
        shape = (3, *shape) if len(shape) == 2 else shape
    else:
        raise TypeError(f"input_size must be an int side or a (C, H, W) / (H, W) tuple, got {input_size!r}")
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_size must give a positive (C, H, W), got {input_size!r}")
    return shape


@torch.no_grad()
def count_flops(model: nn.Module, input_size: Union[int, Sequence[int]] = 224) -> int:
    """Multiply-adds of one image's forward pass: every linear and conv layer, and attention's
    QK^T and AV for the token counts the model actually runs (windows, re-tokenized grids), as
    counted by ``torch.utils.flop_counter`` (matmuls, convs, SDPA and the fused ops), halved to MACs.
    Normalisations, activations and softmax are not counted, as in the papers' tables.

    Runs one forward of a random image on the model's device and dtype, in eval mode (the
    training flag is restored).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    shape = _input_shape(input_size)
    p = next(model.parameters(), None)
    device, dtype = (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter:
            model(torch.randn(1, *shape, device=device, dtype=dtype))
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2
