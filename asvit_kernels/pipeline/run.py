"""The ``asvit pipeline`` job: topology search -> scaling -> training of one family member with
progressive re-tokenization, then ``report.md`` with plots.

Layout of a run directory::

    pipeline.json        settings (preset, data, seed), the wall-clock of each stage, the trained genotype,
                         ``estimate``: the run's estimated total and time left (``pipeline.estimate``:
                         rewritten after each search step from the first few on, each scaling step
                         and each training epoch)
    search/              REINFORCE checkpoint (search.topology) and result.json once finished
    scale/               scaling checkpoint (search.scaling) and result.json once finished
    train/               training checkpoints, metrics.jsonl, final weights, result.json
    report.md, plots/    rewritten (atomically) after each stage and each training epoch (the
                         training plot at most every ``report.RUNNING_PLOT_EVERY`` s until the end)

Every stage is resumable: rerunning the same command continues a killed stage from its last
checkpoint and skips finished ones (their ``result.json`` exists). Re-running with other settings
in the same directory is refused (ValueError naming each changed setting), since the stages would
no longer fit together; only ``member`` may change until training has started (an out-of-range
index is only detectable once scaling has found the family, and must not cost the search).

A stage's time is summed over every call that ran it: a call that finished or was interrupted
counts in full, a killed call counts up to the last file it wrote in the stage's directory (its
last checkpoint); the work redone after a kill is counted again, as it was spent again.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch

from asvit_kernels import atomic
from asvit_kernels.models.asvit import AsViT
from asvit_kernels.models.counting import count_flops, count_params
from asvit_kernels.models.genotype import Genotype
from asvit_kernels.progress import format_duration, watch
from asvit_kernels.search import distributed
from asvit_kernels.search.scaling import grow
from asvit_kernels.search.topology import reinforce
from asvit_kernels.train import data as data_lib
from asvit_kernels.train.retokenize import Retokenize, parse_stages
from asvit_kernels.train.trainer import TrainConfig, Trainer, describe_differences

from .estimate import LiveEstimate, train_estimate
from .presets import Preset
from .report import write_report

__all__ = ["kappa_images", "run_search", "run_scale", "choose_member", "build_asvit", "train_config", "run_train",
           "run_pipeline", "machine_text", "ntk_summary",
           "train_estimate"]

log = logging.getLogger(__name__)
RESULT = "result.json"
_HISTORY_KEYS = ("step", "genotype", "kappa", "length_distortion", "reward", "baseline", "entropy", "cached")


def kappa_images(data: data_lib.ImageData, n: int, seed: int) -> torch.Tensor:
    """``n`` normalised training images from a seeded draw: the indicators' batch (the paper: 16)."""
    n = min(n, len(data.train))
    idx = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:n]
    x, _ = next(iter(data_lib.batches(torch.utils.data.Subset(data.train, idx.tolist()), batch_size=n,
                                      shuffle=False, seed=0, epoch=0, drop_last=False)))
    return data_lib.to_float(x, data.mean, data.std)


_RESULT_KEYS = {"search": ("genotype", "seconds", "history"), "scale": ("family", "seconds"),
                "train": ("genotype", "status", "seconds", "final_acc")}


def _finished(stage_dir: Path, stage: str) -> Optional[dict]:
    """A finished stage's result.json (ValueError naming the file when it is damaged), or None."""
    path = stage_dir / RESULT
    if not path.exists():
        return None
    result = atomic.read_json(path, keys=_RESULT_KEYS[stage])
    if stage == "scale" and not (isinstance(result["family"], list) and result["family"]
                                          and all(isinstance(m, dict) and "genotype" in m for m in result["family"])):
        raise ValueError(f"{path} is damaged: 'family' must be a non-empty list of architectures with a genotype")
    return result


