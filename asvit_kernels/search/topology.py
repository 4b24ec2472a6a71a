"""As-ViT topology search: REINFORCE over the search space with the relative-change reward
(ALGORITHMS.md, "As-ViT", "Topology search").

Policy: one independent categorical distribution per dimension of the space (``K1..K4``,
``S1..S4``, ``E1..E4``, ``H``), logits initialised ``1e-3 * randn``; Adam (lr 0.08); one
architecture per step; loss ``-log pi(a) * (r - baseline)``. The final architecture is the
per-dimension argmax.

Baseline (the released code's ``ExponentialMovingAverage``): a bias-corrected EMA of the rewards
with momentum 0.9, updated with the step's reward *before* the advantage ``r - baseline`` is taken.

Reward (``relative_change_reward``): against the previous sample, each indicator's change is
normalised by its range over the last ``buffer`` (20) samples, the current one included:
``r = -(dkappa) / (range_kappa + 1e-6) + (dL^E) / (range_LE + 1e-6)``; ``r = 0`` at step 0.

Non-finite indicators (the inf rule). kappa is ``inf`` for a network whose NTK is singular (the
worst trainability). Before each reward, every value in the window that is not finite is replaced
by a finite surrogate computed from the window's finite values ``F`` (``hi = max F``,
``lo = min F``, ``span = hi - lo``, or ``max(|hi|, 1)`` when all finite values are equal):

* on the *worst* side (kappa ``+inf`` or NaN; L^E ``-inf`` or NaN): ``hi + span`` for kappa,
  ``lo - span`` for L^E: worse than every finite sample in the window by one range;
* on the *best* side (kappa ``-inf``; L^E ``+inf``): ``lo - span`` for kappa, ``hi + span`` for L^E;
* a window without any finite value contributes no change for that indicator (term 0).

The ranges are then taken over these effective values, so a finite -> inf transition costs at
most 1 (normalised) and rewards are always finite (each term lies in [-1, 1]). The raw values
(inf included) are what the history records.

Measurements. Each sampled architecture is measured on the search proxy (``embed_dim`` 32, depths
[1, 1, 1, 1]) by ``evaluate_fn(genotype, images, repeats=repeats, seed=seed)`` (default
``search.indicators.evaluate``, whose initialisations then use ``torch.manual_seed(1000 * seed + j)``).
Every architecture is measured with the same evaluation seed (common random numbers), so a
measurement is a pure function of the genotype and a genotype sampled again reuses its first
measurement (``cache=True``), which also makes a resumed run see exactly what an uninterrupted
one does.

Distributed (``search.distributed``): every rank holds the same policy (kept on the CPU) and
generator and samples the same architecture. With ``split_repeats`` (default: when the world has
more than one rank) the ``repeats`` initialisations are separate ``evaluate_fn(..., repeats=1,
seed=seed * 1000 + j)`` calls (``j < repeats``) spread over the ranks (``map_candidates``) and
averaged (kappa: mean, ``inf`` if any initialisation gives a non-finite kappa; L^E: mean);
without it one call measures all ``repeats`` initialisations (one vmapped NTK pass in
``indicators``), on every rank alike when there are several (redundant but consistent). The two draw different initialisations (equally valid measurements), so
``split_repeats`` is part of a run's settings: pass it explicitly to resume a one-process run on
several ranks or the other way round. Results are gathered to every rank, so all ranks take the
same decisions; only rank 0 writes the run directory.

Run directory (``run_dir``): after every step ``topology_state.pt`` (settings, policy logits,
Adam state, baseline, generator state, history, step) is replaced atomically, then
``topology.json`` (settings, history, current probabilities, argmax). Calling ``reinforce`` again
with the same arguments resumes where the state stops and gives exactly the uninterrupted result
(on the CPU; the policy itself always runs on the CPU). A larger ``steps`` extends a finished run.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn
from asvit_kernels.atomic import PathLike
from asvit_kernels.progress import Progress
from asvit_kernels.models.genotype import DEFAULT_DEPTHS, DEFAULT_HIDDEN, DIMENSIONS, SPACE, Genotype

from . import distributed, runstate

__all__ = ["reinforce", "relative_change_reward", "effective_values", "CategoricalPolicy", "EmaBaseline",
           "TopologyResult", "combine_repeats", "eval_seeds"]

log = logging.getLogger(__name__)

EvaluateFn = Callable[..., Mapping[str, Any]]
STATE_NAME = "topology"
SEED_STRIDE = 1000  # split_repeats: initialisation j of search seed s is evaluate_fn(seed=s * SEED_STRIDE + j)
_NORM_EPS = 1e-6


# ----------------------------------------------------------------------------- reward

def effective_values(values: Sequence[float], *, lower_is_better: bool) -> list[float]:
    """The window ``values`` with every non-finite entry replaced by the finite surrogate of the
    module docstring (worse / better than every finite value by one range); all zeros when the
    window has no finite value."""
    vals = [float(v) for v in values]
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return [0.0] * len(vals)
    hi, lo = max(finite), min(finite)
    span = hi - lo if hi > lo else max(abs(hi), 1.0)
    above, below = hi + span, lo - span
    worst = above if lower_is_better else below
    out = []
    for v in vals:
        if math.isnan(v):
            out.append(worst)
        elif v == math.inf:
            out.append(above)
        elif v == -math.inf:
            out.append(below)
        else:
            out.append(v)
    return out


def _normalised_change(window: Sequence[float], *, lower_is_better: bool) -> float:
    eff = effective_values(window, lower_is_better=lower_is_better)
    return (eff[-1] - eff[-2]) / (max(eff) - min(eff) + _NORM_EPS)


def relative_change_reward(kappas: Sequence[float], lengths: Sequence[float], buffer: int = 20) -> float:
    """Reward of the last of the samples so far (their kappa and L^E in sampling order):
    ``-(dkappa)/(range_kappa + 1e-6) + (dL^E)/(range_LE + 1e-6)`` against the previous sample,
    ranges over the last ``buffer`` samples (current included), non-finite values by the rule of the
    module docstring. 0 for the first sample. Always finite."""
    if len(kappas) != len(lengths):
        raise ValueError(f"kappas and lengths must be as long, got {len(kappas)} and {len(lengths)}")
    if buffer < 2:
        raise ValueError(f"buffer must be >= 2 (the previous sample must be in the window), got {buffer}")
    if len(kappas) < 2:
        return 0.0
    dk = _normalised_change(kappas[-buffer:], lower_is_better=True)
    dl = _normalised_change(lengths[-buffer:], lower_is_better=False)
    return -dk + dl


class EmaBaseline:
    """Bias-corrected exponential moving average (the released code's baseline)."""

    def __init__(self, momentum: float = 0.9):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"baseline_momentum must be in [0, 1), got {momentum}")
        self.momentum = momentum
        self.numerator = 0.0
        self.denominator = 0.0

    def update(self, value: float) -> None:
        self.numerator = self.momentum * self.numerator + (1 - self.momentum) * value
        self.denominator = self.momentum * self.denominator + (1 - self.momentum)

    @property
    def value(self) -> float:
        return self.numerator / self.denominator if self.denominator else 0.0

    def state_dict(self) -> dict[str, float]:
        return {"numerator": self.numerator, "denominator": self.denominator}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self.numerator, self.denominator = float(state["numerator"]), float(state["denominator"])


