"""As-ViT scaling: greedy depth / width growth ranked by training-free indicators
(ALGORITHMS.md, "As-ViT", "Scaling"; the released ``search/grow.py``).

Start from the seed topology at depths [1, 1, 1, 1] and proxy width ``h = 8`` (full model
``E = 4h``). Each step:

1. Candidates: every "+1 layer in one stage" x every width ``round_half_up(h * (1 + r))`` for
   ``r`` in ``width_ratios`` (duplicate widths dropped; a width equal to ``h`` is a depth-only
   candidate), stage-major then width ascending, truncated to ``max_candidates`` (16).
2. Drop candidates whose full-size model (``hidden = 4 * width``, ``num_classes`` head, counted by
   ``models.count_params`` on the meta device) has more than ``param_limit[1]`` parameters.
3. Measure the survivors on the narrow proxy (``embed_dim = width``, the candidate's depths):
   ``evaluate_fn(full_genotype, images, repeats=..., embed_dim=width, seed=..., num_classes=...)``,
   spread over the ranks by ``search.distributed.map_candidates``. Every candidate of every step
   is measured with the same seeds (common random numbers).
4. Rank kappa ascending and L^E descending with dense ranks (equal values share a rank, the next
   value gets the next integer, as released; NaN kappa counts as ``inf``, NaN L^E as ``-inf``, so
   non-finite values rank last, together). Pick the smallest rank sum. Ties: the indicator with
   the larger relative spread ``(max - min) / |max|`` over the survivors' finite values (kappa on
   equal spreads) decides, by its own direction; then the other indicator; then candidate order.
5. The winner becomes the current architecture and joins the family. Stop when its full model
   has ``>= param_limit[0]`` parameters, or when no candidate survives step 2.

Heads: the genotype's ``H`` is kept; stage ``i`` has ``H / 2^(3-i)`` heads and the model only
needs ``width >= heads`` (head dim = width // heads). The narrowest model is stage 1 of the first
proxy, so ``grow`` requires ``hidden >= H / 8`` at the start (ValueError otherwise: no capping, the
proxy is always the real topology); widths never shrink, so every later proxy builds too. With the
defaults (h = 8, H <= 64) this always holds.

Output: ``ScalingResult.family``, one entry per growth step (the start itself is not an entry, as
released): step, genotype (the full model's string), hidden (full E), proxy_hidden (h), depths,
params, flops (as reported by ``evaluate_fn`` for the full model), kappa, length_distortion.
``history`` holds every step's candidates with their measurements and ranks.

Run directory: ``scaling_state.pt`` is replaced atomically after every round of candidate
measurements (one candidate per rank) and after every step, so a restarted run re-measures at
most one round; ``scaling.json`` mirrors it readably. Restarting with the same arguments resumes
and ends exactly as an uninterrupted run (deterministic on the CPU).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from asvit_kernels.atomic import PathLike
from asvit_kernels.models.asvit import AsViT
from asvit_kernels.models.counting import count_params
from asvit_kernels.models.genotype import Genotype
from asvit_kernels.progress import Progress

from . import distributed, runstate

__all__ = ["grow", "ScalingResult", "candidate_widths", "make_candidates", "full_params", "dense_ranks",
           "select", "relative_spread"]

log = logging.getLogger(__name__)

EvaluateFn = Callable[..., Mapping[str, Any]]
STATE_NAME = "scaling"
_STATE_KEYS = ("settings", "step", "depths", "hidden", "family", "history", "pending", "stop_reason")  # state_dict's


# ----------------------------------------------------------------------------- candidates

def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def candidate_widths(hidden: int, width_ratios: Sequence[float]) -> list[int]:
    """``round_half_up(hidden * (1 + r))`` for each ratio, duplicates dropped, ascending."""
    return sorted({_round_half_up(hidden * (1 + r)) for r in width_ratios})


def make_candidates(depths: Sequence[int], hidden: int, width_ratios: Sequence[float],
                    max_candidates: int = 16) -> list[tuple[tuple[int, int, int, int], int]]:
    """Every "+1 layer in one stage" x every candidate width, as (depths, proxy width), stage-major
    then width ascending, at most ``max_candidates``."""
    out = []
    for stage in range(len(depths)):
        grown = tuple(d + (i == stage) for i, d in enumerate(depths))
        out.extend((grown, w) for w in candidate_widths(hidden, width_ratios))
    return out[:max_candidates]


def full_genotype(seed: Genotype, depths: Sequence[int], proxy_width: int, width_multiplier: int) -> Genotype:
    """The full-size model of a candidate: the seed topology at ``depths``, hidden = multiplier * width."""
    return seed.with_(depths=tuple(depths), hidden=width_multiplier * proxy_width)


def full_params(genotype: Genotype, *, num_classes: int = 1000, img_size=224) -> int:
    """Parameters of the full model (built on the meta device: no memory, milliseconds)."""
    model = AsViT.from_genotype(genotype, num_classes=num_classes, img_size=img_size, device="meta")
    return count_params(model)


# ----------------------------------------------------------------------------- selection

def _kappa_key(v: float) -> float:
    return math.inf if math.isnan(v) else v


def _length_key(v: float) -> float:
    return -math.inf if math.isnan(v) else v


def dense_ranks(values: Sequence[float], *, descending: bool = False) -> list[int]:
    """Dense ranks from 0: equal values share a rank, the next distinct value gets the next one."""
    distinct = sorted(set(values), reverse=descending)
    index = {v: i for i, v in enumerate(distinct)}
    return [index[v] for v in values]


def relative_spread(values: Sequence[float]) -> float:
    """``(max - min) / |max|`` over the finite values (0 with fewer than two or max = 0)."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2 or max(finite) == 0:
        return 0.0
    return (max(finite) - min(finite)) / abs(max(finite))


