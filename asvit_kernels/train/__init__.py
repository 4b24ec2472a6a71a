"""Training: the common loop (``Trainer``, ``TrainConfig``), the schedules that run on it
(As-ViT re-tokenization, AutoProg growth, ViTAS supernet training), data and checkpoints.

Submodules are imported lazily by their users; ``from asvit_kernels.train import Trainer`` works.
"""
from .strategy import Strategy
from .trainer import NonFiniteLossError, TrainConfig, Trainer

__all__ = ["Strategy", "Trainer", "TrainConfig", "NonFiniteLossError"]
