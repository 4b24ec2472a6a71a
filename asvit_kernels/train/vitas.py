"""ViTAS supernet training (ALGORITHMS.md, "ViTAS"): every training step trains one random
sub-network of an ``ElasticViT`` super-transformer.

What a step does: ``before_step`` draws ``model.sample_subnet(generator, p_identity=p_id)`` from the
generator the trainer hands in (seeded from (seed, epoch, step), the same on every rank, so every
rank trains the same sub-network) and selects it with ``model.set_subnet``. The input size stays the
supernet's ``img_size`` (every patch size divides it).

Depth distribution (our reading of "identity chosen with probability p_id"): each of the
``space.num_slots`` layer slots is an identity with probability ``p_id``, conditioned on the number of
blocks being an allowed depth (``subnet.sample_subnet``); the identities are shifted to the end
(identity shifting), so a sub-network of depth d runs slots 0..d-1. ``p_id`` is

* ``p_identity`` when given (``flops_range`` is then only reported, not used), else
* calibrated in ``on_train_start`` with ``search.evolution.calibrate_identity_prob`` so that the mean
  FLOPs of random sub-networks is the centre of ``flops_range`` (deterministic: it depends only on
  the space, the image size, the window, ``calibration_samples`` and ``TrainConfig.seed``), else
* None when neither is given: the depth is uniform over ``space.depths`` (``sample_subnet``'s default).

Weight sharing (first-k / last-k / cyclic channel ranges, private q/k per heads choice) is the
``ElasticViT``'s own ``sharing`` / ``private_qk`` arguments; this strategy works with any of them.

Evaluation (``prepare_eval``): the model and each EMA copy are evaluated as ``eval_config``:
"largest" (``space.largest()``: every width and the depth at their maximum, the smallest patch),
"smallest" (``smallest_config``: every width at its minimum, the fewest layers, the largest patch) or
a given ``SubnetConfig``. Searching the trained supernet is ``search.evolution.search``.

Accounting: per epoch only (reset in ``on_epoch_start``), so it needs no state across a resume: the
number of steps, the histograms of sampled depths and patch sizes and the mean sampled FLOPs
(``ElasticViT.subnet_flops``: multiply-adds of one image). ``on_epoch_end`` logs one record
``{"epoch", "vitas_steps", "vitas_mean_flops", "vitas_mean_depth", "vitas_depth_hist",
"vitas_patch_hist", "p_identity"}`` (nothing when the epoch trained no step here, e.g. a run
resumed at its very end).

State (``state_dict``, JSON): ``{"p_identity": float | None, "flops_range": [lo, hi] | None}``. A
resumed run recomputes ``p_id`` from its own arguments and raises ``ValueError`` when the value or
the window differs from the checkpoint's (a resumed run must sample as the interrupted one did).
"""
from __future__ import annotations

import logging
import math
from collections import Counter
from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

import torch

from asvit_kernels.models.elastic_vit import ElasticViT
from asvit_kernels.models.subnet import SubnetConfig, SubnetSpace
from asvit_kernels.search.evolution import calibrate_identity_prob, config_to_dict

from .strategy import Strategy

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["SupernetTraining", "smallest_config"]

logger = logging.getLogger(__name__)

EvalConfig = Union[str, SubnetConfig]
EVAL_CONFIGS = ("largest", "smallest")


def smallest_config(space: SubnetSpace) -> SubnetConfig:
    """The cheapest sub-network of ``space``: the largest patch (fewest tokens), the narrowest embed
    dim, the fewest layers, and per layer the narrowest q/k/v width some heads choice divides, the
    fewest heads dividing it and the narrowest MLP."""
    if not isinstance(space, SubnetSpace):
        raise TypeError(f"space must be a SubnetSpace, got {type(space).__name__}")
    q = space.usable_qkv_dims[0]
    d = space.depths[0]
    return SubnetConfig(space.patch_sizes[-1], space.embed_dims[0], (space.heads_for(q)[0],) * d, (q,) * d,
                        (space.mlp_dims[0],) * d)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_flops_range(flops_range) -> Optional[tuple[float, float]]:
    if flops_range is None:
        return None
    if isinstance(flops_range, (str, bytes)) or not isinstance(flops_range, (tuple, list)) or len(flops_range) != 2:
        raise TypeError(f"flops_range must be None or a (low, high) pair of numbers, got {flops_range!r}")
    if not all(_is_number(v) for v in flops_range):
        raise TypeError(f"flops_range must hold two numbers (low, high), got {flops_range!r}")
    lo, hi = (float(v) for v in flops_range)
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
        raise ValueError(f"flops_range must satisfy 0 <= low <= high (finite), got {flops_range!r}")
    return lo, hi