def select(kappas: Sequence[float], lengths: Sequence[float]) -> tuple[int, dict[str, Any]]:
    """Index of the winner by rank sum (see the module docstring) and the ranking details."""
    if not kappas or len(kappas) != len(lengths):
        raise ValueError(f"need as many kappas as lengths, at least one; got {len(kappas)} and {len(lengths)}")
    k = [_kappa_key(float(v)) for v in kappas]
    le = [_length_key(float(v)) for v in lengths]
    rk, rl = dense_ranks(k), dense_ranks(le, descending=True)
    sums = [a + b for a, b in zip(rk, rl)]
    tied = [i for i, s in enumerate(sums) if s == min(sums)]
    spreads = {"kappa": relative_spread(k), "length_distortion": relative_spread(le)}
    order = ["kappa", "length_distortion"]
    if spreads["length_distortion"] > spreads["kappa"]:
        order.reverse()
    keys = {"kappa": lambda i: k[i], "length_distortion": lambda i: -le[i]}
    for name in order:
        if len(tied) == 1:
            break
        best = min(keys[name](i) for i in tied)
        tied = [i for i in tied if keys[name](i) == best]
    return tied[0], {"kappa_ranks": rk, "length_ranks": rl, "rank_sums": sums, "spreads": spreads,
                     "tie_order": order}


# ----------------------------------------------------------------------------- search

@dataclass
class ScalingResult:
    """What ``grow`` returns: ``family`` (one architecture per step, small to large), ``history``
    (every step's candidates, measurements and ranks), ``finished`` and ``stop_reason``
    ("param_limit" reached, "no_candidates" under the upper limit, or "" while unfinished)."""

    family: list[dict[str, Any]] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    stop_reason: str = ""

    @property
    def genotypes(self) -> list[str]:
        """The family's full-model genotype strings."""
        return [a["genotype"] for a in self.family]


def _default_evaluate() -> EvaluateFn:
    from . import indicators
    return indicators.evaluate


