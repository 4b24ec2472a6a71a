"""``asvit pipeline --dry-run``: the plan of a pipeline run (stages, steps, epochs) and its time
estimated from a few timed steps, without writing anything.

How each stage is estimated (the searched topology, the family and the trained member are only
known once the run has found them, so the estimate stands in for them):

* search: ``timed`` indicator evaluations (``search.indicators.evaluate`` with the preset's
  repeats and images) of topologies drawn from the search space, mean time x ``search_steps``
  (an upper bound: a topology drawn again reuses its measurement);
* scaling: the growth path is simulated on parameter counts alone (meta device, no measurement):
  from the first drawn topology, each step takes the survivor with the median parameter count,
  until the preset's stop limit; a candidate's measurement is timed at the first and at the last
  simulated step and interpolated linearly over the steps;
* training: ``timed`` optimizer steps (forward, backward, AdamW) of the simulated largest member
  on random images at the batch size, x steps per epoch x epochs; plus evaluation: ``timed``
  forward passes (no grad, eval mode) at the evaluation batch size, x the batches of the
  validation set (``eval_batches`` caps them) x the evaluations the run does (after every epoch
  the model, and the slowest EMA copy when there is one, as ``train.trainer.Trainer`` does).
  Both at the final, full-resolution tokenization: re-tokenized early epochs are cheaper, so this
  part is an upper bound.

``estimate_training`` is also what ``pipeline.run`` uses for the training stage's estimate
before training has measured an epoch.
"""
from __future__ import annotations

import math
import time
from typing import Any, Mapping, Optional

import torch
import torch.nn.functional as F

from asvit_kernels.models.asvit import AsViT
from asvit_kernels.models.genotype import DEFAULT_DEPTHS, DEFAULT_HIDDEN, SPACE, Genotype
from asvit_kernels.progress import format_duration
from asvit_kernels.search import indicators
from asvit_kernels.search.scaling import full_genotype, full_params, make_candidates
from asvit_kernels.search.topology import CategoricalPolicy
from asvit_kernels.train import data as data_lib
from asvit_kernels.train.trainer import adamw

from .presets import Preset

__all__ = ["plan_pipeline", "plan_text", "estimate_training", "simulate_growth", "drawn_topologies"]

_WIDTH_RATIOS = (0.05, 0.1, 0.15, 0.2)  # search.scaling.grow's defaults, as run.run_scale uses them


