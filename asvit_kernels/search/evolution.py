"""ViTAS's evolutionary search over ``ElasticViT`` sub-networks inside a FLOPs window
(ALGORITHMS.md, "ViTAS": population 50, 40 generations, crossover + mutation, candidates
rejection-sampled inside the FLOPs window, fitness = supernet top-1 on a validation split),
plus the helpers around it: ``supernet_accuracy`` (the fitness) and ``calibrate_identity_prob``
(the identity probability the supernet trainer samples with).

The search loop (the SPOS / ViTAS scheme; choices the spec leaves open are ours):
  * generation 0 is ``population`` random sub-networks (``sample_subnet`` with ``p_identity``),
    each rejection-sampled until its ``subnet_flops`` lies in ``flops_range`` (inclusive);
  * every candidate is evaluated once (``evaluate_fn(config) -> fitness``, higher is better); the
    parents of a generation are the ``parents`` fittest candidates of the whole history so far
    (ties: the earlier evaluated wins; a non-finite fitness counts as -inf);
  * each later generation is ``population // 2`` mutants and the rest crossovers:
      - mutation: a parent drawn uniformly from the top-k; patch size, embed dim and depth are each
        resampled uniformly with probability ``mutate_prob``; then per kept layer the q/k/v width,
        the heads (among those dividing the width; forced when the old heads no longer divide it)
        and the MLP width are each resampled with probability ``mutate_prob``. Layers added by a
        depth increase are drawn fresh, as ``sample_subnet`` draws a layer; a decrease drops the
        last layers (identity shifting: the identities sit at the end).
      - crossover: two distinct parents from the top-k (needs k >= 2, else the crossover half is
        skipped); patch size, embed dim and depth each come from either parent (fair coin); the
        layer lists are aligned on the canonical identity-shifted encoding (layer l of the child
        comes from layer l of a parent that has one): attention (heads, q/k/v width) from one coin,
        as a pair, so the heads always divide the width, and the MLP width from another coin;
  * a child is retried up to ``max_tries`` times until it is inside the FLOPs window and is not a
    duplicate (canonical config already evaluated or already in the generation); after that it
    is skipped, so a generation may be smaller than ``population``. A generation with no child at
    all ends the search early.
  * ``generations`` counts evaluated generations, generation 0 included (at most
    ``population * generations`` evaluations).

Determinism and resumption: every random draw comes from one ``torch.Generator`` seeded with
``seed``. Whenever a generation has been drawn and again when it has been evaluated, the state
(the settings, the pending candidates, the history, the generator state and the generation index)
is written atomically to ``run_dir/evolution_state.pt`` (with a readable
``run_dir/evolution.json``); a run interrupted
anywhere (even inside ``evaluate_fn``) and restarted with the same arguments re-evaluates the
pending generation and finishes with exactly the result of an uninterrupted run. Restarting a
finished run with a larger ``generations`` extends it, again as an uninterrupted run would.

Evaluations of a generation go through ``search.distributed.map_candidates`` (candidate i on rank
i % world, identical results on every rank, a plain loop without a process group); every rank
runs the same loop in lockstep. Files go through ``search.runstate``: only rank 0 writes, and on
resume rank 0 reads the state and broadcasts it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from asvit_kernels.atomic import PathLike
from asvit_kernels.models.elastic_vit import ElasticViT
from asvit_kernels.models.subnet import SubnetConfig, SubnetSpace, sample_subnet, subnet_flops
from asvit_kernels.progress import Progress

from . import distributed, runstate

__all__ = ["search", "SearchResult", "supernet_accuracy", "calibrate_identity_prob", "mutate", "crossover",
           "config_to_dict", "config_from_dict"]

logger = logging.getLogger(__name__)

RUN_NAME = "evolution"
STATE_FILE = f"{RUN_NAME}_state.pt"  # runstate.state_path(run_dir, RUN_NAME)
JSON_FILE = f"{RUN_NAME}.json"
_STATE_KEYS = ("settings", "generation", "pending", "history", "summaries", "exhausted", "generator")  # state()'s

Fitness = Callable[[SubnetConfig], float]
Batches = Union[tuple[torch.Tensor, torch.Tensor], Iterable[tuple[torch.Tensor, torch.Tensor]]]


# ----------------------------------------------------------------------------- configs as plain data

def config_to_dict(config: SubnetConfig) -> dict[str, Any]:
    """The canonical config as a JSON/``weights_only``-safe dict of ints and int lists."""
    c = config.canonical()
    return {"patch_size": c.patch_size, "embed_dim": c.embed_dim, "heads": list(c.heads),
            "qkv_dim": list(c.qkv_dim), "mlp_dim": list(c.mlp_dim)}


def config_from_dict(d: dict[str, Any]) -> SubnetConfig:
    """Inverse of ``config_to_dict``."""
    return SubnetConfig(int(d["patch_size"]), int(d["embed_dim"]), tuple(d["heads"]), tuple(d["qkv_dim"]),
                        tuple(d["mlp_dim"]))


def _key(config: SubnetConfig) -> tuple:
    """Duplicate-detection key: the canonical encoding (identity positions do not matter)."""
    c = config.canonical()
    return (c.patch_size, c.embed_dim, c.heads, c.qkv_dim, c.mlp_dim)


# ----------------------------------------------------------------------------- random draws

def _draw(choices: Sequence[int], generator: torch.Generator) -> int:
    return choices[int(torch.randint(len(choices), (1,), generator=generator))]


def _coin(p: float, generator: torch.Generator) -> bool:
    """True with probability ``p``."""
    return float(torch.rand((), generator=generator)) < p


def _random_layer(space: SubnetSpace, generator: torch.Generator) -> tuple[int, int, int]:
    """(heads, qkv, mlp) drawn as ``sample_subnet`` draws a layer."""
    q = _draw(space.usable_qkv_dims, generator)
    return _draw(space.heads_for(q), generator), q, _draw(space.mlp_dims, generator)


def mutate(config: SubnetConfig, space: SubnetSpace, generator: torch.Generator,
           mutate_prob: float = 0.1) -> SubnetConfig:
    """Per-dimension resampling with probability ``mutate_prob`` (see the module docstring).
    Returns a canonical config of ``space`` (it may equal the input)."""
    c = config.canonical()
    patch = _draw(space.patch_sizes, generator) if _coin(mutate_prob, generator) else c.patch_size
    embed = _draw(space.embed_dims, generator) if _coin(mutate_prob, generator) else c.embed_dim
    depth = _draw(space.depths, generator) if _coin(mutate_prob, generator) else c.depth
    layers = []
    for h, q, m in list(zip(c.heads, c.qkv_dim, c.mlp_dim))[:depth]:
        if _coin(mutate_prob, generator):
            q = _draw(space.usable_qkv_dims, generator)
            if q % h:
                h = _draw(space.heads_for(q), generator)
        if _coin(mutate_prob, generator):
            h = _draw(space.heads_for(q), generator)
        if _coin(mutate_prob, generator):
            m = _draw(space.mlp_dims, generator)
        layers.append((h, q, m))
    while len(layers) < depth:
        layers.append(_random_layer(space, generator))
    heads, qkv, mlp = zip(*layers)
    return SubnetConfig(patch, embed, heads, qkv, mlp)


def crossover(a: SubnetConfig, b: SubnetConfig, generator: torch.Generator) -> SubnetConfig:
    """Uniform crossover on the canonical encodings (see the module docstring)."""
    a, b = a.canonical(), b.canonical()
    pick = lambda x, y: y if _coin(0.5, generator) else x  # noqa: E731
    patch, embed, depth = pick(a.patch_size, b.patch_size), pick(a.embed_dim, b.embed_dim), pick(a.depth, b.depth)
    heads, qkv, mlp = [], [], []
    for l in range(depth):
        srcs = [p for p in (a, b) if p.depth > l]
        att = pick(*srcs) if len(srcs) == 2 else srcs[0]
        ffn = pick(*srcs) if len(srcs) == 2 else srcs[0]
        heads.append(att.heads[l])
        qkv.append(att.qkv_dim[l])
        mlp.append(ffn.mlp_dim[l])
    return SubnetConfig(patch, embed, tuple(heads), tuple(qkv), tuple(mlp))


# ----------------------------------------------------------------------------- fitness

def _batches(data: Batches) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """One ``(images, labels)`` pair of tensors, or an iterable of them (e.g. a DataLoader)."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return [tuple(data)]
    return data


