"""AutoProg (ALGORITHMS.md, "AutoProg"): progressive learning of a ViT in K stages of growing input
size and depth, with MoGrow (growth from the slowest EMA copy) and, optionally, the growth-schedule
search that picks each stage's (size, depth) by ``loss * time^w``.

The model is an ``ElasticViT`` supernet whose elastic dimension is the depth
(``elastic_vit_for_autoprog``: a DeiT shape with depths 1..L). Parameter shapes never change, so a
checkpoint is always the same tensors (the ``Strategy`` contract). Which slots a depth-l
sub-network runs follows the released code (``set_sample_config``): after a growth l_old -> l_new
the supernet's depth-l sub-network (l_old <= l <= l_new) runs ``models.growth.supernet_slots(l,
l_old, l_new)``, i.e. every old layer and only as many new copies as l allows, so depth l_old is
exactly the pre-growth network. Before any growth, depth l runs slots 0..l-1.

Stages. ``stage_bounds(E, K)``: stage k covers epochs ``[round(k E / K), round((k + 1) E / K))``,
rounding halves up (computed exactly in integers). With fewer epochs than stages some stages are
empty and skipped (no epoch trains them; a warning is logged).

Manual schedule (``search=False``): ``r_k = linspace(0.5, 1, K)[k] * max_size`` rounded (halves up)
to a multiple of ``size_multiple`` (at least one multiple) and ``l_k = round(linspace(0.5, 1, K)[k] *
max_depth)`` (at least 1), or the given ``sizes`` / ``depths``. For 224 / 18 and K = 4: sizes 128,
160, 192, 224 and depths 9, 12, 15, 18.

Stage change (``on_epoch_start`` of a stage's first epoch, except for the first stage a run trains):
the optimizer is reset (``trainer.reset_optimizer()``: a fresh optimizer state per stage), and when
the depth grows, MoGrow: ``model.grow(old, new, source=trainer.emas[-1].module, old_slots=...)``
makes the WHOLE model (old layers included, every non-block parameter too) the slowest EMA copy
grown with ``models.growth.new_layer_sources``, and every EMA copy grows the same way from ITS OWN
previous copy (the released ``--load-with-clone-ema`` path; no EMA is restarted). Without EMAs
(``TrainConfig.ema_decays`` empty) the model grows from itself (logged).

Regularisation: ``drop_path_scale`` rises linearly over the stages from ``reg_scale[0]`` to
``reg_scale[1]`` (the trainer multiplies ``TrainConfig.drop_path`` by it). Only drop path is scaled:
RandAugment and random erasing, which the paper also scales, are not part of our training loop.

Growth-schedule search (``search=True``). At the start of stage k the model grows (MoGrow, as above)
to the largest candidate depth (the first stage, as released, from the first manual depth); for
the stage's first ``search_epochs`` epochs (at least one, at most the stage) every step trains a
random candidate (r, l) drawn with the trainer's per-step generator (identical on every rank), at
input size r with the grown supernet's depth-l slots (the others are identities). Each candidate's
step time is measured from ``before_step`` to ``after_step`` (``time.perf_counter``, CUDA
synchronised at both ends); its time is the median over its steps
(robust to warm-up steps), from at most the last ``_MAX_TIMES`` of them. At the end of the last
search epoch every candidate is scored on ``eval_batches`` held-out batches by the FASTEST EMA
copy (decay 0.998 in the released script; the model itself when there is none) set to its depth,
images resized to r: mean cross-entropy ``loss``. ``fit_power_law`` fits ``loss ~ c * time^a`` in
linear space (``scipy.optimize.curve_fit``, as released; a log-log line only when that fails,
logged), ``w = max(-a, 0)`` and ``score = loss * time^w``; the lowest score wins
(``select_candidate``). Rank 0's decision is broadcast (``search.distributed.broadcast_object``)
since step times differ per rank. The winner is selected in the supernet (parameters recycled:
nothing is copied, training continues on its slots) for the rest of the stage. Candidates: first
stage r in {1/2, 5/6, 1} x max_size (rounded like the manual sizes) x l in {round(L/2), round(5L/6),
L} (128/192/224 x 9/15/18 for 224 / 18); later stages r in {current, the next manual size above it}
x l in the next (at most 3) manual depths strictly above the current one ({current} when none is
above: from (128, 9) with manual depths 9, 12, 15, 18 that is {12, 15, 18}). Candidates never
sampled (too few steps) get no time and cannot win. The records (times, losses, scores, a, w, the winner) are logged with
``trainer.log`` and kept in ``state_dict()["searches"]`` for reports.

Evaluation: ``prepare_eval`` selects the current stage's depth (while searching: the largest
candidate) in the evaluated module; evaluation runs at the data's native size (the trainer's
choice), so the numbers of different stages are comparable.

Resume: ``state_dict()`` is JSON (stage, depth, size, the supernet's growth layout, search progress
and records, chosen configs).
``on_train_start(resumed=True)`` re-selects the stored configuration without growing or touching a
weight; ``on_epoch_start`` of an epoch whose stage is already set does nothing (idempotent).
"""
from __future__ import annotations

