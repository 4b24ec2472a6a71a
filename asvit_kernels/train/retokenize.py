"""As-ViT's progressive re-tokenization (ALGORITHMS.md): the same stage-1 patch-embedding weights
with a larger stride and dilation early in training, so the token grid is coarse and steps are
cheap, then finer grids later.

The paper's schedule (K1 = 4, 300 epochs): epochs [0, 80) stride 16 / dilation 5, [80, 130)
stride 8 / dilation 2, [130, 300) stride 4 / dilation 1. Here it is fractions of training
(0, 80/300, 130/300) and stride multipliers (4, 2, 1) of the base stride 4.

Scaling to other kernels and input sizes (our rule, which reproduces the paper's K1 = 4 numbers):
  * dilation = max(1, round((stride - 1) / (K1 - 1))): the dilated kernel spans about one stride,
    so coarse tokens still see every pixel (K1 = 4: 16 -> 5, 8 -> 2, 4 -> 1; K1 = 8: 16 -> 2, 8 -> 1).
  * the stride is capped so the stage-1 grid keeps the sides the three merges need
    (``models.asvit.MIN_STAGE1_GRID``): at 32 px the coarsest stride is 7. Stages that the cap makes
    identical to the next one are merged.
Stage k covers epochs [round(f_k * epochs), round(f_{k+1} * epochs)); an empty stage is skipped.

The EMA copies at a switch (``ema_at_switch``): "keep" goes on averaging across it, so right after
it they hold weights trained under the previous tokenization; "reseed" restarts them from the
model's weights at the switch, so they only average weights trained under the new one;
"restart" reseeds them and restarts a warm-up (``train.ema``: the decay ramps up from 0.1 again),
so they follow the model while it adapts to the new tokens. Measured on the quick preset:
bench/results/ema_at_switch_cpu2t.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

from asvit_kernels.models.asvit import MIN_STAGE1_GRID
from asvit_kernels.models.asvit import STAGE1_STRIDE as BASE_STRIDE

from .strategy import Strategy

__all__ = ["TokenStage", "PAPER_FRACTIONS", "PAPER_MULTIPLIERS", "token_stages", "parse_stages", "Retokenize",
           "stage_epochs", "EMA_AT_SWITCH"]

PAPER_FRACTIONS = (0.0, 80 / 300, 130 / 300)
PAPER_MULTIPLIERS = (4, 2, 1)
EMA_AT_SWITCH = ("keep", "reseed", "restart")


@dataclass(frozen=True)
class TokenStage:
    """From ``start`` (fraction of training, in [0, 1)) on: stage-1 ``stride`` and ``dilation``."""

    start: float
    stride: int
    dilation: int

    def text(self) -> str:
        return f"stride {self.stride} dilation {self.dilation}"


def dilation_for(stride: int, kernel: int) -> int:
    return max(1, round((stride - 1) / max(1, kernel - 1)))


def max_stride(img_size: int) -> int:
    """The largest stride whose grid ceil(img_size / stride) is still >= MIN_STAGE1_GRID."""
    s = BASE_STRIDE
    while math.ceil(img_size / (s + 1)) >= MIN_STAGE1_GRID:
        s += 1
    return s


def token_stages(kernel: int, img_size: int, fractions: Sequence[float] = PAPER_FRACTIONS,
                 multipliers: Sequence[int] = PAPER_MULTIPLIERS) -> list[TokenStage]:
    """The paper's schedule scaled to stage-1 kernel ``kernel`` and input ``img_size`` (module doc)."""
    for name, v in (("kernel", kernel), ("img_size", img_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if len(fractions) != len(multipliers) or not fractions:
        raise ValueError(f"fractions and multipliers must be non-empty and of equal length, got {fractions!r} "
                         f"and {multipliers!r}")
    cap = max_stride(img_size)
    stages = [TokenStage(float(f), min(BASE_STRIDE * m, cap), dilation_for(min(BASE_STRIDE * m, cap), kernel))
              for f, m in zip(fractions, multipliers)]
    return _checked(stages)


def parse_stages(text: str, kernel: int, img_size: int) -> list[TokenStage]:
    """``"paper"`` (the scaled paper schedule), ``"none"`` (one stage, stride 4, dilation 1), or
    ``"FRACTION:STRIDE[:DILATION],..."`` e.g. ``"0:16:5,0.267:8:2,0.433:4:1"`` (dilation default:
    the module's rule for ``kernel``). ValueError naming the bad part."""
    if not isinstance(text, str):
        raise TypeError(f"schedule must be a string, got {type(text).__name__}")
    if text == "paper":
        return token_stages(kernel, img_size)
    if text == "none":
        return [TokenStage(0.0, BASE_STRIDE, 1)]
    stages = []
    for part in text.split(","):
        fields = part.strip().split(":")
        try:
            if len(fields) not in (2, 3):
                raise ValueError
            f, s = float(fields[0]), int(fields[1])
            d = int(fields[2]) if len(fields) == 3 else dilation_for(s, kernel)
        except ValueError:
            raise ValueError(f"retokenization schedule part {part!r} is not FRACTION:STRIDE[:DILATION] "
                             f"(or use 'paper' / 'none')") from None
        stages.append(TokenStage(f, s, d))
    return _checked(stages, img_size)


def _checked(stages: list[TokenStage], img_size: Optional[int] = None) -> list[TokenStage]:
    if stages[0].start != 0.0:
        raise ValueError(f"the first retokenization stage must start at 0, got {stages[0].start}")
    for a, b in zip(stages, stages[1:]):
        if not a.start < b.start < 1.0:
            raise ValueError(f"retokenization stage starts must increase within [0, 1), got {a.start} then {b.start}")
    for st in stages:
        if st.stride < 1 or st.dilation < 1:
            raise ValueError(f"stride and dilation must be >= 1, got {st}")
        if img_size is not None and math.ceil(img_size / st.stride) < MIN_STAGE1_GRID:
            raise ValueError(f"stride {st.stride} gives a {math.ceil(img_size / st.stride)}-token grid side at "
                             f"{img_size} px; As-ViT needs >= {MIN_STAGE1_GRID} (stride <= {max_stride(img_size)})")
    merged = [stages[0]]
    for st in stages[1:]:  # a capped stage equal to the previous one is the same stage
        if (st.stride, st.dilation) != (merged[-1].stride, merged[-1].dilation):
            merged.append(st)
    return merged


def stage_epochs(stages: Sequence[TokenStage], epochs: int) -> list[int]:
    """First epoch of each stage for a run of ``epochs`` epochs."""
    return [round(st.start * epochs) for st in stages]


class Retokenize(Strategy):
    """Progressive re-tokenization of an ``AsViT`` (``model.set_tokenization(stride, dilation)``).

    ``stages``: a list of ``TokenStage`` (``token_stages`` / ``parse_stages``). The model's
    weights never change shape; evaluation runs at the current tokenization (the final stage is
    the full-resolution one, so the end-of-training accuracy is the model's real accuracy).
    ``ema_at_switch``: "keep", "reseed" or "restart" the trainer's EMA copies at a switch (module doc).
    """

    name = "retokenize"

    def __init__(self, stages: Sequence[TokenStage], *, ema_at_switch: str = "keep"):
        stages = list(stages)
        if not stages or not all(isinstance(s, TokenStage) for s in stages):
            raise TypeError("stages must be a non-empty list of TokenStage")
        if ema_at_switch not in EMA_AT_SWITCH:
            raise ValueError(f"ema_at_switch must be one of {EMA_AT_SWITCH}, got {ema_at_switch!r}")
        self.stages = _checked(stages)
        self.ema_at_switch = ema_at_switch
        self.current: Optional[int] = None

    def stage_at(self, epoch: int, epochs: int) -> int:
        starts = stage_epochs(self.stages, epochs)
        return max(i for i, s in enumerate(starts) if s <= epoch)

    def _apply(self, trainer, index: int) -> None:
        st = self.stages[index]
        if not hasattr(trainer.model, "set_tokenization"):
            raise TypeError(f"re-tokenization needs a model with set_tokenization (AsViT), got "
                            f"{type(trainer.model).__name__}")
        trainer.model.set_tokenization(st.stride, st.dilation)
        for e in trainer.emas:
            e.module.set_tokenization(st.stride, st.dilation)
        self.current = index

    def on_train_start(self, trainer, *, resumed: bool) -> None:
        # Between epochs the stage change (and its log record) is on_epoch_start's job, so resume
        # in the stage of the epoch just finished; mid-epoch, in the stage of the current one.
        epoch = trainer.epoch if trainer.step_in_epoch or trainer.epoch == 0 else trainer.epoch - 1
        self._apply(trainer, self.stage_at(min(epoch, trainer.config.epochs - 1), trainer.config.epochs))
        for e in trainer.emas:  # a copy restarted at an earlier switch is still warming up (ema.EmaModel)
            e.warming = self.ema_at_switch == "restart" and self.current > 0

    def on_epoch_start(self, trainer, epoch: int) -> None:
        k = self.stage_at(epoch, trainer.config.epochs)
        if k != self.current:
            self._apply(trainer, k)
            reseed = self.ema_at_switch != "keep" and bool(trainer.emas)
            for e in trainer.emas if reseed else ():  # a resume between epochs redoes this from the same weights
                e.reset(trainer.model, warmup=self.ema_at_switch == "restart")
            trainer.log({"event": "retokenize", "stage": k, "stride": self.stages[k].stride,
                         "dilation": self.stages[k].dilation,
                         "ema": {"keep": "kept", "reseed": "reseeded", "restart": "restarted"}[self.ema_at_switch]
                         if trainer.emas else None})

    def describe(self) -> dict[str, Any]:
        k = 0 if self.current is None else self.current
        return {"strategy": self.name, "stage": k, "stride": self.stages[k].stride,
                "dilation": self.stages[k].dilation}

    def schedule_text(self, epochs: int) -> str:
        starts = stage_epochs(self.stages, epochs) + [epochs]
        return "; ".join(f"epochs [{a}, {b}): {st.text()}" for st, a, b in zip(self.stages, starts, starts[1:]) if b > a)

    def state_dict(self) -> dict[str, Any]:
        return {"stages": [[s.start, s.stride, s.dilation] for s in self.stages], "ema_at_switch": self.ema_at_switch}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        saved = [list(s) for s in state.get("stages", [])]
        mine = self.state_dict()["stages"]
        if saved != mine:
            raise ValueError(f"the checkpoint was trained with retokenization stages {saved}, this run has {mine}")
        saved_ema = state.get("ema_at_switch", "keep")  # checkpoints from before the option kept the EMA
        if saved_ema != self.ema_at_switch:
            raise ValueError(f"the checkpoint was trained with ema_at_switch={saved_ema!r}, this run has "
                             f"{self.ema_at_switch!r}: use the same setting to resume")