def ntk_summary(counts: Mapping[str, Any]) -> Optional[str]:
    """The INFO line on the NTK's exceptional path over a stage (``ops.ntk.path_counts``), or None
    when every call took the fast path: "ntk took the exact path for 3 of 371 evaluations: <reason>"."""
    exact = dict(counts.get("exact") or {})
    n = sum(exact.values())
    if not n:
        return None
    reasons = "; ".join(f"{why}" + (f" ({k} call{'s' if k != 1 else ''})" if len(exact) > 1 else "")
                        for why, k in sorted(exact.items(), key=lambda kv: -kv[1]))
    return f"ntk took the exact path for {n} of {counts['calls']} evaluations: {reasons}"


def _stage_start(stage: str, what: str) -> None:
    from asvit_kernels.ops.ntk import path_counts  # (asvit_kernels.ops.ntk is also a function's name)
    path_counts(reset=True)
    log.info("%s: %s", stage, what)


def _stage_end(stage: str, seconds: float, what: str) -> None:
    from asvit_kernels.ops.ntk import path_counts
    log.info("%s: finished in %s: %s", stage, format_duration(seconds), what)
    line = ntk_summary(path_counts(reset=True))
    if line:
        log.info("%s: %s", stage, line)


def _write_result(stage_dir: Path, result: Mapping[str, Any]) -> None:
    if distributed.is_main():
        atomic.write_json(stage_dir / RESULT, result)
    distributed.barrier()


def run_search(out: Path, data: data_lib.ImageData, preset: Preset, *, seed: int = 0,
               progress: Optional[bool] = None) -> dict[str, Any]:
    """REINFORCE topology search (search.topology.reinforce) on ``preset.kappa_batch`` images."""
    done = _finished(out, "search")
    if done is not None:
        log.info("search: finished before (%s): %s", out / RESULT, done["genotype"])
        return done
    t0 = time.perf_counter()
    _stage_start("search", f"{preset.search_steps} REINFORCE steps, {preset.repeats} initialisation(s) per "
                           f"indicator, {preset.kappa_batch} images")
    res = reinforce(steps=preset.search_steps, seed=seed, images=kappa_images(data, preset.kappa_batch, seed),
                    repeats=preset.repeats, run_dir=out, progress=progress,
                    eval_kwargs={"num_classes": data.num_classes})
    result = {"genotype": str(res.genotype), "steps": len(res.history), "seconds": time.perf_counter() - t0,
              "history": [{k: r.get(k) for k in _HISTORY_KEYS} for r in res.history],
              "probabilities": res.probabilities}
    _write_result(out, result)
    _stage_end("search", result["seconds"], f"genotype {result['genotype']} (the policy's argmax)")
    return result


def run_scale(out: Path, data: data_lib.ImageData, preset: Preset, seed_genotype: str, *, seed: int = 0,
              progress: Optional[bool] = None) -> dict[str, Any]:
    """Greedy scaling (search.scaling.grow) of the searched topology into a family."""
    done = _finished(out, "scale")
    if done is not None:
        log.info("scaling: finished before (%s): %d architectures", out / RESULT, len(done["family"]))
        return done
    t0 = time.perf_counter()
    _stage_start("scaling", f"grow {seed_genotype} until {preset.param_limit[0] / 1e6:.3g}M parameters (drop "
                            f"candidates above {preset.param_limit[1] / 1e6:.3g}M), {preset.repeats} "
                            f"initialisation(s) per indicator")
    res = grow(seed_genotype, param_limit=preset.param_limit, images=kappa_images(data, preset.kappa_batch, seed),
               hidden=preset.scale_hidden, repeats=preset.repeats, seed=seed, num_classes=data.num_classes,
               img_size=data.image_size, run_dir=out, progress=progress)
    if not res.family:
        raise ValueError(f"scaling produced no architecture: every first-step candidate of {seed_genotype} is above "
                         f"the parameter limit {preset.param_limit[1]:.3g} (raise --param-limit)")
    result = {"family": res.family, "stop_reason": res.stop_reason, "seconds": time.perf_counter() - t0}
    _write_result(out, result)
    last = res.family[-1]
    _stage_end("scaling", result["seconds"], f"{len(res.family)} architectures ({res.stop_reason}), the largest "
                                             f"{last['genotype']} with {last['params'] / 1e6:.2f}M parameters")
    return result


