"""The pipeline's time estimate as the run goes, kept in ``pipeline.json`` as ``estimate``.

Each stage is estimated from its own measured step times once it has run its first steps:

* search: after the first ``first_search_steps`` steps (and every step after), the stage's time
  so far + the steps left at this call's mean seconds per step (a topology drawn again reuses its
  measurement, so late steps can be faster: an upper bound);
* scaling: after each growth step, the time so far + the growth steps left at this call's mean
  seconds per step. How many are left is simulated on parameter counts (``plan.simulate_growth``
  from the searched topology; the real growth picks by kappa and L^E, so the count can differ) and
  later steps measure larger candidates: a lower bound;
* training: after every epoch (``train_estimate``).

Stages that have not run yet are estimated the way ``asvit pipeline --dry-run`` does
(``plan.py``): scaling from the simulated growth's candidate count x the measured seconds per
search step, training from a few timed optimizer steps and evaluation batches of the simulated
member (timed once per call, on the run's device; those seconds count in the stage that was
running). ``estimated`` lists the stages whose seconds are estimates; the others are measured.
These before-the-stage guesses are rough: they leave out data loading, checkpoints and the
simulated member is not the trained one (a cut-down run on the loaded 2-core CPU guessed 53 s in
its search and took 85 s; README, "The asvit command").
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Mapping, Optional

from asvit_kernels.models.genotype import Genotype
from asvit_kernels.progress import format_duration as _d
from asvit_kernels.search import distributed

__all__ = ["STAGES", "train_estimate", "stage_estimate", "first_search_steps", "estimate_text", "LiveEstimate"]

log = logging.getLogger("asvit_kernels.pipeline.run")  # the pipeline's INFO lines, under one name
STAGES = ("search", "scale", "train")


def first_search_steps(total: int) -> int:
    """Search steps measured before the first estimate: 10% of the stage, between 1 and 5."""
    return max(1, min(5, total // 10))


def stage_estimate(stage: str, elapsed: float, remaining: float, finished: Mapping[str, float],
                   later: Mapping[str, float]) -> dict[str, Any]:
    """The pipeline's estimate while ``stage`` runs: ``elapsed`` seconds spent on it (every call)
    and ``remaining`` left, the ``finished`` stages' measured seconds, and ``later`` stages'
    estimates before they ran."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    remaining = max(0.0, float(remaining))
    later = {k: max(0.0, float(v)) for k, v in later.items() if k not in finished and k != stage}
    stages = {k: float(finished[k]) for k in STAGES if k in finished and k != stage}
    stages[stage] = float(elapsed) + remaining
    stages.update(later)
    ordered = {k: stages[k] for k in STAGES if k in stages}
    return {"total_seconds": sum(ordered.values()), "remaining_seconds": remaining + sum(later.values()),
            "stages": ordered, "measuring": stage, "stage_remaining_seconds": remaining,
            "estimated": [stage, *later], "at": time.time()}


def train_estimate(seconds_this_call: float, epochs_this_call: int, epochs_done: int, epochs: int,
                   finished: Mapping[str, float], earlier_calls: float = 0.0) -> dict:
    """The pipeline's time estimate once training has run epochs: the finished stages' measured
    seconds, plus training = what earlier calls spent + this call's wall-clock so far + the epochs
    left at this call's mean seconds per epoch (training and evaluation). Written into
    ``pipeline.json`` as ``estimate`` after every epoch."""
    per_epoch = seconds_this_call / epochs_this_call if epochs_this_call else 0.0
    left = max(0, epochs - epochs_done) * per_epoch
    est = stage_estimate("train", earlier_calls + seconds_this_call, left, finished, {})
    return {**est, "epochs_measured": epochs_this_call, "seconds_per_epoch": per_epoch}


_NAMES = {"search": "search", "scale": "scaling", "train": "training"}


def estimate_text(est: Mapping[str, Any], how: str) -> str:
    """The INFO line: the stage's estimated total and time left (``how``: what it is measured from),
    then the pipeline's, naming which stages are measured and which estimated."""
    stage, stages = est["measuring"], est["stages"]
    parts = ", ".join(f"{_NAMES[k]} {_d(v)} {'estimated' if k in est['estimated'] else 'measured'}"
                      for k, v in stages.items())
    return (f"{_NAMES[stage]}: estimated {_d(stages[stage])} for the stage, {_d(est['stage_remaining_seconds'])} "
            f"left ({how}); pipeline: estimated total {_d(est['total_seconds'])} ({parts}), "
            f"{_d(est['remaining_seconds'])} left")