def supernet_accuracy(supernet: ElasticViT, loader_or_tensors: Batches, config: SubnetConfig) -> float:
    """Top-1 accuracy (in [0, 1]) of sub-network ``config`` on the given ``(images, labels)``
    batches: sets the subnet (it stays selected afterwards), evaluates under ``no_grad`` in eval
    mode and restores the previous train/eval mode. Inputs are moved to the supernet's device.
    Use ``functools.partial(supernet_accuracy, supernet, val_batches)`` as ``search``'s fitness."""
    was_training = supernet.training
    supernet.set_subnet(config)
    supernet.eval()
    device = next(supernet.parameters()).device
    correct = total = 0
    try:
        with torch.no_grad():
            for images, labels in _batches(loader_or_tensors):
                pred = supernet(images.to(device)).argmax(-1)
                correct += int((pred == labels.to(device)).sum())
                total += labels.numel()
    finally:
        supernet.train(was_training)
    if total == 0:
        raise ValueError("no labelled images to measure accuracy on")
    return correct / total


# ----------------------------------------------------------------------------- identity probability

def _depth_weights(depths: Sequence[int], num_slots: int, p: float) -> list[float]:
    """P(depth = d | d allowed) when each of ``num_slots`` slots is an identity with probability
    ``p`` (``p`` = 0 and 1 as the limits: all mass on the largest / smallest allowed depth)."""
    if p <= 0.0:
        return [float(d == max(depths)) for d in depths]
    if p >= 1.0:
        return [float(d == min(depths)) for d in depths]
    logw = [math.log(math.comb(num_slots, d)) + d * math.log1p(-p) + (num_slots - d) * math.log(p) for d in depths]
    top = max(logw)
    w = [math.exp(x - top) for x in logw]
    return [x / sum(w) for x in w]