def choose_member(family: list, member: Union[str, int]) -> int:
    """Index of the family member to train: "largest" (last step), "smallest" (first) or an index."""
    if member == "largest":
        return len(family) - 1
    if member == "smallest":
        return 0
    try:
        i = int(member)
    except (TypeError, ValueError):
        raise ValueError(f"member must be 'largest', 'smallest' or an index, got {member!r}") from None
    if not -len(family) <= i < len(family):
        raise ValueError(f"member {i} is out of range: the family has {len(family)} architectures "
                         f"(indices {-len(family)}..{len(family) - 1})")
    return i % len(family)


def build_asvit(genotype: str, data: data_lib.ImageData, seed: int) -> AsViT:
    """The As-ViT to train, initialised from ``seed`` (a resumed run rebuilds it identically)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AsViT.from_genotype(genotype, num_classes=data.num_classes, img_size=data.image_size)


def train_config(preset: Preset, *, seed: int = 0, **overrides: Any) -> TrainConfig:
    """``TrainConfig`` from a preset's training fields (``overrides``: any TrainConfig field)."""
    fields = dict(epochs=preset.epochs, batch_size=preset.batch_size, lr=preset.lr, min_lr=preset.min_lr,
                  weight_decay=preset.weight_decay, warmup_epochs=preset.warmup_epochs,
                  label_smoothing=preset.label_smoothing, clip_grad=preset.clip_grad, drop_path=preset.drop_path,
                  ema_decays=preset.ema_decays, crop_scale=preset.crop_scale, seed=seed)
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**fields)


_METRIC_KEYS = ("epoch", "train_loss", "val_loss", "val_acc", "val_acc_ema", "lr", "seconds", "images_per_s", "stage")


def run_train(out: Path, data: data_lib.ImageData, genotype: str, config: TrainConfig, retokenize: str, *,
              ema_at_switch: str = "restart", resume: bool = True,
              on_epoch: Optional[Callable[[dict], None]] = None) -> dict[str, Any]:
    """Train ``genotype`` with progressive re-tokenization (``ema_at_switch``: keep or reseed the
    EMA copies at a switch); returns the report's "train" section.
    ``status`` is "finished", or "interrupted" (SIGTERM or SIGINT, named by ``signal``: checkpointed,
    rerun to continue). ``on_epoch(section)``: after every epoch (rank 0), the section so far."""
    done = _finished(out, "train")
    if done is not None and resume:
        log.info("train: finished before (%s): top-1 %.2f%%", out / RESULT, done["final_acc"])
        return done
    t0 = time.perf_counter()
    model = build_asvit(genotype, data, config.seed)
    g = Genotype.parse(genotype)
    strategy = Retokenize(parse_stages(retokenize, g.kernels[0], data.image_size), ema_at_switch=ema_at_switch)
    params = count_params(model)
    with torch.random.fork_rng(devices=[]):  # count_flops draws a random image: keep the training RNG as it is
        flops = count_flops(model, data.image_size)
    _stage_start("train", f"{genotype} ({params / 1e6:.2f}M parameters, {flops / 1e6:.1f}M MACs), "
                          f"{config.epochs} epochs, batch {config.batch_size}, lr {config.lr:g}, re-tokenization: "
                          f"{strategy.schedule_text(config.epochs)}")
    section = {"genotype": genotype, "params": params, "flops": flops, "epochs": config.epochs,
               "schedule": "retokenize: " + strategy.schedule_text(config.epochs),
               "ema_decays": list(config.ema_decays), "ema_at_switch": ema_at_switch,
               "chance_acc": 100.0 / data.num_classes}

    def epoch_done(records: list) -> None:
        if on_epoch is not None:
            last = records[-1]
            on_epoch({**section, "status": "running", "seconds": time.perf_counter() - t0,
                      "final_acc": last.get("val_acc"), "final_acc_ema": last.get("val_acc_ema"),
                      "best_acc": max(r["val_acc"] for r in records),
                      "metrics": [{k: r.get(k) for k in _METRIC_KEYS} for r in records]})

    summary = Trainer(model, data, config, strategy=strategy, run_dir=out).fit(resume=resume, on_epoch=epoch_done)
    result = {**section, "status": summary["status"], "signal": summary.get("signal"),
              "seconds": time.perf_counter() - t0, "final_acc": summary["final_acc"],
              "final_acc_ema": summary["final_acc_ema"], "best_acc": summary["best_acc"],
              "metrics": [{k: r.get(k) for k in _METRIC_KEYS} for r in summary["epochs"]]}
    if summary["status"] == "finished":
        _write_result(out, result)
        ema = "" if result["final_acc_ema"] is None else f", EMA {result['final_acc_ema']:.2f}%"
        _stage_end("train", result["seconds"], f"top-1 {result['final_acc']:.2f}%{ema} "
                                               f"(best {result['best_acc']:.2f}%, chance {result['chance_acc']:.1f}%)")
    else:
        log.info("train: %s by %s after epoch %d: rerun the same command to continue", summary["status"],
                 summary.get("signal") or "the epoch limit of this call", summary["epoch"])
    return result


