"""Which parameters a training-free indicator differentiates: the ``params=`` argument of ``ntk``."""
from __future__ import annotations

from typing import Callable, Union

import torch
from torch import nn

ParamSelector = Union[str, Callable[[str, torch.nn.Parameter], bool]]


def select_parameters(model: nn.Module, params: ParamSelector = "all") -> list[tuple[str, nn.Parameter]]:
    """``"all"``: every parameter that requires grad; ``"weights"``: those whose name contains
    "weight" (As-ViT / TENAS); or a callable ``(name, param) -> bool``. Raises ValueError when the
    selection is empty."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if params == "all":
        keep = lambda n, p: True  # noqa: E731
    elif params == "weights":
        keep = lambda n, p: "weight" in n  # noqa: E731
    elif callable(params):
        keep = params
    else:
        raise ValueError(f"params must be 'all', 'weights' or a callable (name, param) -> bool, got {params!r}")
    chosen = [(n, p) for n, p in model.named_parameters() if p.requires_grad and keep(n, p)]
    if not chosen:
        raise ValueError(f"params={params!r} selects no parameter of {type(model).__name__} that requires grad")
    return chosen