def _mean_flops_per_depth(space: SubnetSpace, img_size: int, samples: int, seed: int, in_chans: int,
                          num_classes: int) -> list[float]:
    """Monte-Carlo mean FLOPs of ``sample_subnet`` conditioned on each allowed depth (a fixed
    generator: the same numbers on every call)."""
    gen = torch.Generator().manual_seed(seed)
    means = []
    for d in space.depths:
        fixed = dataclasses.replace(space, depths=(d,))
        total = sum(subnet_flops(sample_subnet(gen, fixed), img_size, in_chans=in_chans, num_classes=num_classes)
                    for _ in range(samples))
        means.append(total / samples)
    return means


def calibrate_identity_prob(space: SubnetSpace, img_size: int, flops_range: tuple[float, float], *,
                            samples: int = 256, seed: int = 0, tol: float = 1e-4, max_iter: int = 60,
                            in_chans: int = 3, num_classes: int = 1000) -> float:
    """The identity probability ``p_id`` for ``sample_subnet(..., p_identity=p_id)`` whose mean
    sub-network FLOPs is the centre of ``flops_range`` (ALGORITHMS.md, ViTAS supernet training).

    The mean at ``p`` is sum_d P(d | p) * m_d: P(d | p) is the exact conditional binomial
    ``sample_subnet`` draws the depth from, and m_d the Monte-Carlo mean FLOPs of ``samples``
    sub-networks of depth d drawn with a fixed generator (``seed``), computed once. The mean is
    then a smooth, deterministic, decreasing function of ``p`` (when m_d grows with d), found by
    bisection on [0, 1] until the bracket is narrower than ``tol``. ``ValueError`` when even
    p = 0 (all slots active) stays below the window or p = 1 (fewest layers) stays above it.
    """
    lo, hi = _check_window(flops_range)
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    m = _mean_flops_per_depth(space, img_size, samples, seed, in_chans, num_classes)
    mean = lambda p: sum(w * x for w, x in zip(_depth_weights(space.depths, space.num_slots, p), m))  # noqa: E731
    if mean(0.0) < lo:
        raise ValueError(f"flops_range {flops_range}: even the deepest sub-networks average {mean(0.0):.4g} FLOPs")
    if mean(1.0) > hi:
        raise ValueError(f"flops_range {flops_range}: even the shallowest sub-networks average {mean(1.0):.4g} FLOPs")
    target = (lo + hi) / 2
    a, b = 0.0, 1.0
    for _ in range(max_iter):
        if b - a < tol:
            break
        mid = (a + b) / 2
        a, b = (mid, b) if mean(mid) > target else (a, mid)
    p = (a + b) / 2
    logger.info("calibrated p_identity=%.5f: mean FLOPs %.4g in [%.4g, %.4g]", p, mean(p), lo, hi)
    return p