SAVE_EVERY = 5.0  # seconds between rewrites of pipeline.json while a stage runs


class LiveEstimate:
    """Keeps ``state["estimate"]`` current while search and scaling run (module docstring): its
    ``on_search`` / ``on_scale`` are ``progress.watch`` callbacks of those stages' loops. Rank 0
    only; ``save()`` writes ``pipeline.json`` atomically. One INFO line per stage and call."""

    def __init__(self, state: dict, save: Callable[[], None], clock, preset, data, config, *, seed: int,
                 device=None):
        self.state, self.save, self.clock = state, save, clock
        self.preset, self.data, self.config, self.seed, self.device = preset, data, config, seed, device
        self.seed_genotype: Optional[str] = None  # the searched topology, once known
        self._train: Optional[float] = None
        self._logged: set[str] = set()
        self._growths: dict = {}       # simulated growth per starting topology: simulated once
        self._last_save = -math.inf    # pipeline.json is rewritten at most every SAVE_EVERY seconds

    def _elapsed(self, stage: str) -> float:
        """Seconds spent on ``stage`` over every call (``run._StageClock``)."""
        started = self.clock.running.get(stage)
        return self.clock.calls.get(stage, 0.0) + (time.time() - started if started is not None else 0.0)

    def _growth(self) -> tuple[Genotype, list]:
        """(the topology scaling starts from, its simulated growth): the searched one once known,
        else the dry run's first drawn topology."""
        from .plan import drawn_topologies, simulate_growth
        key = self.seed_genotype
        if key not in self._growths:
            seed = Genotype.parse(key) if key else drawn_topologies(self.seed, 1)[0]
            self._growths[key] = seed, simulate_growth(seed, self.preset, self.data.num_classes, self.data.image_size)
        return self._growths[key]

    def _train_seconds(self, seed: Genotype, growth: list) -> float:
        """Training's estimate before it ran, timed once per call (on the run's device)."""
        if self._train is None:
            from .plan import estimate_training
            member = growth[-1][0] if growth else seed
            self._train = estimate_training(member, self.data, self.config, device=self.device)["seconds"]
        return self._train

    def _write(self, est: dict, how: str) -> None:
        self.state["estimate"] = est
        first = est["measuring"] not in self._logged
        if first or time.time() - self._last_save >= SAVE_EVERY:  # an atomic rewrite per step costs
            self.save()                                           # more than a search step
            self._last_save = time.time()
        if first:
            self._logged.add(est["measuring"])
            log.info("%s", estimate_text(est, how))

    def _finished(self) -> dict[str, float]:
        return {k: float(v) for k, v in self.state["seconds"].items() if k in STAGES}

    def on_search(self, p) -> None:
        done = p.n - p.initial
        if not distributed.is_main() or p.total is None or done < first_search_steps(p.total):
            return
        per_step = p.elapsed / done
        seed, growth = self._growth()
        later = {"scale": sum(k for *_, k in growth) * per_step, "train": self._train_seconds(seed, growth)}
        est = stage_estimate("search", self._elapsed("search"), max(0, p.total - p.n) * per_step, self._finished(),
                             later)
        self._write({**est, "steps_measured": done, "seconds_per_step": per_step},
                    f"{done} of {p.total} steps at {per_step:.3g} s/step")

    def on_scale(self, p) -> None:
        done = p.n - p.initial
        if not distributed.is_main() or done < 1:
            return
        per_step = p.elapsed / done
        seed, growth = self._growth()
        left = max(0, len(growth) - p.n)
        est = stage_estimate("scale", self._elapsed("scale"), left * per_step, self._finished(),
                             {"train": self._train_seconds(seed, growth)})
        self._write({**est, "steps_measured": done, "seconds_per_step": per_step, "steps_simulated": len(growth)},
                    f"{done} growth step(s) at {per_step:.3g} s/step, ~{left} more simulated")
