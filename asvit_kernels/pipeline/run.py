"""The ``asvit pipeline`` job: topology search -> scaling -> training of one family member with
progressive re-tokenization, then ``report.md`` with plots.

Layout of a run directory::

    pipeline.json        settings (preset, data, seed) and the wall-clock of each finished stage
    search/              REINFORCE checkpoint (search.topology) and result.json once finished
    scale/               scaling checkpoint (search.scaling) and result.json once finished
    train/               training checkpoints, metrics.jsonl, final weights, result.json
    report.md, plots/    written at the end

Every stage is resumable: rerunning the same command continues a killed stage from its last
checkpoint and skips finished ones (their ``result.json`` exists). Re-running with other settings
in the same directory is refused (ValueError), since the stages would no longer fit together.
Stage times count the calls that ran the stage; time lost to a kill is not counted.
"""
from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from asvit_kernels import atomic
from asvit_kernels.models.asvit import AsViT
from asvit_kernels.models.counting import count_flops, count_params
from asvit_kernels.models.genotype import Genotype
from asvit_kernels.search import distributed
from asvit_kernels.search.scaling import grow
from asvit_kernels.search.topology import reinforce
from asvit_kernels.train import data as data_lib
from asvit_kernels.train.retokenize import Retokenize, parse_stages
from asvit_kernels.train.trainer import TrainConfig, Trainer

from .presets import Preset
from .report import write_report

__all__ = ["kappa_images", "run_search", "run_scale", "choose_member", "build_asvit", "train_config", "run_train",
           "run_pipeline", "machine_text"]

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


def _finished(stage_dir: Path) -> Optional[dict]:
    path = stage_dir / RESULT
    return atomic.read_json(path) if path.exists() else None


def _write_result(stage_dir: Path, result: Mapping[str, Any]) -> None:
    if distributed.is_main():
        atomic.write_json(stage_dir / RESULT, result)
    distributed.barrier()


def run_search(out: Path, data: data_lib.ImageData, preset: Preset, *, seed: int = 0,
               progress: Optional[bool] = None) -> dict[str, Any]:
    """REINFORCE topology search (search.topology.reinforce) on ``preset.kappa_batch`` images."""
    done = _finished(out)
    if done is not None:
        return done
    t0 = time.perf_counter()
    res = reinforce(steps=preset.search_steps, seed=seed, images=kappa_images(data, preset.kappa_batch, seed),
                    repeats=preset.repeats, run_dir=out, progress=progress,
                    eval_kwargs={"num_classes": data.num_classes})
    result = {"genotype": str(res.genotype), "steps": len(res.history), "seconds": time.perf_counter() - t0,
              "history": [{k: r.get(k) for k in _HISTORY_KEYS} for r in res.history],
              "probabilities": res.probabilities}
    _write_result(out, result)
    return result


def run_scale(out: Path, data: data_lib.ImageData, preset: Preset, seed_genotype: str, *, seed: int = 0,
              progress: Optional[bool] = None) -> dict[str, Any]:
    """Greedy scaling (search.scaling.grow) of the searched topology into a family."""
    done = _finished(out)
    if done is not None:
        return done
    t0 = time.perf_counter()
    res = grow(seed_genotype, param_limit=preset.param_limit, images=kappa_images(data, preset.kappa_batch, seed),
               hidden=preset.scale_hidden, repeats=preset.repeats, seed=seed, num_classes=data.num_classes,
               img_size=data.image_size, run_dir=out, progress=progress)
    if not res.family:
        raise ValueError(f"scaling produced no architecture: every first-step candidate of {seed_genotype} is above "
                         f"the parameter limit {preset.param_limit[1]:.3g} (raise --param-limit)")
    result = {"family": res.family, "stop_reason": res.stop_reason, "seconds": time.perf_counter() - t0}
    _write_result(out, result)
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
        raise ValueError(f"member {i} is out of range: the family has {len(family)} architectures")
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