class SupernetTraining(Strategy):
    """ViTAS supernet training: one random sub-network per step (see the module docstring).

    Args:
        flops_range: ``(low, high)`` multiply-adds of one image at the supernet's ``img_size``: the
            window the mean FLOPs of random sub-networks is calibrated into (its centre), when
            ``p_identity`` is not given.
        p_identity: the identity probability of each layer slot, in [0, 1]; given, it is used as is.
            Neither given: uniform depth over ``space.depths``.
        eval_config: the sub-network ``prepare_eval`` selects: "largest", "smallest" or a
            ``SubnetConfig`` of the supernet's space (checked in ``on_train_start``).
        calibration_samples: sub-networks per depth of the Monte-Carlo FLOPs means of the calibration.
    """

    name = "vitas"
    find_unused_parameters = True

    def __init__(self, *, flops_range: Optional[tuple[float, float]] = None, p_identity: Optional[float] = None,
                 eval_config: EvalConfig = "largest", calibration_samples: int = 256):
        self.flops_range = _check_flops_range(flops_range)
        if p_identity is not None:
            if not _is_number(p_identity):
                raise TypeError(f"p_identity must be None or a number in [0, 1], got {p_identity!r}")
            if not 0.0 <= float(p_identity) <= 1.0:
                raise ValueError(f"p_identity must be a probability in [0, 1], got {p_identity!r}")
            p_identity = float(p_identity)
        if isinstance(eval_config, str):
            if eval_config not in EVAL_CONFIGS:
                raise ValueError(f"eval_config must be one of {EVAL_CONFIGS} or a SubnetConfig, got {eval_config!r}")
        elif not isinstance(eval_config, SubnetConfig):
            raise TypeError(f"eval_config must be one of {EVAL_CONFIGS} or a SubnetConfig, "
                            f"got {type(eval_config).__name__}")
        if isinstance(calibration_samples, bool) or not isinstance(calibration_samples, int):
            raise TypeError(f"calibration_samples must be an int, got {calibration_samples!r}")
        if calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {calibration_samples}")
        self.eval_config = eval_config
        self.calibration_samples = calibration_samples
        self._given_p = p_identity
        #: The identity probability in use (None: uniform depth); set by ``on_train_start``.
        self.p_identity: Optional[float] = p_identity
        self._started = False
        self._loaded: Optional[dict[str, Any]] = None
        self._sharing: Optional[str] = None
        self._reset_accounting()

    # ------------------------------------------------------------------ hooks

    def on_train_start(self, trainer: "Trainer", *, resumed: bool) -> None:
        model = trainer.model
        if not isinstance(model, ElasticViT):
            raise TypeError(f"model must be an ElasticViT (the ViTAS supernet), got {type(model).__name__}")
        if isinstance(self.eval_config, SubnetConfig):
            try:
                model.space.validate(self.eval_config)
            except ValueError as e:
                raise ValueError(f"eval_config is not a sub-network of the model's space: {e}") from None
        p = self._given_p
        if p is None and self.flops_range is not None:
            p = calibrate_identity_prob(model.space, model.img_size, self.flops_range,
                                        samples=self.calibration_samples, seed=trainer.config.seed,
                                        num_classes=model.num_classes, in_chans=model.in_chans)
        if self._loaded is not None:
            saved_p, saved_range = self._loaded["p_identity"], self._loaded["flops_range"]
            same_p = (saved_p is None) == (p is None) and (p is None or math.isclose(p, saved_p, rel_tol=1e-9,
                                                                                    abs_tol=1e-12))
            same_range = (None if saved_range is None else tuple(saved_range)) == self.flops_range
            if not (same_p and same_range):
                raise ValueError(
                    f"the checkpoint was trained with p_identity={saved_p!r}, flops_range={saved_range!r}; these "
                    f"settings give p_identity={p!r}, flops_range={self.flops_range!r}: resume with the same "
                    "flops_range / p_identity / calibration_samples / seed")
        self.p_identity = p
        self._sharing = model.sharing
        self._started = True
        logger.info("ViTAS supernet training: p_identity=%s (%s depth), sharing=%s, eval=%s",
                    p, "uniform" if p is None else "binomial", model.sharing,
                    self.eval_config if isinstance(self.eval_config, str) else config_to_dict(self.eval_config))

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        self._reset_accounting()

    def before_step(self, trainer: "Trainer", epoch: int, step_in_epoch: int,
                    generator: torch.Generator) -> Optional[int]:
        if not self._started:
            raise RuntimeError("SupernetTraining.before_step called before on_train_start")
        model = trainer.model
        cfg = model.set_subnet(model.sample_subnet(generator, p_identity=self.p_identity))
        self._steps += 1
        self._flops_sum += model.subnet_flops(cfg)
        self._depth_sum += cfg.depth
        self._depths[cfg.depth] += 1
        self._patches[cfg.patch_size] += 1
        return None

    def on_epoch_end(self, trainer: "Trainer", epoch: int) -> None:
        if self._steps == 0:
            return
        trainer.log({"epoch": epoch, "vitas_steps": self._steps, **self._means(),
                     "vitas_depth_hist": self._hist(self._depths), "vitas_patch_hist": self._hist(self._patches),
                     "p_identity": self.p_identity})

    def prepare_eval(self, module: torch.nn.Module) -> None:
        if not isinstance(module, ElasticViT):
            raise TypeError(f"module must be an ElasticViT (the model or an EMA copy's module), "
                            f"got {type(module).__name__}")
        module.set_subnet(self.resolve_eval_config(module.space))

    def resolve_eval_config(self, space: SubnetSpace) -> SubnetConfig:
        """``eval_config`` as a config of ``space``."""
        if self.eval_config == "largest":
            return space.largest()
        if self.eval_config == "smallest":
            return smallest_config(space)
        return space.validate(self.eval_config)

    # ------------------------------------------------------------------ reporting

    def _reset_accounting(self) -> None:
        self._steps, self._flops_sum, self._depth_sum = 0, 0, 0
        self._depths: Counter = Counter()
        self._patches: Counter = Counter()

    @staticmethod
    def _hist(counter: Counter) -> dict[str, int]:
        return {str(k): counter[k] for k in sorted(counter)}

    def _means(self) -> dict[str, Optional[float]]:
        n = self._steps
        return {"vitas_mean_flops": self._flops_sum / n if n else None,
                "vitas_mean_depth": self._depth_sum / n if n else None}

    def describe(self) -> dict[str, Any]:
        """The depth distribution, sharing rule, evaluation config and this epoch's accounting so far
        (the trainer prints every key in each epoch record's "stage")."""
        eval_cfg = self.eval_config if isinstance(self.eval_config, str) else config_to_dict(self.eval_config)
        return {"strategy": self.name, "p_identity": self.p_identity,
                "depth_sampling": "uniform" if self.p_identity is None else "binomial",
                "sharing": self._sharing, "eval_config": eval_cfg, "epoch_steps": self._steps, **self._means(),
                "depth_hist": self._hist(self._depths), "patch_hist": self._hist(self._patches)}

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"p_identity": self.p_identity,
                "flops_range": None if self.flops_range is None else list(self.flops_range)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        if set(state) != {"p_identity", "flops_range"}:
            raise ValueError(f"strategy {self.name!r} state must have keys ['flops_range', 'p_identity'], "
                             f"got {sorted(state)}")
        p, r = state["p_identity"], state["flops_range"]
        if p is not None and not _is_number(p):
            raise ValueError(f"state['p_identity'] must be None or a number, got {p!r}")
        self._loaded = {"p_identity": None if p is None else float(p),
                        "flops_range": None if r is None else list(_check_flops_range(tuple(r)))}
