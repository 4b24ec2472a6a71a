"""Exponential moving averages of a model's weights (MoGrow's momentum copies, evaluation EMA).

A thin wrapper over ``torch.optim.swa_utils.AveragedModel`` with an EMA average function (one fused
``_foreach_lerp_`` per update), adding what training schedules need: ``reset`` to restart the
average from the model's current weights (after MoGrow grew the model) and flat state dicts.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

__all__ = ["EmaModel"]


class EmaModel:
    """``module`` holds ``decay * module + (1 - decay) * model`` after each ``update(model)``;
    buffers (none in our models) are averaged too. ``module`` stays in eval mode, without grads."""

    def __init__(self, model: nn.Module, decay: float):
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be a float in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.decay), use_buffers=True)
        self.averaged.requires_grad_(False).eval()
        self.averaged.n_averaged.fill_(1)  # the copy already is the model: the first update is an EMA step

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Restart the average from ``model``'s current weights."""
        self.module.load_state_dict(model.state_dict())
        self.averaged.n_averaged.fill_(1)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict(state)