import logging
import math
import statistics
import time
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F

from asvit_kernels.models.elastic_vit import ElasticViT
from asvit_kernels.models.growth import supernet_slots
from asvit_kernels.models.subnet import SubnetConfig, SubnetSpace
from asvit_kernels.search.distributed import broadcast_object

from .strategy import Strategy

if TYPE_CHECKING:
    from .trainer import Trainer

__all__ = ["AutoProg", "elastic_vit_for_autoprog", "config_for_depth", "stage_bounds", "manual_sizes",
           "manual_depths", "search_candidates", "fit_power_law", "select_candidate"]

logger = logging.getLogger(__name__)

#: Step times kept per candidate (the most recent ones): bounds the JSON state of a long search.
_MAX_TIMES = 256
_STATE_VERSION = 2  # 2: the growth layout
_clock = time.perf_counter  # the step-time clock (tests substitute a fake one)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pos_int(v, name: str) -> int:
    if not _is_int(v) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")
    return v


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


# ---------------------------------------------------------------------------------------- model


def elastic_vit_for_autoprog(*, img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int,
                             mlp_ratio: float = 4.0, num_classes: int, in_chans: int = 3, **kw) -> ElasticViT:
    """A DeiT-shaped ViT (``embed_dim``, ``num_heads`` heads of ``embed_dim // num_heads``, MLP
    ``round(embed_dim * mlp_ratio)``, class token) as an ``ElasticViT`` whose only elastic dimension
    is the depth (1..``depth``). ``kw`` goes to ``ElasticViT`` (``qkv_bias``, ``drop_path_rate``,
    ``norm_eps``, ``backend``...)."""
    for name, v in (("patch_size", patch_size), ("embed_dim", embed_dim), ("depth", depth),
                    ("num_heads", num_heads)):
        _pos_int(v, name)
    if embed_dim % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide embed_dim={embed_dim}")
    if isinstance(mlp_ratio, bool) or not isinstance(mlp_ratio, (int, float)) or not mlp_ratio > 0:
        raise ValueError(f"mlp_ratio must be a positive number, got {mlp_ratio!r}")
    mlp = max(1, round(embed_dim * mlp_ratio))
    space = SubnetSpace(patch_sizes=(patch_size,), embed_dims=(embed_dim,), depths=tuple(range(1, depth + 1)),
                        heads=(num_heads,), qkv_dims=(embed_dim,), mlp_dims=(mlp,))
    return ElasticViT(space, img_size=img_size, in_chans=in_chans, num_classes=num_classes, **kw)


def config_for_depth(model: ElasticViT, depth: int) -> SubnetConfig:
    """The first ``depth`` layers of ``model.space.largest()`` (every width at its widest)."""
    if not isinstance(model, ElasticViT):
        raise TypeError(f"model must be an ElasticViT, got {type(model).__name__}")
    if not _is_int(depth) or depth not in model.space.depths:
        raise ValueError(f"depth must be one of the space's depths {model.space.depths}, got {depth!r}")
    big = model.space.largest()
    return SubnetConfig(big.patch_size, big.embed_dim, big.heads[:depth], big.qkv_dim[:depth], big.mlp_dim[:depth])