# ----------------------------------------------------------------------------- policy

def _check_space(space: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """The space as {dimension: choices} in DIMENSIONS order; ValueError for a malformed one."""
    if set(space) != set(DIMENSIONS):
        raise ValueError(f"space must name exactly the dimensions {DIMENSIONS}, got {tuple(space)}")
    out = {}
    for name in DIMENSIONS:
        choices = tuple(space[name])
        if not choices or not all(isinstance(c, int) and not isinstance(c, bool) for c in choices):
            raise ValueError(f"space[{name!r}] must be a non-empty sequence of ints, got {space[name]!r}")
        out[name] = choices
    return out


class CategoricalPolicy(nn.Module):
    """Independent categorical distributions, one per dimension of ``space`` (DIMENSIONS order),
    logits ``1e-3 * randn`` drawn from ``generator``."""

    def __init__(self, space: Mapping[str, Sequence[int]], generator: torch.Generator):
        super().__init__()
        self.space = _check_space(space)
        self.logits = nn.ParameterList(
            nn.Parameter(1e-3 * torch.randn(len(c), generator=generator)) for c in self.space.values())

    def sample(self, generator: torch.Generator) -> tuple[int, ...]:
        """One index per dimension, drawn from the current probabilities."""
        with torch.no_grad():
            return tuple(int(torch.multinomial(F.softmax(l, 0), 1, generator=generator)) for l in self.logits)

    def log_prob(self, indices: Sequence[int]) -> torch.Tensor:
        """log pi(a): the sum over dimensions of each chosen index's log-probability."""
        return sum(F.log_softmax(l, 0)[i] for l, i in zip(self.logits, indices))

    def entropy(self) -> float:
        with torch.no_grad():
            return float(sum(-(F.softmax(l, 0) * F.log_softmax(l, 0)).sum() for l in self.logits))

    def argmax(self) -> tuple[int, ...]:
        """The most probable index per dimension (the first on ties)."""
        return tuple(int(torch.argmax(l.detach())) for l in self.logits)

    def probabilities(self) -> dict[str, list[float]]:
        with torch.no_grad():
            return {n: F.softmax(l, 0).tolist() for n, l in zip(self.space, self.logits)}

    def genotype(self, indices: Sequence[int], *, hidden: int = DEFAULT_HIDDEN,
                 depths: Sequence[int] = DEFAULT_DEPTHS) -> Genotype:
        """The architecture of one index per dimension."""
        values = {n: self.space[n][i] for n, i in zip(self.space, indices)}
        return Genotype.from_choices(values, depths=tuple(depths), hidden=hidden)


# ----------------------------------------------------------------------------- measurements

def eval_seeds(seed: int, repeats: int) -> list[int]:
    """``split_repeats``: the evaluation seed of each single-initialisation call of search seed ``seed``."""
    return [seed * SEED_STRIDE + j for j in range(repeats)]


def combine_repeats(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One measurement from single-initialisation measurements: kappa mean (``inf`` when any is
    not finite), L^E mean, params / FLOPs of the first, seconds summed."""
    if not results:
        raise ValueError("no measurements to combine")
    kappas = [float(r["kappa"]) for r in results]
    kappa = sum(kappas) / len(kappas) if all(math.isfinite(k) for k in kappas) else math.inf
    lengths = [float(r["length_distortion"]) for r in results]
    return {"kappa": kappa, "length_distortion": sum(lengths) / len(lengths), "params": int(results[0]["params"]),
            "flops": int(results[0]["flops"]), "seconds": float(sum(float(r.get("seconds", 0.0)) for r in results))}


def _measure(evaluate_fn: EvaluateFn, genotype: Genotype, images: torch.Tensor, *, repeats: int, seed: int,
             split: bool, eval_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Indicators of one architecture, the repeats spread over the ranks when ``split``."""
    if not split:
        r = evaluate_fn(genotype, images, repeats=repeats, seed=seed, **eval_kwargs)
        return {"kappa": float(r["kappa"]), "length_distortion": float(r["length_distortion"]),
                "params": int(r["params"]), "flops": int(r["flops"]), "seconds": float(r.get("seconds", 0.0))}
    one = lambda s: dict(evaluate_fn(genotype, images, repeats=1, seed=s, **eval_kwargs))  # noqa: E731
    return combine_repeats(distributed.map_candidates(one, eval_seeds(seed, repeats)))


# ----------------------------------------------------------------------------- search

@dataclass
class TopologyResult:
    """What ``reinforce`` returns.

    ``genotype``: the per-dimension argmax of the policy (at the proxy's hidden and depths).
    ``history``: one record per step: step, genotype (string), indices, kappa, length_distortion,
    params, flops, seconds, cached, reward, baseline, advantage, entropy (before the update).
    ``probabilities``: the policy's final probabilities per dimension. ``finished``: all ``steps``
    done (False after ``max_steps_this_call`` stopped it early).
    """

    genotype: Genotype
    history: list[dict[str, Any]] = field(default_factory=list)
    probabilities: dict[str, list[float]] = field(default_factory=dict)
    finished: bool = True


class _Reinforce:
    """The mutable state of one REINFORCE run and its step."""

    def __init__(self, space, settings: dict[str, Any]):
        self.settings = settings
        self.generator = torch.Generator().manual_seed(settings["seed"])
        self.policy = CategoricalPolicy(space, self.generator)
        self.optimizer = torch.optim.Adam(self.policy.parameters(), lr=settings["lr"])
        self.baseline = EmaBaseline(settings["baseline_momentum"])
        self.history: list[dict[str, Any]] = []
        self.cache: dict[str, dict[str, Any]] = {}

    @property
    def step(self) -> int:
        return len(self.history)

    def state_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "step": self.step, "policy": self.policy.state_dict(),
                "optimizer": self.optimizer.state_dict(), "baseline": self.baseline.state_dict(),
                "generator": self.generator.get_state(), "history": self.history}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.baseline.load_state_dict(state["baseline"])
        self.generator.set_state(state["generator"])
        self.history = list(state["history"])
        if state["step"] != len(self.history):
            raise ValueError(f"corrupt state: step {state['step']} but {len(self.history)} history records")
        for rec in self.history:
            if not rec["cached"]:
                self.cache.setdefault(rec["genotype"], {k: rec[k] for k in _MEASURED})

    def summary(self) -> dict[str, Any]:
        return {"settings": self.settings, "step": self.step, "history": self.history,
                "probabilities": self.policy.probabilities(),
                "argmax": str(self.policy.genotype(self.policy.argmax(), hidden=self.settings["embed_dim"],
                                                   depths=self.settings["depths"]))}

    def run_step(self, measure: Callable[[Genotype], dict[str, Any]]) -> dict[str, Any]:
        """Sample, measure, reward, update; returns the step's history record."""
        s = self.settings
        indices = self.policy.sample(self.generator)
        genotype = self.policy.genotype(indices, hidden=s["embed_dim"], depths=s["depths"])
        key = str(genotype)
        cached = s["cache"] and key in self.cache
        if cached:
            measured = {**self.cache[key], "seconds": 0.0}
        else:
            measured = measure(genotype)
            self.cache.setdefault(key, {k: measured[k] for k in _MEASURED})
        kappas = [r["kappa"] for r in self.history] + [measured["kappa"]]
        lengths = [r["length_distortion"] for r in self.history] + [measured["length_distortion"]]
        reward = relative_change_reward(kappas, lengths, s["buffer"])
        self.baseline.update(reward)
        advantage = reward - self.baseline.value
        entropy = self.policy.entropy()
        loss = -self.policy.log_prob(indices) * advantage
        self.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        self.optimizer.step()
        record = {"step": self.step, "genotype": key, "indices": list(indices), **measured, "cached": cached,
                  "reward": reward, "baseline": self.baseline.value, "advantage": advantage, "entropy": entropy}
        self.history.append(record)
        return record


_MEASURED = ("kappa", "length_distortion", "params", "flops", "seconds")
_STATE_KEYS = ("settings", "step", "policy", "optimizer", "baseline", "generator", "history")  # state_dict's


def _default_evaluate() -> EvaluateFn:
    from . import indicators
    return indicators.evaluate


def _default_images(seed: int) -> torch.Tensor:
    """A seeded Gaussian batch of 16 images at 224 (the paper uses 16 ImageNet images: pass them)."""
    return torch.randn(16, 3, 224, 224, generator=torch.Generator().manual_seed(seed))


def _settings(space, steps, lr, baseline_momentum, buffer, seed, repeats, embed_dim, depths, cache, split,
              images, eval_kwargs) -> dict[str, Any]:
    for name, v, low in (("steps", steps, 0), ("buffer", buffer, 2), ("repeats", repeats, 1),
                         ("embed_dim", embed_dim, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if repeats > SEED_STRIDE:
        raise ValueError(f"repeats must be <= {SEED_STRIDE}, got {repeats}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    return {"space": {k: list(v) for k, v in _check_space(space).items()}, "steps": steps, "lr": float(lr),
            "baseline_momentum": float(baseline_momentum), "buffer": buffer, "seed": int(seed),
            "repeats": repeats, "embed_dim": embed_dim, "depths": list(depths), "cache": bool(cache),
            "split_repeats": bool(split), "images": runstate.tensor_digest(images),
            "eval_kwargs": runstate.json_safe(dict(eval_kwargs))}


def reinforce(space: Mapping[str, Sequence[int]] = SPACE, steps: int = 500, lr: float = 0.08,
              baseline_momentum: float = 0.9, buffer: int = 20, seed: int = 0, *,
              images: Optional[torch.Tensor] = None, evaluate_fn: Optional[EvaluateFn] = None, repeats: int = 5,
              embed_dim: int = DEFAULT_HIDDEN, depths: Sequence[int] = DEFAULT_DEPTHS,
              run_dir: Optional[PathLike] = None, progress: Optional[bool] = None,
              max_steps_this_call: Optional[int] = None, cache: bool = True,
              split_repeats: Optional[bool] = None, device: Union[str, torch.device, None] = None,
              eval_kwargs: Optional[Mapping[str, Any]] = None) -> TopologyResult:
    """REINFORCE over the As-ViT space (see the module docstring for every rule).

    Args:
        space: {dimension: choices} for every dimension of ``models.genotype.DIMENSIONS``
            (default the As-ViT space; a restricted space is fine).
        steps: total steps (one architecture each). lr: Adam's learning rate.
        baseline_momentum: EMA momentum of the reward baseline. buffer: reward window (>= 2).
        seed: seeds the policy's initialisation and sampling generator and the evaluation seeds.
        images: the kappa batch (default: a seeded Gaussian batch of 16 at 224; the paper uses 16
            ImageNet images). Moved to ``device``.
        evaluate_fn: ``evaluate_fn(genotype, images, *, repeats, seed, **eval_kwargs) -> {"kappa",
            "length_distortion", "params", "flops", "seconds"}`` (default
            ``search.indicators.evaluate``). repeats: initialisations per architecture.
        embed_dim / depths: the proxy's stage-1 width and depths (32, [1, 1, 1, 1]).
        run_dir: checkpoint directory; an existing state there is resumed.
        progress: ``asvit_kernels.progress`` (None: a bar on a terminal, a periodic log line otherwise;
            False: none; rank 0 only).
        max_steps_this_call: stop after this many new steps (``finished=False``); resume later.
        cache: reuse the measurement of a genotype sampled before.
        split_repeats: spread the repeats over the ranks (default: when there are several).
        device: where measurements run (default ``search.distributed.device()``).
        eval_kwargs: extra keyword arguments for ``evaluate_fn`` (e.g. ``num_classes``).

    Returns a ``TopologyResult`` (argmax genotype, full history, probabilities, finished).
    """
    evaluate_fn = _default_evaluate() if evaluate_fn is None else evaluate_fn
    eval_kwargs = dict(eval_kwargs or {})
    device = distributed.device() if device is None else torch.device(device)
    images = (_default_images(seed) if images is None else images).to(device)
    split = distributed.world_size() > 1 if split_repeats is None else bool(split_repeats)
    settings = _settings(space, steps, lr, baseline_momentum, buffer, seed, repeats, embed_dim, tuple(depths),
                         cache, split, images, eval_kwargs)
    run = _Reinforce(space, settings)
    saved = runstate.load(run_dir, STATE_NAME, keys=_STATE_KEYS)
    if saved is not None:
        runstate.check_settings(saved["settings"], settings, extendable=("steps",))
        runstate.restore(run_dir, STATE_NAME, run.load_state_dict, saved)
    measure = lambda g: _measure(evaluate_fn, g, images, repeats=repeats, seed=seed, split=split,  # noqa: E731
                                 eval_kwargs=eval_kwargs)
    _loop(run, measure, steps, run_dir, progress, max_steps_this_call)
    best = run.policy.genotype(run.policy.argmax(), hidden=embed_dim, depths=depths)
    return TopologyResult(best, list(run.history), run.policy.probabilities(), finished=run.step >= steps)


def _loop(run: _Reinforce, measure, steps: int, run_dir, progress, max_steps_this_call) -> None:
    """Run steps until ``steps`` (or ``max_steps_this_call`` new ones), saving after each."""
    if max_steps_this_call is not None and max_steps_this_call < 0:
        raise ValueError(f"max_steps_this_call must be >= 0, got {max_steps_this_call}")
    end = steps if max_steps_this_call is None else min(steps, run.step + max_steps_this_call)
    bar = Progress(total=steps, initial=min(run.step, steps), desc="search", unit="step", progress=progress)
    try:
        while run.step < end:
            t0 = time.perf_counter()
            rec = run.run_step(measure)
            runstate.save(run_dir, STATE_NAME, run.state_dict(), run.summary())
            bar.set_postfix(kappa=f"{rec['kappa']:.3g}", LE=f"{rec['length_distortion']:.3g}",
                            reward=f"{rec['reward']:+.2f}", H=f"{rec['entropy']:.2f}")
            bar.update(1)
            log.debug("step %d %s kappa %.4g L^E %.4g reward %+.3f (%.2fs)", rec["step"], rec["genotype"],
                      rec["kappa"], rec["length_distortion"], rec["reward"], time.perf_counter() - t0)
    finally:
        bar.close()
    if run.step >= steps:
        log.debug("reinforce finished %d steps: argmax %s", run.step, run.summary()["argmax"])