def machine_text(device: torch.device) -> str:
    if device.type == "cuda":
        what = f"{torch.cuda.get_device_name(device)} x {distributed.world_size()}"
    else:
        what = f"CPU ({torch.get_num_threads()} threads x {distributed.world_size()} process(es), {platform.machine()})"
    return f"{what}, torch {torch.__version__}, Python {platform.python_version()}"


def _last_write(stage_dir: Path) -> float:
    """The newest modification time of a file under ``stage_dir`` (0 when none)."""
    times = [p.stat().st_mtime for p in stage_dir.rglob("*") if p.is_file()] if stage_dir.is_dir() else []
    return max(times, default=0.0)


class _StageClock:
    """Each stage's time summed over the calls that ran it, kept in ``pipeline.json``: ``calls``
    holds the seconds of earlier calls, ``running`` the start (epoch seconds) of a call in
    progress; a call that never stopped its clock was killed, and counts up to its last write."""

    def __init__(self, state: dict, save):
        self.state, self.save = state, save
        self.calls = state.setdefault("calls", {})
        self.running = state.setdefault("running", {})

    def run(self, stage: str, stage_dir: Path, fn):
        if stage in self.state["seconds"] and (stage_dir / RESULT).exists():  # finished before: fn reads it
            return {**fn(), "seconds": self.state["seconds"][stage]}
        started = self.running.pop(stage, None)
        if started is not None:
            self.calls[stage] = self.calls.get(stage, 0.0) + max(0.0, _last_write(stage_dir) - started)
        self.running[stage] = time.time()
        self.save()
        t0 = time.perf_counter()
        result = fn()
        self.calls[stage] = self.calls.get(stage, 0.0) + time.perf_counter() - t0
        del self.running[stage]
        if result.get("status", "finished") == "finished":
            self.state["seconds"][stage] = self.calls[stage]
        self.save()
        return {**result, "seconds": self.calls[stage]}


def _load_state(state_path: Path, settings: Mapping[str, Any]) -> dict:
    """pipeline.json (new when missing); ValueError naming every changed setting."""
    if not state_path.exists():
        return {"settings": settings, "seconds": {}}
    state = atomic.read_json(state_path, keys=("settings", "seconds"))
    if not isinstance(state["settings"], dict) or not isinstance(state["seconds"], dict):
        raise ValueError(f"{state_path} is damaged: 'settings' and 'seconds' must be JSON objects")
    state["settings"].get("preset", {}).pop("member", None)  # compared by _check_member (older files kept it)
    state["settings"].get("preset", {}).setdefault("ema_at_switch", "keep")  # older runs kept the EMA
    diff = describe_differences(state["settings"], settings)
    if diff:
        raise ValueError(f"{state_path.parent} holds a pipeline run with other settings ({diff}); use the same "
                         f"options or another --out directory")
    return state