def _timed(fn, n: int) -> float:
    """Mean seconds of ``n`` calls of ``fn``."""
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def simulate_growth(seed: Genotype, preset: Preset, num_classes: int,
                     img_size: int) -> list[tuple[Genotype, int, int]]:
    """(full genotype, proxy width, candidates measured) per simulated growth step."""
    stop, drop = preset.param_limit
    depths, hidden, steps = (1, 1, 1, 1), preset.scale_hidden, []
    for _ in range(200):
        cands = []
        for d, w in make_candidates(depths, hidden, _WIDTH_RATIOS):
            g = full_genotype(seed, d, w, 4)
            p = full_params(g, num_classes=num_classes, img_size=img_size)
            if p <= drop:
                cands.append((p, g, d, w))
        if not cands:
            break
        cands.sort(key=lambda c: c[0])
        p, g, depths, hidden = cands[len(cands) // 2]
        steps.append((g, hidden, len(cands)))
        if p >= stop:
            break
    return steps


def drawn_topologies(seed: int, n: int) -> list[Genotype]:
    """``n`` topologies drawn from the search space by a fresh policy (seeded): what a search's
    first steps measure."""
    gen = torch.Generator().manual_seed(seed)
    policy = CategoricalPolicy(SPACE, gen)
    return [policy.genotype(policy.sample(gen), hidden=DEFAULT_HIDDEN, depths=DEFAULT_DEPTHS) for _ in range(n)]


def plan_pipeline(preset: Preset, data: data_lib.ImageData, config, *, seed: int = 0,
                  timed: int = 2) -> dict[str, Any]:
    """The plan and its estimate (module docstring); nothing is written."""
    images = _kappa_images(data, preset, seed)
    drawn = drawn_topologies(seed, timed + 1)
    evaluate = lambda g, **kw: indicators.evaluate(g, images, repeats=preset.repeats, seed=seed,  # noqa: E731
                                                   num_classes=data.num_classes, **kw)
    evaluate(drawn[0])  # warm-up (first-call overheads)
    it = iter(drawn[1:])
    search_step = _timed(lambda: evaluate(next(it)), timed)
    growth = simulate_growth(drawn[0], preset, data.num_classes, data.image_size)
    if growth:
        first = _timed(lambda: evaluate(growth[0][0], embed_dim=growth[0][1]), 1)
        last = _timed(lambda: evaluate(growth[-1][0], embed_dim=growth[-1][1]), 1) if len(growth) > 1 else first
        n = len(growth)
        scale_seconds = sum(k * (first + (last - first) * i / max(1, n - 1)) for i, (_, _, k) in enumerate(growth))
    else:
        first = last = scale_seconds = 0.0
    member = growth[-1][0] if growth else drawn[0]
    train = estimate_training(member, data, config, timed=timed)
    stages = {"search": search_step * preset.search_steps, "scale": scale_seconds, "train": train["seconds"]}
    return {"preset": preset.name, "data": data.name, "search_steps": preset.search_steps, "repeats": preset.repeats,
            "seconds_per_search_step": search_step, "scaling_steps": len(growth),
            "scaling_candidates": sum(k for _, _, k in growth), "seconds_per_candidate": [first, last],
            "member": str(member), "member_params": full_params(member, num_classes=data.num_classes,
                                                                 img_size=data.image_size),
            "epochs": config.epochs, "batch_size": config.batch_size, **train, "stages": stages,
            "total_seconds": sum(stages.values()), "timed": timed}


def estimate_training(member: Genotype, data: data_lib.ImageData, config, *, timed: int = 2,
                      device: Optional[torch.device] = None) -> dict[str, Any]:
    """Training's seconds (module docstring): ``train_seconds`` (optimizer steps) + ``eval_seconds``
    (the evaluation passes) = ``seconds``, with the per-step and per-batch times they come from."""
    steps_per_epoch = data_lib.num_batches(len(data.train), batch_size=config.batch_size, world=1, drop_last=True)
    eval_batch_size = config.eval_batch_size or config.batch_size
    eval_batches = math.ceil(len(data.val) / eval_batch_size)
    if config.eval_batches is not None:
        eval_batches = min(eval_batches, config.eval_batches)
    evaluations = config.epochs * (2 if config.ema_decays else 1)  # the model, and the slowest EMA copy
    train_step, eval_batch = _time_steps(member, data, config.batch_size, eval_batch_size, timed,
                                         torch.device("cpu") if device is None else device)
    train_seconds = train_step * steps_per_epoch * config.epochs
    eval_seconds = eval_batch * eval_batches * evaluations
    return {"steps_per_epoch": steps_per_epoch, "seconds_per_train_step": train_step, "train_seconds": train_seconds,
            "eval_batch_size": eval_batch_size, "eval_batches": eval_batches, "evaluations": evaluations,
            "seconds_per_eval_batch": eval_batch, "eval_seconds": eval_seconds,
            "seconds": train_seconds + eval_seconds}


def _kappa_images(data: data_lib.ImageData, preset: Preset, seed: int) -> torch.Tensor:
    from .run import kappa_images
    return kappa_images(data, preset.kappa_batch, seed)


def _time_steps(genotype: Genotype, data: data_lib.ImageData, batch_size: int, eval_batch_size: int, n: int,
                device: torch.device) -> tuple[float, float]:
    """Mean seconds of one optimizer step and of one evaluation batch (forward, no grad) of ``genotype``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AsViT.from_genotype(genotype, num_classes=data.num_classes, img_size=data.image_size).to(device)
        opt = adamw([{"params": list(model.parameters())}], lr=1e-4)  # the trainer's optimizer
        x = torch.randn(batch_size, 3, data.image_size, data.image_size, device=device)
        y = torch.randint(data.num_classes, (batch_size,), device=device)
        x_eval = torch.randn(eval_batch_size, 3, data.image_size, data.image_size, device=device)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sync()

        @torch.no_grad()
        def evaluate():
            model(x_eval).argmax(-1)
            sync()
        step()  # warm-up (allocations, first-call overheads)
        train = _timed(step, n)
        model.eval()
        evaluate()
        return train, _timed(evaluate, n)


def plan_text(plan: Mapping[str, Any]) -> str:
    """The plan as ``asvit pipeline --dry-run`` prints it."""
    s = plan["stages"]
    first, last = plan["seconds_per_candidate"]
    return "\n".join([
        f"plan: {plan['preset']} preset on {plan['data']} (nothing written; estimates from {plan['timed']} timed "
        f"steps each)",
        f"  search:  {plan['search_steps']} REINFORCE steps x {plan['repeats']} initialisation(s), "
        f"{plan['seconds_per_search_step']:.2f} s/step: ~{format_duration(s['search'])}",
        f"  scaling: ~{plan['scaling_steps']} growth steps, ~{plan['scaling_candidates']} candidates, "
        f"{first:.2f}-{last:.2f} s/candidate: ~{format_duration(s['scale'])}",
        f"  train:   {plan['epochs']} epochs x {plan['steps_per_epoch']} steps (batch {plan['batch_size']}) of a "
        f"~{plan['member_params'] / 1e6:.1f}M-parameter member, {plan['seconds_per_train_step']:.2f} s/step: "
        f"~{format_duration(plan['train_seconds'])}",
        f"  eval:    {plan['evaluations']} evaluations x {plan['eval_batches']} batches (batch "
        f"{plan['eval_batch_size']}), {plan['seconds_per_eval_batch']:.3f} s/batch: "
        f"~{format_duration(plan['eval_seconds'])} (training with evaluation: ~{format_duration(s['train'])})",
        f"  total:   ~{format_duration(plan['total_seconds'])}"])