# ----------------------------------------------------------------------------- search state

@dataclass
class SearchResult:
    """``best_config`` / ``best_fitness``: the fittest candidate of the whole run (ties: the first
    evaluated). ``history``: one record per evaluated candidate, in evaluation order:
    ``{"generation", "origin" ("random" | "mutation" | "crossover"), "config" (config_to_dict),
    "flops", "fitness"}``. ``generations``: one summary per generation (count, best, mean)."""

    best_config: SubnetConfig
    best_fitness: float
    history: list[dict[str, Any]]
    generations: list[dict[str, Any]] = field(default_factory=list)

    def top(self, k: int) -> list[dict[str, Any]]:
        """The ``k`` fittest history records, best first."""
        return _ranked(self.history)[:k]


def _score(record: dict[str, Any]) -> float:
    f = record["fitness"]
    return f if math.isfinite(f) else -math.inf


def _ranked(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """History records by fitness, best first; stable, so ties keep evaluation order."""
    return sorted(history, key=lambda r: -_score(r))


def _check_window(flops_range: tuple[float, float]) -> tuple[float, float]:
    if not isinstance(flops_range, Sequence) or len(flops_range) != 2:
        raise ValueError(f"flops_range must be a (low, high) pair, got {flops_range!r}")
    lo, hi = (float(x) for x in flops_range)
    if not 0 <= lo <= hi:
        raise ValueError(f"flops_range must satisfy 0 <= low <= high, got {flops_range!r}")
    return lo, hi


class _Evolution:
    """The mutable state of one run and the steps that advance it."""

    def __init__(self, space: SubnetSpace, flops_fn: Callable[[SubnetConfig], int], settings: dict[str, Any]):
        self.space, self.flops_fn, self.settings = space, flops_fn, settings
        self.generator = torch.Generator().manual_seed(settings["seed"])
        self.generation = 0
        self.pending: list[dict[str, Any]] = []  # {"config", "origin", "flops"}: drawn, not yet evaluated
        self.history: list[dict[str, Any]] = []
        self.summaries: list[dict[str, Any]] = []
        self.exhausted = False  # a generation drew no child: the search is over

    # -- persistence

    def state(self) -> dict[str, Any]:
        return {"settings": self.settings, "generation": self.generation, "pending": self.pending,
                "history": self.history, "summaries": self.summaries, "exhausted": self.exhausted,
                "generator": self.generator.get_state()}

    def load(self, state: dict[str, Any]) -> None:
        """Restore a saved state (its settings already checked against this run's)."""
        self.generation, self.pending = state["generation"], state["pending"]
        self.history, self.summaries = state["history"], state["summaries"]
        self.exhausted = bool(state["exhausted"])
        self.generator.set_state(state["generator"])

    def save(self, run_dir: Optional[Path]) -> None:
        """State file and readable summary, atomically, rank 0 only (``runstate.save``)."""
        best = _ranked(self.history)[:1]
        runstate.save(run_dir, RUN_NAME, self.state(),
                      {"settings": self.settings, "generation": self.generation, "best": best[0] if best else None,
                       "generations": self.summaries, "history": self.history, "pending": self.pending})

    # -- drawing candidates

    def _accept(self, config: SubnetConfig, seen: set) -> Optional[int]:
        """FLOPs of ``config`` when it is new and inside the window, else None."""
        if _key(config) in seen:
            return None
        flops = int(self.flops_fn(config))
        lo, hi = self.settings["flops_range"]
        return flops if lo <= flops <= hi else None

    def _rejection(self, draw: Callable[[], SubnetConfig], origin: str, seen: set) -> Optional[dict[str, Any]]:
        """Up to ``max_tries`` draws until one is accepted; None (skip) when none is."""
        for _ in range(self.settings["max_tries"]):
            config = draw().canonical()
            flops = self._accept(config, seen)
            if flops is not None:
                seen.add(_key(config))
                return {"config": config_to_dict(config), "origin": origin, "flops": flops}
        return None

    def draw_initial(self) -> None:
        s, seen = self.settings, set()
        draw = lambda: sample_subnet(self.generator, self.space, s["p_identity"])  # noqa: E731
        self.pending = [c for c in (self._rejection(draw, "random", seen) for _ in range(s["population"])) if c]
        if not self.pending:
            raise ValueError(f"no random sub-network in {s['max_tries']} tries has FLOPs inside {s['flops_range']}")

    def draw_children(self) -> None:
        s = self.settings
        parents = [config_from_dict(r["config"]) for r in _ranked(self.history)[:s["parents"]]]
        seen = {_key(config_from_dict(r["config"])) for r in self.history}
        n_mut = s["population"] // 2
        children = []
        for _ in range(n_mut):
            draw = lambda: mutate(parents[int(torch.randint(len(parents), (1,), generator=self.generator))],  # noqa: E731
                                  self.space, self.generator, s["mutate_prob"])
            children.append(self._rejection(draw, "mutation", seen))
        if len(parents) >= 2:
            for _ in range(s["population"] - n_mut):
                def draw():
                    i, j = torch.randperm(len(parents), generator=self.generator)[:2].tolist()
                    return crossover(parents[i], parents[j], self.generator)
                children.append(self._rejection(draw, "crossover", seen))
        else:
            logger.warning("generation %d: fewer than 2 parents, no crossover", self.generation)
        self.pending = [c for c in children if c]
        self.exhausted = not self.pending
        skipped = len(children) - len(self.pending)
        if skipped:
            logger.info("generation %d: %d children skipped (no new in-window child in %d tries)",
                        self.generation, skipped, s["max_tries"])

    # -- evaluating

    def evaluate_pending(self, evaluate_fn: Fitness, map_fn: Callable[[Callable, list], list]) -> None:
        configs = [config_from_dict(c["config"]) for c in self.pending]
        fits = [float(f) for f in map_fn(evaluate_fn, configs)]
        if len(fits) != len(configs):
            raise RuntimeError(f"map_fn returned {len(fits)} fitness values for {len(configs)} candidates")
        for cand, fit in zip(self.pending, fits):
            if not math.isfinite(fit):
                logger.warning("non-finite fitness %r for %s: ranked last", fit, cand["config"])
            self.history.append({"generation": self.generation, **cand, "fitness": fit})
        finite = [f for f in fits if math.isfinite(f)]
        self.summaries.append({"generation": self.generation, "evaluated": len(fits),
                               "best": max(finite) if finite else None,
                               "mean": sum(finite) / len(finite) if finite else None,
                               "best_so_far": _score(_ranked(self.history)[0])})
        self.pending = []
        self.generation += 1


def search(supernet: ElasticViT, evaluate_fn: Fitness, flops_range: tuple[float, float], population: int = 50,
           generations: int = 40, *, parents: int = 10, mutate_prob: float = 0.1, max_tries: int = 50,
           p_identity: Optional[float] = None, seed: int = 0, run_dir: Optional[PathLike] = None,
           map_fn: Optional[Callable[[Callable, list], list]] = None, progress: Optional[bool] = None) -> SearchResult:
    """Evolutionary search over ``supernet``'s sub-networks whose ``supernet.subnet_flops`` lies in
    ``flops_range`` (inclusive; the supernet's img_size, in_chans and num_classes). See the module
    docstring for the algorithm, determinism and resumption.

    Args:
        supernet: the trained ``ElasticViT``; only its space and FLOPs count are used here
            (``evaluate_fn`` decides how candidates are scored, usually ``supernet_accuracy``).
        evaluate_fn: ``config -> fitness`` (higher is better), e.g.
            ``functools.partial(supernet_accuracy, supernet, val_batches)``.
        flops_range: ``(low, high)`` multiply-adds of one image's forward.
        population, generations: candidates per generation; evaluated generations (incl. the random 0th).
        parents: top-k of the history that mutation and crossover draw from.
        mutate_prob: per-dimension resampling probability of a mutation.
        max_tries: draws per child before it is skipped.
        p_identity: the identity probability of the random generation 0 (None: uniform depth);
            see ``calibrate_identity_prob``.
        seed: seeds the one ``torch.Generator`` of the run.
        run_dir: where the state is written after every generation and resumed from (None: not saved).
        map_fn: ``map_fn(fn, items) -> list`` evaluating a generation (default:
            ``search.distributed.map_candidates``).
        progress: ``asvit_kernels.progress`` over generations and each generation's candidates (a bar
            on a terminal, a periodic log line otherwise; False: none; rank 0 only).
    """
    if not isinstance(supernet, ElasticViT):
        raise TypeError(f"supernet must be an ElasticViT, got {type(supernet).__name__}")
    lo, hi = _check_window(flops_range)
    for name, v, least in (("population", population, 1), ("generations", generations, 1), ("parents", parents, 1),
                           ("max_tries", max_tries, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < least:
            raise ValueError(f"{name} must be an int >= {least}, got {v!r}")
    if not 0.0 <= mutate_prob <= 1.0:
        raise ValueError(f"mutate_prob must be in [0, 1], got {mutate_prob!r}")
    settings = {"flops_range": [lo, hi], "population": population, "parents": parents,
                "mutate_prob": float(mutate_prob), "max_tries": max_tries,
                "p_identity": None if p_identity is None else float(p_identity), "seed": int(seed),
                "space": repr(supernet.space), "img_size": supernet.img_size, "in_chans": supernet.in_chans,
                "num_classes": supernet.num_classes}
    run = _Evolution(supernet.space, supernet.subnet_flops, settings)
    path = None if run_dir is None else Path(run_dir)
    saved = runstate.load(path, RUN_NAME, keys=_STATE_KEYS)
    if saved is not None:
        runstate.check_settings(saved["settings"], run.settings)
        runstate.restore(path, RUN_NAME, run.load, saved)
        logger.info("resumed %s at generation %d (%d evaluated)", path, run.generation, len(run.history))
    else:
        run.draw_initial()
        run.save(path)
    if map_fn is None:
        def map_fn(fn, items):
            return distributed.map_candidates(fn, items, progress=progress, desc=f"generation {run.generation}")
    bar = Progress(total=generations, initial=min(run.generation, generations), desc="evolution",
                   unit="generation", progress=progress)
    try:
        while run.generation < generations and not run.exhausted:
            if not run.pending:
                run.draw_children()
                run.save(path)
                if run.exhausted:
                    logger.info("generation %d: no new candidate inside the window; stopping", run.generation)
                    break
            t0 = time.perf_counter()
            run.evaluate_pending(evaluate_fn, map_fn)
            run.save(path)
            summary = run.summaries[-1]
            bar.set_postfix(best=f"{summary['best_so_far']:.4g}")
            bar.update(1)
            logger.debug("generation %d: %d evaluated in %.1fs, best %s, best so far %.4g", summary["generation"],
                        summary["evaluated"], time.perf_counter() - t0, summary["best"], summary["best_so_far"])
    finally:
        bar.close()
    best = _ranked(run.history)[0]
    return SearchResult(config_from_dict(best["config"]), best["fitness"], run.history, run.summaries)