# ---------------------------------------------------------------------------------------- schedule


def stage_bounds(epochs: int, stages: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]``: stage k covers epochs ``[round(k E / K), round((k + 1) E / K))``,
    halves rounded up. With ``epochs < stages`` some stages are empty (``start == end``)."""
    E, K = _pos_int(epochs, "epochs"), _pos_int(stages, "stages")
    b = [(2 * k * E + K) // (2 * K) for k in range(K + 1)]  # round half up, exactly
    return [(b[k], b[k + 1]) for k in range(K)]


def _fractions(stages: int) -> list[float]:
    return [0.5 + 0.5 * k / (stages - 1) if stages > 1 else 1.0 for k in range(stages)]


def _size_at(fraction: float, max_size: int, multiple: int) -> int:
    return max(1, _round_half_up(fraction * max_size / multiple)) * multiple


def manual_sizes(max_size: int, stages: int, size_multiple: int = 32) -> list[int]:
    """``linspace(0.5, 1, stages) * max_size`` rounded (halves up) to multiples of ``size_multiple``
    (at least one): 224, 4 stages -> [128, 160, 192, 224]. ``max_size`` must be a multiple of
    ``size_multiple`` (so the last stage trains at ``max_size``)."""
    _pos_int(max_size, "max_size"), _pos_int(stages, "stages"), _pos_int(size_multiple, "size_multiple")
    if max_size % size_multiple:
        raise ValueError(f"max_size={max_size} must be a multiple of size_multiple={size_multiple}")
    return [_size_at(f, max_size, size_multiple) for f in _fractions(stages)]


def manual_depths(max_depth: int, stages: int) -> list[int]:
    """``round(linspace(0.5, 1, stages) * max_depth)`` (halves up, at least 1): 12 -> [6, 8, 10, 12],
    18 -> [9, 12, 15, 18]."""
    _pos_int(max_depth, "max_depth"), _pos_int(stages, "stages")
    return [max(1, _round_half_up(f * max_depth)) for f in _fractions(stages)]


def search_candidates(*, max_size: int, max_depth: int, size_multiple: int, sizes: Sequence[int],
                      depths: Sequence[int], current: Optional[tuple[int, int]] = None) -> list[tuple[int, int]]:
    """The (size, depth) candidates of a stage's search, sizes outer, each ascending and distinct
    (the released ``main_prog.py`` lists).

    ``current`` None (the first stage a run trains): sizes ``{1/2, 5/6, 1} * max_size`` rounded like
    ``manual_sizes`` x depths ``{round(L/2), round(5L/6), L}``. Otherwise ``current = (r, l)``: sizes
    ``{r, the smallest manual size above r}`` x the next (at most 3) manual ``depths`` strictly above
    l (``{l}`` when none is above)."""
    if current is None:
        rs = [_size_at(f, max_size, size_multiple) for f in (0.5, 5 / 6, 1.0)]
        ls = [max(1, _round_half_up(f * max_depth)) for f in (0.5, 5 / 6, 1.0)]
    else:
        r, l = current
        above = [s for s in sizes if s > r]
        rs = [r] + ([min(above)] if above else [])
        ls = sorted(d for d in set(depths) if d > l)[:3] or [l]
    return [(r, l) for r in sorted(set(rs)) for l in sorted(set(ls))]


def fit_power_law(times: Sequence[float], losses: Sequence[float]) -> tuple[float, float]:
    """``(c, a)`` of ``loss ~ c * time^a`` by least squares in linear space
    (``scipy.optimize.curve_fit``, as the released code fits it), started from the log-log line
    (``numpy.polyfit``). When ``curve_fit`` fails (no convergence, a non-finite result) the log-log
    line is the answer, with a warning. Fewer than two distinct times, or a non-positive /
    non-finite value, leave nothing to fit: ``a = 0`` and ``c`` the geometric mean of the usable
    losses (1 if none)."""
    t = np.asarray(times, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if t.shape != y.shape or t.ndim != 1:
        raise ValueError(f"times and losses must be 1-D of the same length, got {t.shape} and {y.shape}")
    ok = np.isfinite(t) & np.isfinite(y) & (t > 0) & (y > 0)
    t, y = t[ok], y[ok]
    if len(np.unique(t)) < 2:
        return (float(np.exp(np.log(y).mean())) if len(y) else 1.0), 0.0
    a, log_c = np.polyfit(np.log(t), np.log(y), 1)
    try:
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", scipy.optimize.OptimizeWarning)  # no covariance: not needed
            (c_fit, a_fit), _ = scipy.optimize.curve_fit(lambda x, c, e: c * x ** e, t, y,
                                                         p0=(np.exp(log_c), a), maxfev=10000)
        if np.isfinite(c_fit) and np.isfinite(a_fit):
            return float(c_fit), float(a_fit)
        reason = f"non-finite result c={c_fit}, a={a_fit}"
    except (RuntimeError, ValueError) as err:
        reason = str(err)
    logger.warning("autoprog: curve_fit of loss ~ c * time^a failed (%s); using the log-log line", reason)
    return float(np.exp(log_c)), float(a)


def select_candidate(times: Sequence[Optional[float]],
                     losses: Sequence[float]) -> tuple[int, float, float, list[float]]:
    """``(index of the winner, a, w, scores)``: fit ``loss ~ c * time^a`` over the candidates with a
    time, ``w = max(-a, 0)``, ``score = loss * time^w`` (inf without a time or with a non-finite
    loss); the lowest score wins (the first on ties; candidate 0 when none has a finite score)."""
    if len(times) != len(losses) or not len(times):
        raise ValueError(f"times and losses must be non-empty and of the same length, got {len(times)} and "
                         f"{len(losses)}")
    have = [i for i, t in enumerate(times) if t is not None and math.isfinite(t) and t > 0]
    _, a = fit_power_law([times[i] for i in have], [losses[i] for i in have])
    w = max(-a, 0.0)
    scores = [float(losses[i]) * float(times[i]) ** w
              if i in have and math.isfinite(losses[i]) else math.inf for i in range(len(times))]
    best = min(range(len(scores)), key=lambda i: (scores[i], i))
    return best, a, w, scores


# ---------------------------------------------------------------------------------------- strategy


def _sequence(v, name: str, stages: int) -> Optional[list[int]]:
    if v is None:
        return None
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        raise TypeError(f"{name} must be a sequence of {stages} positive ints, got {type(v).__name__}")
    out = list(v)
    if len(out) != stages or not all(_is_int(x) and x > 0 for x in out):
        raise ValueError(f"{name} must hold {stages} positive ints (one per stage), got {v!r}")
    return out


class AutoProg(Strategy):
    """AutoProg progressive learning (module docstring): K stages of (input size, depth), MoGrow at
    each growth, manual (``search=False``) or searched (``search=True``) schedule.

    Args:
        max_size: the last stage's input size (the data's size, usually).
        max_depth: the last stage's depth (<= the model's slots, one of its depths).
        stages: K.
        search: growth-schedule search instead of the manual schedule.
        sizes / depths: an explicit manual schedule, one per stage (``depths`` non-decreasing, at
            most ``max_depth``; only the manual schedule uses it). ``sizes`` is also the ladder of
            "next sizes" the search offers.
        size_multiple: the sizes' granularity, a multiple of the model's patch size; None: 32 when
            32 is a multiple of the patch and divides ``max_size``, else the patch size.
        search_epochs: epochs of each search (within the stage).
        eval_batches: held-out batches scoring each candidate.
        reg_scale: (first stage, last stage) multipliers of the drop path rate.
    """

    name = "autoprog"
    find_unused_parameters = True

    def __init__(self, *, max_size: int, max_depth: int, stages: int = 4, search: bool = True,
                 sizes: Optional[Sequence[int]] = None, depths: Optional[Sequence[int]] = None,
                 size_multiple: Optional[int] = None, search_epochs: int = 2, eval_batches: int = 4,
                 reg_scale: tuple[float, float] = (0.5, 1.0)):
        self.max_size = _pos_int(max_size, "max_size")
        self.max_depth = _pos_int(max_depth, "max_depth")
        self.stages = _pos_int(stages, "stages")
        if not isinstance(search, bool):
            raise TypeError(f"search must be a bool, got {type(search).__name__}")
        self.search = search
        if size_multiple is not None:
            _pos_int(size_multiple, "size_multiple")
            if max_size % size_multiple:
                raise ValueError(f"max_size={max_size} must be a multiple of size_multiple={size_multiple}")
        self._size_multiple_arg = size_multiple
        self._sizes_arg = _sequence(sizes, "sizes", stages)
        self._depths_arg = _sequence(depths, "depths", stages)
        if self._depths_arg is not None:
            if search:
                raise ValueError("depths is the manual schedule: it needs search=False (the search picks depths)")
            d = self._depths_arg
            if any(b < a for a, b in zip(d, d[1:])):
                raise ValueError(f"depths must be non-decreasing (growth never removes layers), got {d}")
            if d[-1] > max_depth:
                raise ValueError(f"depths must be <= max_depth={max_depth}, got {d}")
        self.search_epochs = _pos_int(search_epochs, "search_epochs")
        self.eval_batches = _pos_int(eval_batches, "eval_batches")
        if (isinstance(reg_scale, (str, bytes)) or not isinstance(reg_scale, Sequence) or len(reg_scale) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= 0
                           for x in reg_scale)):
            raise ValueError(f"reg_scale must be two finite numbers >= 0 (first, last stage), got {reg_scale!r}")
        self.reg_scale = (float(reg_scale[0]), float(reg_scale[1]))
        # Resolved by on_train_start (they need the model and the epochs).
        self.size_multiple: Optional[int] = size_multiple
        self.sizes: Optional[list[int]] = None
        self.depths: Optional[list[int]] = None
        self.bounds: Optional[list[tuple[int, int]]] = None
        self._reset_state()

    # ------------------------------------------------------------------ state

    def _reset_state(self) -> None:
        self._stage = -1           # the stage the model is configured for (-1: none yet)
        self._size: Optional[int] = None
        self._depth: Optional[int] = None  # active depth (while searching: the grown, largest candidate)
        self._layout: Optional[tuple[int, int]] = None  # the supernet's last growth (old, new) depth; None: none
        self._searching = False
        self._search_end: Optional[int] = None  # last epoch of the current search
        self._candidates: list[tuple[int, int]] = []
        self._times: list[list[float]] = []  # per candidate: its most recent step times
        self._counts: list[int] = []  # per candidate: the steps that trained it
        self._searches: list[dict[str, Any]] = []
        self._chosen: list[dict[str, Any]] = []
        self._pending: Optional[tuple[int, float]] = None  # (candidate, start time) of the running step

    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "stage": self._stage, "size": self._size, "depth": self._depth,
                "layout": None if self._layout is None else list(self._layout),
                "searching": self._searching, "search_end": self._search_end,
                "candidates": [list(c) for c in self._candidates], "times": [list(t) for t in self._times],
                "counts": list(self._counts), "searches": [dict(s) for s in self._searches],
                "chosen": [dict(c) for c in self._chosen]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            return
        keys = {"version", "stage", "size", "depth", "layout", "searching", "search_end", "candidates", "times",
                "counts", "searches", "chosen"}
        if set(state) != keys:
            raise ValueError(f"autoprog state must have the keys {sorted(keys)}, got {sorted(state)}")
        if state["version"] != _STATE_VERSION:
            raise ValueError(f"autoprog state version {state['version']!r} is not {_STATE_VERSION}")
        if not len(state["candidates"]) == len(state["times"]) == len(state["counts"]):
            raise ValueError("autoprog state: one list of times and one count per candidate expected")
        self._reset_state()
        self._stage = int(state["stage"])
        self._size = None if state["size"] is None else int(state["size"])
        self._depth = None if state["depth"] is None else int(state["depth"])
        self._layout = None if state["layout"] is None else (int(state["layout"][0]), int(state["layout"][1]))
        self._searching = bool(state["searching"])
        self._search_end = None if state["search_end"] is None else int(state["search_end"])
        self._candidates = [(int(r), int(l)) for r, l in state["candidates"]]
        self._times = [[float(t) for t in ts] for ts in state["times"]]
        self._counts = [int(c) for c in state["counts"]]
        self._searches = [dict(s) for s in state["searches"]]
        self._chosen = [dict(c) for c in state["chosen"]]

    def describe(self) -> dict[str, Any]:
        return {"strategy": self.name, "stage": self._stage, "size": self._size, "depth": self._depth,
                "searching": self._searching}

    @property
    def searches(self) -> list[dict[str, Any]]:
        """One record per finished search: candidates with time, loss and score, a, w, winner."""
        return [dict(s) for s in self._searches]

    # ------------------------------------------------------------------ set-up

    def _resolve(self, model: ElasticViT, epochs: int) -> None:
        if not isinstance(model, ElasticViT):
            raise TypeError(f"AutoProg trains an ElasticViT (see elastic_vit_for_autoprog), got "
                            f"{type(model).__name__}")
        space = model.space
        patch = space.largest().patch_size
        if self.max_depth > space.num_slots:
            raise ValueError(f"max_depth={self.max_depth} exceeds the model's {space.num_slots} layer slots")
        m = self._size_multiple_arg
        if m is None:
            m = 32 if 32 % patch == 0 and self.max_size % 32 == 0 else patch
        if m % patch:
            raise ValueError(f"size_multiple={m} must be a multiple of the model's patch size {patch}")
        if self.max_size % patch:
            raise ValueError(f"max_size={self.max_size} must be a multiple of the model's patch size {patch}")
        self.size_multiple = m
        self.sizes = list(self._sizes_arg) if self._sizes_arg is not None else manual_sizes(self.max_size,
                                                                                              self.stages, m)
        for s in self.sizes:
            if s % patch:
                raise ValueError(f"sizes must be multiples of the model's patch size {patch}, got {self.sizes}")
        self.depths = list(self._depths_arg) if self._depths_arg is not None else manual_depths(self.max_depth,
                                                                                                  self.stages)
        needed = set(range(1, self.max_depth + 1)) if self.search else set(self.depths)
        missing = sorted(d for d in needed if d not in space.depths)
        if missing:
            raise ValueError(f"the model's space has no depth {missing} (its depths: {space.depths})")
        self.bounds = stage_bounds(epochs, self.stages)
        empty = [k for k, (a, b) in enumerate(self.bounds) if a == b]
        if empty:
            logger.warning("autoprog: %d epochs for %d stages leave stages %s empty (skipped)", epochs,
                           self.stages, empty)

    def on_train_start(self, trainer: "Trainer", *, resumed: bool) -> None:
        self._resolve(trainer.model, int(trainer.config.epochs))
        self._pending = None
        if not resumed or self._stage < 0:
            if not resumed:
                self._reset_state()
            return
        # Resumed: the weights are loaded; only the configuration is restored (no growth).
        self._select(trainer.model, self._depth)
        for ema in trainer.emas:
            if isinstance(ema.module, ElasticViT):
                self._select(ema.module, self._depth)

    # ------------------------------------------------------------------ stages

    def stage_of(self, epoch: int) -> int:
        """The stage that trains ``epoch`` (the last stage for epochs past the end)."""
        if self.bounds is None:
            raise RuntimeError("AutoProg.on_train_start has not run yet")
        return _stage_in(self.bounds, epoch)

    def slots_for(self, depth: int) -> list[int]:
        """The supernet slots a depth-``depth`` sub-network runs now: ``supernet_slots`` of the last
        growth (every old layer kept), or ``0..depth-1`` before any growth."""
        if self._layout is None:
            return list(range(depth))
        return supernet_slots(depth, *self._layout)

    def _select(self, module: ElasticViT, depth: int) -> None:
        cfg, slots = config_for_depth(module, depth), tuple(self.slots_for(depth))
        if getattr(module, "config", None) != cfg or getattr(module, "slots", None) != slots:
            module.set_subnet(cfg, slots)

    def _grow(self, trainer: "Trainer", old: int, new: int, record: dict[str, Any]) -> None:
        """MoGrow ``old -> new``: the model from the slowest EMA copy, each EMA copy from its own
        previous self (the released ``--load-with-clone-ema``); old layer i is slot
        ``slots_for(old)[i]`` in every copy."""
        model, old_slots = trainer.model, self.slots_for(old)
        if trainer.emas:
            source = trainer.emas[-1].module
            record["grown_from"] = f"ema decay {trainer.emas[-1].decay}"
        else:
            source = model
            record["grown_from"] = "model (no EMA)"
            logger.warning("autoprog: no EMA copies (ema_decays is empty): MoGrow grows the model from itself")
        model.grow(old, new, source=source, old_slots=old_slots)
        for ema in trainer.emas:
            ema.module.grow(old, new, old_slots=old_slots)
        record["grown"] = [old, new]
        self._layout = (old, new)

    def on_epoch_start(self, trainer: "Trainer", epoch: int) -> None:
        k = self.stage_of(epoch)
        if k <= self._stage:  # already configured (a resumed epoch, or the same stage)
            return
        model = trainer.model
        if self._searching:  # not reached under the trainer (the search ends inside its stage)
            self._finish_search(trainer, epoch - 1)
        first = self._stage < 0
        # The last stage trains the target model (max size and depth), searched or not: a
        # progressive schedule must end at the model it was asked to train.
        last = k == self.stage_of(trainer.config.epochs - 1)
        searching = self.search and not last
        if last:
            cands, size, depth = [], self.max_size, self.max_depth
        elif searching:
            current = None if first else (self._size, self._depth)
            cands = search_candidates(max_size=self.max_size, max_depth=self.max_depth,
                                      size_multiple=self.size_multiple, sizes=self.sizes, depths=self.depths,
                                      current=current)
            size, depth = max(r for r, _ in cands), max(l for _, l in cands)
        else:
            cands, size, depth = [], self.sizes[k], self.depths[k]
        # The first stage's search grows from the first manual depth, as released (its copies start
        # equal to their originals); later stages grow from the depth trained so far.
        old = self.depths[0] if first else self._depth
        record: dict[str, Any] = {"event": "autoprog_stage", "epoch": epoch, "stage": k, "size": size,
                                  "depth": depth, "searching": searching}
        if depth > old and (searching or not first):
            self._grow(trainer, old, depth, record)
        if not first:
            trainer.reset_optimizer()
        self._select(model, depth)
        self._stage, self._size, self._depth = k, size, depth
        if searching:
            start, end = self.bounds[k]
            self._searching = True
            self._search_end = start + min(self.search_epochs, end - start) - 1
            self._candidates = cands
            self._times = [[] for _ in cands]
            self._counts = [0] * len(cands)
            record.update(candidates=[list(c) for c in cands], search_end=self._search_end)
        else:
            self._chosen.append({"stage": k, "size": size, "depth": depth, "searched": False})
        logger.info("autoprog: epoch %d starts stage %d at size %d, depth %d%s", epoch, k, size, depth,
                    " (searching)" if searching else "")
        trainer.log(record)

    # ------------------------------------------------------------------ steps

    def before_step(self, trainer: "Trainer", epoch: int, step_in_epoch: int,
                    generator: torch.Generator) -> Optional[int]:
        model = trainer.model
        if not self._searching:
            self._select(model, self._depth)
            return self._size
        i = int(torch.randint(len(self._candidates), (1,), generator=generator))
        r, l = self._candidates[i]
        self._select(model, l)
        _sync(trainer.device)
        self._pending = (i, _clock())
        return r

    def after_step(self, trainer: "Trainer", epoch: int, step_in_epoch: int, loss: float) -> None:
        if self._pending is None:
            return
        i, t0 = self._pending
        self._pending = None
        _sync(trainer.device)
        ts = self._times[i]
        ts.append(_clock() - t0)
        del ts[:-_MAX_TIMES]
        self._counts[i] += 1

    def on_epoch_end(self, trainer: "Trainer", epoch: int) -> None:
        if self._searching and epoch >= self._search_end:
            self._finish_search(trainer, epoch)

    @torch.no_grad()
    def _candidate_losses(self, trainer: "Trainer") -> list[float]:
        module = trainer.emas[0].module if trainer.emas else trainer.model  # the fastest EMA, as released
        was_training = module.training
        module.eval()
        sums = [0.0] * len(self._candidates)
        count = 0
        try:
            for images, labels in trainer.val_batches(self.eval_batches):
                count += 1
                for i, (r, l) in enumerate(self._candidates):
                    self._select(module, l)
                    x = images if images.shape[-1] == r and images.shape[-2] == r else trainer.resize(images, r)
                    logits = module(x)
                    sums[i] += float(F.cross_entropy(logits.float(), labels))
        finally:
            module.train(was_training)
        if count == 0:
            raise RuntimeError("autoprog: trainer.val_batches gave no held-out batch to score the candidates")
        return [s / count for s in sums]

    def _finish_search(self, trainer: "Trainer", epoch: int) -> None:
        losses = self._candidate_losses(trainer)  # every rank evaluates (hooks stay in lockstep)
        times = [statistics.median(ts) if ts else None for ts in self._times]
        best, a, w, scores = select_candidate(times, losses)
        # Step times differ per rank: rank 0's decision is everyone's.
        best, a, w, times, losses, scores = broadcast_object((best, a, w, times, losses, scores))
        r, l = self._candidates[best]
        rec = {"stage": self._stage, "epoch": epoch, "a": a, "w": w, "size": r, "depth": l,
               "candidates": [{"size": c[0], "depth": c[1], "time": t, "steps": n, "loss": lo,
                               "score": (s if math.isfinite(s) else None)}
                              for c, t, n, lo, s in zip(self._candidates, times, self._counts, losses, scores)]}
        self._searches.append(rec)
        self._chosen.append({"stage": self._stage, "size": r, "depth": l, "searched": True})
        self._searching, self._search_end = False, None
        self._candidates, self._times, self._counts = [], [], []
        self._size, self._depth = r, l
        self._select(trainer.model, l)  # recycled: the supernet keeps training the winner's slots
        for ema in trainer.emas:
            if isinstance(ema.module, ElasticViT):
                self._select(ema.module, l)
        logger.info("autoprog: stage %d search chose size %d, depth %d (w=%.3g)", self._stage, r, l, w)
        trainer.log({"event": "autoprog_search", **rec})

    # ------------------------------------------------------------------ evaluation, schedule

    def prepare_eval(self, module: torch.nn.Module) -> None:
        if self._depth is not None and isinstance(module, ElasticViT):
            self._select(module, self._depth)

    def input_size(self) -> Optional[int]:
        return self._size

    def drop_path_scale(self, epoch: int, epochs: int) -> float:
        """``reg_scale[0]`` in the first stage, rising linearly to ``reg_scale[1]`` in the last."""
        k = _stage_in(stage_bounds(epochs, self.stages), epoch)
        lo, hi = self.reg_scale
        return lo + (hi - lo) * k / (self.stages - 1) if self.stages > 1 else hi


def _stage_in(bounds: list[tuple[int, int]], epoch: int) -> int:
    """The stage whose epochs hold ``epoch``; the last one past the end."""
    for k, (a, b) in enumerate(bounds):
        if a <= epoch < b:
            return k
    return len(bounds) - 1


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