def run_train(out: Path, data: data_lib.ImageData, genotype: str, config: TrainConfig, retokenize: str, *,
              resume: bool = True) -> dict[str, Any]:
    """Train ``genotype`` with progressive re-tokenization; returns the report's "train" section.
    ``status`` is "finished", or "interrupted" (SIGTERM: checkpointed, rerun to continue)."""
    done = _finished(out)
    if done is not None and resume:
        return done
    t0 = time.perf_counter()
    model = build_asvit(genotype, data, config.seed)
    g = Genotype.parse(genotype)
    strategy = Retokenize(parse_stages(retokenize, g.kernels[0], data.image_size))
    params = count_params(model)
    with torch.random.fork_rng(devices=[]):  # count_flops draws a random image: keep the training RNG as it is
        flops = count_flops(model, data.image_size)
    summary = Trainer(model, data, config, strategy=strategy, run_dir=out).fit(resume=resume)
    result = {"genotype": genotype, "params": params, "flops": flops, "epochs": config.epochs,
              "status": summary["status"], "seconds": time.perf_counter() - t0,
              "schedule": "retokenize: " + strategy.schedule_text(config.epochs),
              "final_acc": summary["final_acc"], "final_acc_ema": summary["final_acc_ema"],
              "best_acc": summary["best_acc"], "chance_acc": 100.0 / data.num_classes,
              "metrics": [{k: r.get(k) for k in ("epoch", "train_loss", "val_loss", "val_acc", "val_acc_ema", "lr",
                                                 "seconds", "images_per_s", "stage")} for r in summary["epochs"]]}
    if summary["status"] == "finished":
        _write_result(out, result)
    return result


def machine_text(device: torch.device) -> str:
    if device.type == "cuda":
        what = f"{torch.cuda.get_device_name(device)} x {distributed.world_size()}"
    else:
        what = f"CPU ({torch.get_num_threads()} threads x {distributed.world_size()} process(es), {platform.machine()})"
    return f"{what}, torch {torch.__version__}, Python {platform.python_version()}"


def run_pipeline(run_dir: Union[str, Path], preset: Preset, *, data_path: Optional[str] = None, seed: int = 0,
                 train_overrides: Optional[Mapping[str, Any]] = None, command: str = "",
                 progress: Optional[bool] = None) -> dict[str, Any]:
    """Search -> scale -> train -> report in ``run_dir`` (module docstring). Returns the results
    mapping the report was written from (``results["train"]["status"]`` says whether training
    finished)."""
    run_dir = Path(run_dir)
    data = data_lib.open_dataset(data_path, seed=seed)
    overrides = dict(train_overrides or {})
    config = train_config(preset, seed=seed, **overrides)
    settings = json.loads(json.dumps({  # as stored: tuples become lists
        "preset": preset.to_dict(), "data": data.name, "seed": seed,
        "train": {k: v for k, v in config.to_dict().items() if k not in ("progress", "num_workers")}}))
    state_path = run_dir / "pipeline.json"
    state = atomic.read_json(state_path) if state_path.exists() else {"settings": settings, "seconds": {}}
    if state["settings"] != settings:
        raise ValueError(f"{run_dir} holds a pipeline run with other settings (see {state_path}); use the same "
                         f"options or another --out directory")

    def finish(stage: str, seconds: float) -> None:
        if stage not in state["seconds"]:
            state["seconds"][stage] = seconds
        if distributed.is_main():
            atomic.write_json(state_path, state)

    if distributed.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_json(state_path, state)
    search = run_search(run_dir / "search", data, preset, seed=seed, progress=progress)
    finish("search", search["seconds"])
    scale = run_scale(run_dir / "scale", data, preset, search["genotype"], seed=seed, progress=progress)
    finish("scale", scale["seconds"])
    chosen = choose_member(scale["family"], preset.member)
    genotype = scale["family"][chosen]["genotype"]
    train = run_train(run_dir / "train", data, genotype, config, preset.retokenize)
    if train["status"] == "finished":
        finish("train", train["seconds"])
    results = {"title": f"asvit pipeline: {preset.name} preset on {data.name}", "preset": preset.name,
               "command": command, "machine": machine_text(distributed.device()),
               "data": {"name": data.name, "num_classes": data.num_classes, "train": len(data.train),
                        "val": len(data.val), "image_size": data.image_size},
               "search": search, "scaling": {**scale, "chosen": chosen}, "train": train,
               "stages": dict(state["seconds"])}
    if distributed.is_main() and train["status"] == "finished":
        write_report(run_dir, results)
    distributed.barrier()
    return results