def _check_member(state: dict, state_path: Path, genotype: str, member: str) -> None:
    """The member may change until training started (then its checkpoints belong to another model)."""
    trained = state.setdefault("train_genotype", genotype)
    if trained != genotype:
        raise ValueError(f"{state_path.parent} is training {trained} (see {state_path}); --member {member} chose "
                         f"{genotype}: use the member it started with, or another --out directory")


def run_pipeline(run_dir: Union[str, Path], preset: Preset, *, data_path: Optional[str] = None, seed: int = 0,
                 train_overrides: Optional[Mapping[str, Any]] = None, command: str = "",
                 progress: Optional[bool] = None) -> dict[str, Any]:
    """Search -> scale -> train -> report in ``run_dir`` (module docstring). Returns the results
    mapping the report was written from (``results["train"]["status"]`` says whether training
    finished)."""
    run_dir = Path(run_dir)
    overrides = dict(train_overrides or {})
    config = train_config(preset, seed=seed, **overrides)  # ValueError before any work
    data = data_lib.open_dataset(data_path, seed=seed)
    settings = json.loads(json.dumps({  # as stored: tuples become lists
        "preset": {k: v for k, v in preset.to_dict().items() if k != "member"}, "data": data.name, "seed": seed,
        "train": {k: v for k, v in config.to_dict().items() if k not in ("progress", "num_workers")}}))
    state_path = run_dir / "pipeline.json"
    state = _load_state(state_path, settings)

    def save() -> None:
        if distributed.is_main():
            atomic.write_json(state_path, state)

    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
    clock = _StageClock(state, save)
    results = {"title": f"asvit pipeline: {preset.name} preset on {data.name}", "preset": preset.name,
               "command": command, "machine": machine_text(distributed.device()),
               "data": {"name": data.name, "num_classes": data.num_classes, "train": len(data.train),
                        "val": len(data.val), "image_size": data.image_size}}

    def report(**sections: Any) -> None:
        """report.md and plots from what is done so far (rank 0; each file atomically)."""
        results.update(sections, stages=dict(state["seconds"]))
        if distributed.is_main():
            write_report(run_dir, results)

    live = LiveEstimate(state, save, clock, preset, data, config, seed=seed, device=distributed.device())
    with watch("search", live.on_search):
        search = clock.run("search", run_dir / "search",
                           lambda: run_search(run_dir / "search", data, preset, seed=seed, progress=progress))
    report(search=search)
    live.seed_genotype = search["genotype"]
    with watch("scaling", live.on_scale):
        scale = clock.run("scale", run_dir / "scale",
                          lambda: run_scale(run_dir / "scale", data, preset, search["genotype"], seed=seed,
                                            progress=progress))
    report(scaling=scale)
    try:
        chosen = choose_member(scale["family"], preset.member)
    except ValueError as e:
        raise ValueError(f"--member: {e}; the search and scaling results in {run_dir} are kept: rerun with a "
                         f"valid --member") from None
    genotype = scale["family"][chosen]["genotype"]
    _check_member(state, state_path, genotype, preset.member)
    report(scaling={**scale, "chosen": chosen})
    epochs_this_call = []

    def epoch_done(section: dict) -> None:
        epochs_this_call.append(len(section["metrics"]))
        estimate = train_estimate(section["seconds"], len(epochs_this_call), len(section["metrics"]), config.epochs,
                                  dict(state["seconds"]), clock.calls.get("train", 0.0))  # + earlier calls
        state["estimate"] = estimate
        save()
        if len(epochs_this_call) == 1:
            log.info("pipeline: estimated total %s (search %s + scaling %s measured, training %s estimated from %d "
                     "epoch(s)); %s left", format_duration(estimate["total_seconds"]),
                     format_duration(estimate["stages"].get("search")),
                     format_duration(estimate["stages"].get("scale")), format_duration(estimate["stages"]["train"]),
                     estimate["epochs_measured"], format_duration(estimate["remaining_seconds"]))
        report(train=section)

    train = clock.run("train", run_dir / "train",
                      lambda: run_train(run_dir / "train", data, genotype, config, preset.retokenize,
                                        ema_at_switch=preset.ema_at_switch, on_epoch=epoch_done))
    report(train=train)
    distributed.barrier()
    return results
