"""Exponential moving averages of a model's weights (MoGrow's momentum copies, evaluation EMA).

A thin wrapper over ``torch.optim.swa_utils.AveragedModel`` with an EMA average function (one fused
``_foreach_lerp_`` per update), adding what training schedules need: ``reset`` to restart the
average from the model's current weights (after MoGrow grew the model, or at a re-tokenization
switch), optionally with a warm-up, and flat state dicts.

Warm-up (``reset(model, warmup=True)``): the k-th update after the reset uses the decay
``min(decay, (1 + k) / (10 + k))`` (TensorFlow's ``ExponentialMovingAverage`` with
``num_updates``), so a restarted copy follows the model closely at first instead of holding the
weights of the reset for ~1/(1 - decay) steps. ``warming`` says whether it is on; the trainer's
checkpoint keeps ``n_averaged`` (updates since the reset + 1), a strategy restores ``warming``.
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
        self.warming = False
        self._since_reset = 0  # updates since the copy was made or reset (n_averaged - 1, kept on the host)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def current_decay(self) -> float:
        """The decay the next update uses (below ``decay`` only while warming up)."""
        if not self.warming:
            return self.decay
        k = self._since_reset
        return min(self.decay, (1.0 + k) / (10.0 + k))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        if decay == self.decay:
            self.averaged.update_parameters(model)
        else:
            ema = [t for t in self._tensors(self.module) if t.is_floating_point()]
            now = [t.detach() for t in self._tensors(model) if t.is_floating_point()]
            torch._foreach_lerp_(ema, now, 1.0 - decay)
            self.averaged.n_averaged += 1
        self._since_reset += 1

    @staticmethod
    def _tensors(module: nn.Module) -> list[torch.Tensor]:
        return list(module.parameters()) + list(module.buffers())  # AveragedModel's order (use_buffers)

    @torch.no_grad()
    def reset(self, model: nn.Module, *, warmup: bool = False) -> None:
        """Restart the average from ``model``'s current weights (``warmup``: module docstring)."""
        self.module.load_state_dict(model.state_dict())
        self.averaged.n_averaged.fill_(1)
        self._since_reset, self.warming = 0, bool(warmup)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict(state)
        self._since_reset = int(self.averaged.n_averaged.item()) - 1