def _settings(seed_genotype: Genotype, width_ratios, param_limit, max_candidates, hidden, width_multiplier,
              start_depths, repeats, seed, num_classes, img_size, images, eval_kwargs) -> dict[str, Any]:
    lo, hi = (float(v) for v in param_limit)
    if not 0 < lo <= hi:
        raise ValueError(f"param_limit must be (stop, drop) with 0 < stop <= drop, got {param_limit!r}")
    if not width_ratios or any(r < 0 for r in width_ratios):
        raise ValueError(f"width_ratios must be non-empty and >= 0, got {width_ratios!r}")
    for name, v in (("max_candidates", max_candidates), ("hidden", hidden), ("width_multiplier", width_multiplier),
                    ("repeats", repeats)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if hidden * 8 < seed_genotype.heads:
        raise ValueError(f"hidden={hidden} is too narrow for H={seed_genotype.heads}: the stage-1 proxy needs "
                         f"hidden >= H / 8 = {seed_genotype.heads / 8:g} (heads are not capped)")
    return {"seed_genotype": str(seed_genotype), "width_ratios": [float(r) for r in width_ratios],
            "param_limit": [lo, hi], "max_candidates": max_candidates, "hidden": hidden,
            "width_multiplier": width_multiplier, "start_depths": list(start_depths), "repeats": repeats,
            "seed": int(seed), "num_classes": num_classes, "img_size": runstate.json_safe(img_size),
            "images": runstate.tensor_digest(images), "eval_kwargs": runstate.json_safe(dict(eval_kwargs))}


class _Scaling:
    """The mutable state of one scaling run."""

    def __init__(self, settings: dict[str, Any]):
        self.settings = settings
        self.depths = tuple(settings["start_depths"])
        self.hidden = settings["hidden"]
        self.family: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = []
        self.pending: dict[int, dict[str, Any]] = {}  # measurements of the current step so far
        self.stop_reason = ""

    @property
    def step(self) -> int:
        return len(self.history)

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "step": self.step, "depths": list(self.depths), "hidden": self.hidden,
                "family": self.family, "history": self.history, "pending": self.pending,
                "stop_reason": self.stop_reason}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.depths, self.hidden = tuple(state["depths"]), int(state["hidden"])
        self.family, self.history = list(state["family"]), list(state["history"])
        self.pending = {int(k): v for k, v in state["pending"].items()}
        self.stop_reason = state["stop_reason"]

    def summary(self) -> dict[str, Any]:
        return {"settings": self.settings, "step": self.step, "family": self.family, "history": self.history,
                "pending": self.pending, "stop_reason": self.stop_reason}


def _candidates(run: _Scaling, seed_genotype: Genotype) -> list[dict[str, Any]]:
    """This step's candidates with their full model's genotype and parameter count."""
    s = run.settings
    out = []
    for depths, width in make_candidates(run.depths, run.hidden, s["width_ratios"], s["max_candidates"]):
        g = full_genotype(seed_genotype, depths, width, s["width_multiplier"])
        params = full_params(g, num_classes=s["num_classes"], img_size=s["img_size"])
        out.append({"genotype": str(g), "depths": list(depths), "proxy_hidden": width, "hidden": g.hidden,
                    "params": params, "survives": params <= s["param_limit"][1]})
    return out


def _measure_one(evaluate_fn: EvaluateFn, images: torch.Tensor, settings: Mapping[str, Any],
                 eval_kwargs: Mapping[str, Any], cand: Mapping[str, Any]) -> dict[str, Any]:
    r = evaluate_fn(Genotype.parse(cand["genotype"]), images, repeats=settings["repeats"],
                    embed_dim=cand["proxy_hidden"], seed=settings["seed"], num_classes=settings["num_classes"],
                    **eval_kwargs)
    return {"kappa": float(r["kappa"]), "length_distortion": float(r["length_distortion"]),
            "flops": int(r["flops"]), "seconds": float(r.get("seconds", 0.0))}


def _grow_step(run: _Scaling, seed_genotype: Genotype, measure: Callable[[Mapping[str, Any]], dict],
               run_dir: Optional[PathLike], progress: Optional[bool]) -> None:
    """One growth step: candidates, filter, measure (checkpointing each round), select, record."""
    s = run.settings
    cands = _candidates(run, seed_genotype)
    alive = [i for i, c in enumerate(cands) if c["survives"]]
    if not alive:
        run.history.append({"step": run.step, "candidates": cands, "survivors": [], "chosen": None})
        run.stop_reason = "no_candidates"
        return
    todo = [i for i in alive if i not in run.pending]

    def checkpoint(done: dict[int, dict]) -> None:
        run.pending.update({todo[j]: m for j, m in done.items()})
        runstate.save(run_dir, STATE_NAME, run.state_dict(), run.summary())

    measured = distributed.map_candidates(lambda i: measure(cands[i]), todo, progress=progress,
                                          desc=f"step {run.step} candidates", on_round=checkpoint)
    run.pending.update(dict(zip(todo, measured)))
    for i in alive:
        cands[i].update(run.pending[i])
    win, ranking = select([cands[i]["kappa"] for i in alive], [cands[i]["length_distortion"] for i in alive])
    chosen = alive[win]
    c = cands[chosen]
    arch = {"step": run.step, "genotype": c["genotype"], "hidden": c["hidden"], "proxy_hidden": c["proxy_hidden"],
            "depths": c["depths"], "params": c["params"], "flops": c["flops"], "kappa": c["kappa"],
            "length_distortion": c["length_distortion"]}
    run.history.append({"step": run.step, "candidates": cands, "survivors": alive, "chosen": chosen, **ranking})
    run.family.append(arch)
    run.depths, run.hidden, run.pending = tuple(c["depths"]), c["proxy_hidden"], {}
    if c["params"] >= s["param_limit"][0]:
        run.stop_reason = "param_limit"
    log.debug("scaling step %d: %s (%.2fM params, %.2f GMACs, kappa %.4g, L^E %.4g)", arch["step"], arch["genotype"],
             arch["params"] / 1e6, arch["flops"] / 1e9, arch["kappa"], arch["length_distortion"])


