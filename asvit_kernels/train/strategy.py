"""What a training schedule may change while the common loop (``train.trainer.Trainer``) runs.

A ``Strategy`` is asked at fixed points of the loop; every point is a no-op by default, so plain
training is ``Strategy()``. Subclasses: ``retokenize.Retokenize`` (As-ViT), ``autoprog.AutoProg``
(AutoProg, manual or searched growth) and ``vitas.SupernetTraining`` (ViTAS).

Contract (the trainer keeps it, strategies rely on it):

* Parameter shapes never change during a run: a model that "grows" is an ``ElasticViT`` whose
  active sub-network changes. So a checkpoint is always the same tensors, and resuming is: build
  the model as at the start, load the weights, ``load_state_dict(strategy_state)``, then
  ``on_train_start(trainer, resumed=True)``.
* Hooks run on every rank, in the same order, with the same arguments; a strategy must decide the
  same thing on every rank (derive randomness from the ``generator`` handed in, never from the
  global RNG, which drop path consumes differently per rank).
* ``state_dict()`` is JSON-serialisable and small (stage index, chosen configs, measured scores).

The trainer attributes a strategy may use (see ``Trainer``): ``model`` (unwrapped), ``emas`` (list
of ``EmaModel``, slowest decay last), ``reset_optimizer()``, ``config``
(``TrainConfig``), ``device``, ``epoch`` / ``step`` (global optimizer steps done),
``steps_per_epoch``, ``val_batches(limit)`` (held-out (images, labels) on ``device``),
``log(record)`` (one JSONL metrics record, rank 0 writes), ``resize(images, size)``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch

if TYPE_CHECKING:  # the trainer imports strategies' base; strategies only need the type
    from .trainer import Trainer

__all__ = ["Strategy"]


class Strategy:
    """Plain training: the model as built, the data's input size, the configured drop path."""

    name = "none"
    #: DistributedDataParallel must look for parameters a step leaves unused (sub-networks).
    find_unused_parameters = False

    def on_train_start(self, trainer: "Trainer", *, resumed: bool) -> None:
        """Once, after the model, EMAs and optimizer exist (and, when ``resumed``, after weights,
        EMAs, optimizer and this strategy's state were loaded): put the model in the
        configuration the state describes. Must not change weights when ``resumed``."""

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        """Before the first step of ``epoch`` (also when a run resumes in the middle of it, so it
        must be idempotent for an epoch already started): stage changes happen here."""

    def before_step(self, trainer: "Trainer", epoch: int, step_in_epoch: int,
                    generator: torch.Generator) -> Optional[int]:
        """Before each training step. ``generator`` is seeded from (seed, epoch, step) and is the
        same on every rank. Returns the square input size this step trains at (the batch is
        resized on the device), or None for the current ``input_size()``."""
        return None

    def after_step(self, trainer: "Trainer", epoch: int, step_in_epoch: int, loss: float) -> None:
        """After each optimizer step, with the step's (local, unreduced) loss as a float when the
        trainer computed one, else NaN (the trainer syncs the loss only every few steps)."""

    def on_epoch_end(self, trainer: "Trainer", epoch: int) -> None:
        """After the last step of ``epoch`` and before its evaluation and checkpoint."""

    def prepare_eval(self, module: torch.nn.Module) -> None:
        """Before ``module`` (the model or an EMA copy's module) is evaluated: e.g. select the
        sub-network to evaluate. The trainer puts the model back in training mode afterwards but
        does not undo anything done here; ``before_step`` re-selects what training needs."""

    def input_size(self) -> Optional[int]:
        """The square training/evaluation input size now (None: the data's own size)."""
        return None

    def drop_path_scale(self, epoch: int, epochs: int) -> float:
        """Multiplier of ``TrainConfig.drop_path`` in this epoch (AutoProg raises it per stage)."""
        return 1.0

    def describe(self) -> dict[str, Any]:
        """What the model is now (stage, tokenization, sub-network...) for logs and reports."""
        return {"strategy": self.name}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"strategy {self.name!r} has no state, got keys {sorted(state)}")