def grow(seed_genotype: Union[str, Genotype], *, width_ratios: Sequence[float] = (0.05, 0.1, 0.15, 0.2),
         param_limit: Sequence[float] = (80e6, 110e6), images: torch.Tensor,
         evaluate_fn: Optional[EvaluateFn] = None, run_dir: Optional[PathLike] = None, max_candidates: int = 16,
         hidden: int = 8, width_multiplier: int = 4, start_depths: Sequence[int] = (1, 1, 1, 1),
         repeats: int = 5, seed: int = 0, num_classes: int = 1000, img_size=224,
         progress: Optional[bool] = None, max_steps_this_call: Optional[int] = None,
         device: Union[str, torch.device, None] = None,
         eval_kwargs: Optional[Mapping[str, Any]] = None) -> ScalingResult:
    """Grow ``seed_genotype`` (its topology: K, S, E, H) into a family of models (module docstring).

    Args:
        seed_genotype: the searched topology (string or Genotype); its depths / hidden are ignored.
        width_ratios: relative width increases tried each step. param_limit: (stop, drop) in
            parameters of the full model. images: the kappa batch (moved to ``device``).
        evaluate_fn: ``evaluate_fn(full_genotype, images, *, repeats, embed_dim, seed, num_classes,
            **eval_kwargs) -> {"kappa", "length_distortion", "flops", ...}`` (default
            ``search.indicators.evaluate``).
        run_dir: checkpoint directory; an existing state there is resumed.
        max_candidates: cap per step. hidden: the starting proxy width h. width_multiplier: full
            width / proxy width (4). start_depths: starting depths.
        repeats / seed: initialisations per measurement and their seed (the same for every candidate).
        num_classes / img_size: the full model counted against ``param_limit``.
        progress: ``asvit_kernels.progress`` over steps and each step's candidates (None: bars on a
            terminal, a periodic log line otherwise; False: none; rank 0 only).
        max_steps_this_call: stop after this many growth steps (``finished=False``); resume later.
        device: where measurements run (default ``search.distributed.device()``).
        eval_kwargs: extra keyword arguments for ``evaluate_fn``.
    """
    seed_genotype = Genotype.parse(seed_genotype)
    evaluate_fn = _default_evaluate() if evaluate_fn is None else evaluate_fn
    eval_kwargs = dict(eval_kwargs or {})
    if images is None:
        raise ValueError("images (the kappa batch) is required")
    images = images.to(distributed.device() if device is None else torch.device(device))
    settings = _settings(seed_genotype, width_ratios, param_limit, max_candidates, hidden, width_multiplier,
                         tuple(start_depths), repeats, seed, num_classes, img_size, images, eval_kwargs)
    run = _Scaling(settings)
    saved = runstate.load(run_dir, STATE_NAME, keys=_STATE_KEYS)
    if saved is not None:
        runstate.check_settings(saved["settings"], settings)
        runstate.restore(run_dir, STATE_NAME, run.load_state_dict, saved)
    measure = lambda cand: _measure_one(evaluate_fn, images, settings, eval_kwargs, cand)  # noqa: E731
    if max_steps_this_call is not None and max_steps_this_call < 0:
        raise ValueError(f"max_steps_this_call must be >= 0, got {max_steps_this_call}")
    bar = Progress(desc="scaling", unit="step", initial=run.step, progress=progress)
    try:
        new_steps = 0
        while not run.stop_reason and (max_steps_this_call is None or new_steps < max_steps_this_call):
            _grow_step(run, seed_genotype, measure, run_dir, progress)
            runstate.save(run_dir, STATE_NAME, run.state_dict(), run.summary())
            new_steps += 1
            if run.family:
                bar.set_postfix(params=f"{run.family[-1]['params'] / 1e6:.1f}M")
            bar.update(1)
    finally:
        bar.close()
    return ScalingResult(list(run.family), list(run.history), bool(run.stop_reason), run.stop_reason)
