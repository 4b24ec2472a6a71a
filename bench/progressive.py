"""Training time and accuracy with and without progressive training: As-ViT's progressive
re-tokenization and AutoProg (manual stages and growth-schedule search), each against the same
model trained plainly for the same epochs.

Five full training runs through ``asvit_kernels.train.trainer.Trainer``, on the same data split,
for the same epochs, with the same ``TrainConfig`` and seed (so the same initial weights within a
model, the same batch order and the same augmentation draws):

    asvit                As-ViT ``AsViT.from_genotype(--genotype)``, plain ``Strategy()``
    asvit-retokenize     the same As-ViT with ``Retokenize(parse_stages(--retokenize, K1, img))``:
                         coarse stage-1 tokens (larger stride / dilation of the same weights) early
    vit                  a DeiT-shaped ViT (``autoprog.elastic_vit_for_autoprog``: --vit-embed,
                         --vit-depth, --vit-heads, --patch), plain ``Strategy()``: the whole model
                         at the full input size every epoch
    vit-autoprog         the same ViT with ``AutoProg(search=False)``: --stages stages of growing
                         input size and depth (MoGrow from the slowest EMA at each growth)
    vit-autoprog-search  the same ViT with ``AutoProg(search=True)``: each stage's (size, depth)
                         chosen by AutoProg's growth-schedule search (--search-epochs per stage)

Measured per row: train_s = the sum of the trainer's per-epoch "seconds" (the training steps only:
data indexing, augmentation, forward, backward, optimizer, EMA); total_s = wall-clock of building
the Trainer and ``fit()`` (train_s plus the per-epoch evaluation of the model and of the EMA, and
the strategy's work between epochs: AutoProg's MoGrow growth, optimizer resets and the search's
candidate scoring); img_per_s = training images / train_s; on the CPU also train_cpu_s, the
process's CPU seconds over the same training steps (not stretched by time the scheduler gives to
other jobs on a shared machine, as the wall-clock is); the trainer's final top-1 of the model and
of its EMA on the validation split (at the data's size, after the last epoch) and the best
per-epoch top-1. speedup = baseline train_s / train_s (speedup_total: with total_s, speedup_cpu:
with train_cpu_s), d_acc / d_acc_ema = final top-1 minus the baseline's, in points; the baseline of
asvit-retokenize is asvit, that of both AutoProg rows is vit. fwd_mmacs: forward multiply-adds per
training image (``models.counting.count_flops`` of each configuration), averaged over the training
steps as they were trained; macs_ratio = the baseline's / the row's. Before the rows, one untimed
two-batch epoch per model family warms the process up. Every epoch record goes to the JSON.

Hyper-parameters: the ``quick`` pipeline preset's (AdamW lr 2e-3, min lr 1e-5, weight decay 0.05,
2 warm-up epochs, label smoothing 0.1, clip 5, drop path 0, random-resized crop scale 0.6-1 + flip)
with --epochs and --batch-size; one EMA with decay 1 - 1 / (2 x steps per epoch) unless
--ema-decay (the paper's 0.9996 at ImageNet's 1250 steps per epoch is a horizon of two epochs; an
EMA with a longer horizon than an AutoProg stage would make MoGrow grow from nearly the initial
weights). amp "auto" on CUDA (bf16), off on the CPU.

AutoProg sizes: at a small --img-size the library's default granularity (multiples of 32) leaves
every stage at the full size, so unless --size-multiple is given the sizes are multiples of the
patch whenever multiples of 32 would not change the size (32 px, patch 4, 4 stages: 16, 20, 28, 32
px at depths 3, 4, 5, 6).

    python bench/progressive.py              # CPU, 1 thread, digits 32x32, 15 epochs: ~10 minutes on 2 cores
    python bench/progressive.py --quick      # a smoke run of a few seconds (prints only; --out DIR writes)
    python bench/progressive.py --device cuda --data ~/data/cifar-10-batches-py --img-size 224
    python bench/progressive.py --rows vit,vit-autoprog,vit-autoprog-search \
        --keep-from bench/results/progressive_cpu1t.json   # re-measure some rows, keep the others

--keep-from JSON: the rows not named in --rows are copied unchanged (every measured value, epoch
record and schedule) from that earlier results file, which must have been run with the same
settings (data, size, epochs, batch size, seed, models); the `measured` column says when each row
was measured, and the notes which rows were kept. Speed-ups and accuracy differences are then
computed between rows of possibly different runs (a kept baseline against a re-measured row):
the `measured` and `load_1m` columns say when and under what load each side ran.

Prints a table and writes bench/results/progressive_<machine>.{json,md,png} (--out: another folder).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from asvit_kernels.models.asvit import AsViT  # noqa: E402
from asvit_kernels.models.counting import count_flops, count_params  # noqa: E402
from asvit_kernels.models.genotype import Genotype  # noqa: E402
from asvit_kernels.pipeline.presets import PRESETS  # noqa: E402
from asvit_kernels.pipeline.run import train_config  # noqa: E402
from asvit_kernels.train import data as data_lib  # noqa: E402
from asvit_kernels.train.autoprog import (AutoProg, config_for_depth, elastic_vit_for_autoprog,  # noqa: E402
                                          manual_sizes)
from asvit_kernels.train.retokenize import Retokenize, parse_stages  # noqa: E402
from asvit_kernels.train.strategy import Strategy  # noqa: E402
from asvit_kernels.train.trainer import TrainConfig, Trainer  # noqa: E402

log = logging.getLogger("bench.progressive")
NAME = "progressive"
GENOTYPE = "8,2,3,2|4,1,2,2|4,1,4,3|4,1,6,2|32,32"
ROWS = ("asvit", "asvit-retokenize", "vit", "vit-autoprog", "vit-autoprog-search")
BASELINE = {"asvit": "asvit", "asvit-retokenize": "asvit", "vit": "vit", "vit-autoprog": "vit",
            "vit-autoprog-search": "vit"}
COLUMNS = ["row", "model", "schedule", "params", "fwd_mmacs", "macs_ratio", "train_s", "total_s", "img_per_s",
           "speedup", "speedup_total", "train_cpu_s", "speedup_cpu", "final_acc", "final_acc_ema", "best_acc", "d_acc",
           "d_acc_ema", "load_1m", "measured"]
QUICK = dict(epochs=4, batch_size=32, train_images=256, val_images=128, vit_embed=48, vit_depth=4, vit_heads=3)


# ------------------------------------------------------------------------------------ models and strategies


def _seeded(seed: int, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """``build()`` under ``torch.manual_seed(seed)``, the global RNG left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def autoprog_size_multiple(args) -> int | None:
    """--size-multiple, else the library default unless that leaves every stage at full size."""
    if args.size_multiple is not None:
        return args.size_multiple
    default = 32 if 32 % args.patch == 0 and args.img % 32 == 0 else args.patch
    sizes = manual_sizes(args.img, args.stages, default)
    return None if len(set(sizes)) > 1 else args.patch


def make_row(key: str, data: data_lib.ImageData, args) -> tuple[torch.nn.Module, Strategy, str]:
    """(model, strategy, schedule text before training) of one row."""
    img, n = args.img, data.num_classes
    if key.startswith("asvit"):
        model = _seeded(args.seed, lambda: AsViT.from_genotype(args.genotype, num_classes=n, img_size=img))
        if key == "asvit":
            return model, Strategy(), "stride 4 dilation 1 throughout"
        strategy = Retokenize(parse_stages(args.retokenize, Genotype.parse(args.genotype).kernels[0], img))
        return model, strategy, "retokenize: " + strategy.schedule_text(args.epochs)
    model = _seeded(args.seed, lambda: elastic_vit_for_autoprog(
        img_size=img, patch_size=args.patch, embed_dim=args.vit_embed, depth=args.vit_depth,
        num_heads=args.vit_heads, num_classes=n))
    if key == "vit":
        return model, Strategy(), f"size {img}, depth {args.vit_depth} throughout"
    search = key == "vit-autoprog-search"
    strategy = AutoProg(max_size=img, max_depth=args.vit_depth, stages=args.stages, search=search,
                        size_multiple=autoprog_size_multiple(args), search_epochs=args.search_epochs)
    return model, strategy, ""  # AutoProg resolves its schedule in on_train_start: described after the run


def autoprog_text(strategy: AutoProg) -> str:
    """The stages AutoProg trained: epochs, size, depth (and the search epochs of searched stages)."""
    chosen = {c["stage"]: c for c in strategy.state_dict()["chosen"]}
    searched = {r["stage"] for r in strategy.searches}
    parts = []
    for k, (a, b) in enumerate(strategy.bounds or []):
        if a == b:
            continue
        c = chosen.get(k)
        what = f"size {c['size']} depth {c['depth']}" if c else "?"
        if k in searched:
            s_end = a + min(strategy.search_epochs, b - a)
            parts.append(f"epochs [{a}, {s_end}) search, [{s_end}, {b}) {what}" if s_end < b
                         else f"epochs [{a}, {b}) search, then {what}")
        else:
            parts.append(f"epochs [{a}, {b}): {what}")
    return ("autoprog search: " if strategy.search else "autoprog manual: ") + "; ".join(parts)


def steps_by_config(key: str, strategy: Strategy, epochs: int, steps_per_epoch: int) -> list[tuple[tuple, int]]:
    """[(configuration, training steps)] as trained: (stride, dilation) for As-ViT, (size, depth) for
    the ViT (a searched stage's search epochs split by the steps each sampled candidate got)."""
    if isinstance(strategy, Retokenize):
        out = [(strategy.stages[strategy.stage_at(e, epochs)], steps_per_epoch) for e in range(epochs)]
        return [((st.stride, st.dilation), n) for st, n in out]
    if not isinstance(strategy, AutoProg):
        return [(None, epochs * steps_per_epoch)]
    chosen = {c["stage"]: c for c in strategy.state_dict()["chosen"]}
    searches = {r["stage"]: r for r in strategy.searches}
    out = []
    for k, (a, b) in enumerate(strategy.bounds):
        if a == b:
            continue
        n_epochs = b - a
        if k in searches:
            out += [((c["size"], c["depth"]), c["steps"]) for c in searches[k]["candidates"] if c["steps"]]
            n_epochs -= min(strategy.search_epochs, b - a)
        if n_epochs:
            out.append(((chosen[k]["size"], chosen[k]["depth"]), n_epochs * steps_per_epoch))
    return out


def mean_forward_macs(model: torch.nn.Module, key: str, strategy: Strategy, img: int, epochs: int,
                      steps_per_epoch: int) -> float:
    """Forward multiply-adds of one training image, averaged over the training steps as trained
    (``models.counting.count_flops`` of each configuration; the model is put back in its final one)."""
    total, steps, cache = 0.0, 0, {}
    for cfg, n in steps_by_config(key, strategy, epochs, steps_per_epoch):
        if cfg not in cache:
            if cfg is None:
                cache[cfg] = count_flops(model, img)
            elif isinstance(strategy, Retokenize):
                model.set_tokenization(*cfg)
                cache[cfg] = count_flops(model, img)
            else:
                model.set_subnet(config_for_depth(model, cfg[1]))
                cache[cfg] = count_flops(model, cfg[0])
        total += cache[cfg] * n
        steps += n
    if isinstance(strategy, Retokenize):
        model.set_tokenization(strategy.stages[-1].stride, strategy.stages[-1].dilation)
    else:
        strategy.prepare_eval(model)
    return total / steps


# ------------------------------------------------------------------------------------ one run


def record_cpu_time(strategy: Strategy) -> Strategy:
    """Make ``strategy`` also note the process CPU seconds of each epoch's training steps: from after
    its ``on_epoch_start`` to before its ``on_epoch_end``, the window of the trainer's epoch
    "seconds" (so MoGrow growth and the search's scoring stay outside, as there). It only reads
    ``time.process_time``; the strategy's behaviour is unchanged. On a shared CPU the process's CPU
    time is not stretched by the time the scheduler gives to other jobs, as the wall-clock is."""
    base = type(strategy)

    class CpuTimed(base):
        def on_epoch_start(self, trainer, epoch):
            super().on_epoch_start(trainer, epoch)
            self._cpu_start = time.process_time()

        def on_epoch_end(self, trainer, epoch):
            self.epoch_cpu_seconds.append(time.process_time() - self._cpu_start)
            super().on_epoch_end(trainer, epoch)

    CpuTimed.__name__ = CpuTimed.__qualname__ = base.__name__
    strategy.__class__ = CpuTimed
    strategy.epoch_cpu_seconds = []
    return strategy


def load() -> float:
    return round(os.getloadavg()[0], 2)


def run_row(key: str, data: data_lib.ImageData, config: TrainConfig, args) -> dict[str, Any]:
    model, strategy, schedule = make_row(key, data, args)
    record_cpu_time(strategy)
    params = count_params(model)
    load_before = load()
    measured = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    t0, c0 = time.perf_counter(), time.process_time()
    trainer = Trainer(model, data, config, strategy=strategy, run_dir=None, device=args.device)
    summary = trainer.fit()
    total, total_cpu = time.perf_counter() - t0, time.process_time() - c0
    load_after = load()
    if summary["status"] != "finished":
        raise RuntimeError(f"{key}: training stopped ({summary['status']})")
    epochs = summary["epochs"]
    gpu = trainer.device.type == "cuda"
    for r, c in zip(epochs, strategy.epoch_cpu_seconds):
        r["cpu_seconds"] = None if gpu else c
    train_s = sum(r["seconds"] for r in epochs)
    images = sum(r["images_per_s"] * r["seconds"] for r in epochs)
    if isinstance(strategy, AutoProg):
        schedule = autoprog_text(strategy)
    macs = mean_forward_macs(model, key, strategy, args.img, config.epochs, trainer.steps_per_epoch)
    row = {"row": key, "model": "As-ViT" if key.startswith("asvit") else "ViT",
           "schedule": {"asvit": "plain", "asvit-retokenize": "retokenize", "vit": "plain",
                        "vit-autoprog": "autoprog manual", "vit-autoprog-search": "autoprog search"}[key],
           "params": params, "fwd_mmacs": macs / 1e6, "train_s": train_s, "total_s": total,
           "train_cpu_s": None if gpu else sum(strategy.epoch_cpu_seconds), "total_cpu_s": None if gpu else total_cpu,
           "img_per_s": images / train_s,
           "final_acc": summary["final_acc"], "final_acc_ema": summary["final_acc_ema"],
           "best_acc": summary["best_acc"], "load_1m": f"{load_before:.2f} -> {load_after:.2f}",
           "measured": measured,
           "loadavg_before": load_before, "loadavg_after": load_after, "schedule_detail": schedule,
           "training_images": round(images), "epoch_records": epochs,
           "events": [r for r in trainer.history if r.get("kind") != "epoch"]}
    if isinstance(strategy, AutoProg):
        row["autoprog"] = {"sizes": strategy.sizes, "depths": strategy.depths, "bounds": strategy.bounds,
                           "size_multiple": strategy.size_multiple, "chosen": strategy.state_dict()["chosen"],
                           "searches": strategy.searches}
    log.info("%s: train %.1f s, total %.1f s, top-1 %.2f (EMA %s) -- %s", key, train_s, total, row["final_acc"],
             "-" if row["final_acc_ema"] is None else f"{row['final_acc_ema']:.2f}", schedule)
    return row


def warm_up(keys: list[str], data: data_lib.ImageData, config: TrainConfig, args) -> float:
    """One untimed epoch of two batches per model family first, so that no row pays the process's
    one-time costs (operator set-up, first allocations). Returns its seconds."""
    t0 = time.perf_counter()
    small = data._replace(train=torch.utils.data.Subset(data.train, range(min(len(data.train), 2 * config.batch_size))),
                          val=torch.utils.data.Subset(data.val, range(min(len(data.val), config.batch_size))))
    cfg = dataclasses.replace(config, epochs=1)
    for family in dict.fromkeys(k.split("-")[0] for k in keys):
        model, _, _ = make_row(family, data, args)
        Trainer(model, small, cfg, run_dir=None, device=args.device).fit()
    return time.perf_counter() - t0


def compare(rows: list[dict]) -> None:
    """speedup and accuracy differences against each row's baseline (when it ran)."""
    by_key = {r["row"]: r for r in rows}
    for r in rows:
        base = by_key.get(BASELINE[r["row"]])
        if base is None:
            r.update(speedup="n/a", speedup_total="n/a", speedup_cpu="n/a", d_acc="n/a", d_acc_ema="n/a",
                     macs_ratio="n/a")
            continue
        r["baseline"] = base["row"]
        r["macs_ratio"] = base["fwd_mmacs"] / r["fwd_mmacs"]
        r["speedup"] = base["train_s"] / r["train_s"]
        r["speedup_total"] = base["total_s"] / r["total_s"]
        r["speedup_cpu"] = None if r["train_cpu_s"] is None else base["train_cpu_s"] / r["train_cpu_s"]
        r["d_acc"] = r["final_acc"] - base["final_acc"]
        r["d_acc_ema"] = (None if r["final_acc_ema"] is None or base["final_acc_ema"] is None
                          else r["final_acc_ema"] - base["final_acc_ema"])


# Settings that must agree between a --keep-from file and this run for its rows to be comparable.
SAME_SETTINGS = ("data", "img_size", "epochs", "batch_size", "seed", "lr", "ema_decay", "genotype", "retokenize",
                 "vit_embed", "vit_depth", "vit_heads", "patch", "stages", "search_epochs", "size_multiple", "quick")


def kept_rows(path: str, keys: list[str], args) -> tuple[list[dict], dict]:
    """The rows of ``path`` (an earlier results JSON) not in ``keys``, unchanged but for a `measured`
    date when the old file has none; and that file's machine record. Refuses differing settings."""
    old = json.loads(Path(path).read_text())
    settings = old["settings"]
    differ = [f"{k}: {settings.get(k)!r} there, {getattr(args, k)!r} here" for k in SAME_SETTINGS
              if settings.get(k) != getattr(args, k)]
    if differ:
        raise SystemExit(f"--keep-from {path}: settings differ ({'; '.join(differ)})")
    rows = []
    for r in old["rows"]:
        if r["row"] in keys:
            continue
        r = {k: v for k, v in r.items() if k not in ("baseline", "macs_ratio", "speedup", "speedup_total",
                                                     "speedup_cpu", "d_acc", "d_acc_ema")}
        r.setdefault("measured", old["machine"]["date"])
        r["kept_from"] = str(path)
        rows.append(r)
    return rows, old["machine"]


# ------------------------------------------------------------------------------------ output


def columns(device: str) -> list[str]:
    """The table's columns (the CPU-time ones only on the CPU)."""
    cpu_only = () if device == "cpu" else ("train_cpu_s", "speedup_cpu")
    return [c for c in COLUMNS if c not in cpu_only]


def markdown_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        m = {k: r.get(k) for k in COLUMNS}
        for k in ("train_s", "total_s", "img_per_s", "fwd_mmacs", "train_cpu_s"):
            m[k] = "" if r[k] is None else f"{r[k]:.1f}"
        for k in ("final_acc", "final_acc_ema", "best_acc"):
            m[k] = "" if r[k] is None else f"{r[k]:.2f}"
        for k in ("speedup", "speedup_total", "speedup_cpu", "macs_ratio"):
            m[k] = r[k] if isinstance(r[k], str) or r[k] is None else f"{r[k]:.2f}x"
        for k in ("d_acc", "d_acc_ema"):
            m[k] = r[k] if isinstance(r[k], str) or r[k] is None else f"{r[k]:+.2f}"
        out.append(m)
    return out


def details(rows: list[dict], info: dict, data: data_lib.ImageData, args) -> list[str]:
    """Markdown sections after the table: schedules, per-epoch seconds and top-1, reading guide."""
    lines = ["", "## Schedules as trained", ""]
    lines += [f"- **{r['row']}**: {r['schedule_detail']}" for r in rows]
    for r in rows:
        for s in (r.get("autoprog") or {}).get("searches", []):
            cands = ", ".join(f"{c['size']}px/d{c['depth']}: "
                              + ("no steps" if c["time"] is None else
                                 f"{c['steps']} steps, {1e3 * c['time']:.0f} ms, loss {c['loss']:.3f}")
                              for c in s["candidates"])
            lines.append(f"  - stage {s['stage']} search (ends epoch {s['epoch']}): w = {s['w']:.3g}, chose "
                         f"{s['size']}px depth {s['depth']}; candidates (median step time, EMA val loss): {cands}")
    n = max(len(r["epoch_records"]) for r in rows)
    head = "| row | " + " | ".join(str(e + 1) for e in range(n)) + " |"
    sep = "|---|" + "---|" * n
    lines += ["", "## Training seconds per epoch (the epoch records' `seconds`)", "", head, sep]
    lines += [f"| {r['row']} | " + " | ".join(f"{e['seconds']:.1f}" for e in r["epoch_records"]) + " |" for r in rows]
    lines += ["", "## Validation top-1 (%) of the model after each epoch", "", head, sep]
    lines += [f"| {r['row']} | " + " | ".join(f"{e['val_acc']:.1f}" for e in r["epoch_records"]) + " |" for r in rows]
    one = 100.0 / len(data.val)
    gpu = info.get("gpu")
    lines += ["", "## What these numbers are and are not", ""]
    if gpu is None:
        lines += [
            f"- Measured on a CPU with {info['threads']} torch thread(s) ({info['cpu_count']} cores, shared with "
            f"other jobs): load average (1 min) {info['loadavg_before'][0]} before the run and "
            f"{info['loadavg_after'][0]} after it, per row in `load_1m`"
            + (f" (rows kept from {info['kept']['from']} ran on {info['kept']['date']} under their own load, "
               f"also in `load_1m`: a kept baseline and a re-measured row were timed under different loads)"
               if info.get("kept") else "")
            + ". Times are the wall-clock of one run per "
            f"row, not medians of several: other jobs on the machine may have slowed some rows more than others, "
            f"and this run does not measure how much times vary from run to run. train_cpu_s (the process's CPU "
            f"seconds over the same training steps, one thread) does not count time the scheduler gave to other "
            f"jobs, so speedup_cpu is less exposed to that; it still includes slowdowns from sharing caches and "
            f"memory bandwidth.",
            "- The issue's target (on a GPU: >= 1.5x less training time at no more than 0.5 points lower "
            "accuracy) is not measured here: this is a CPU run, and no GPU number is given or implied. "
            "fwd_mmacs (forward multiply-adds per training image, averaged over the steps as trained, counted "
            "by `models.counting.count_flops`) does not depend on the device; the time a device takes for "
            "them does, and small token grids and shallow models use a GPU less fully than a CPU.",
        ]
    else:
        lines += [f"- Measured on {gpu} (CUDA {info.get('cuda')}), amp {info['amp']}, one run per row."]
    lines += [
        f"- Data: {data.name}, {len(data.train)} training / {len(data.val)} validation images at "
        f"{args.img}x{args.img} (the data's size {data.image_size}). One validation image is {one:.2f} points of "
        f"top-1, and each row is one seed: accuracy differences of a few points are within run-to-run noise "
        f"and do not show that a schedule costs or gains accuracy. The per-epoch table shows whether a row's "
        f"accuracy was still rising at the end: a gap between runs that have not converged says little about "
        f"the gap after a full-length training.",
        f"- At {args.img}x{args.img} the coarse-token stage saves little: As-ViT's stage-1 stride is capped at "
        f"{max(st.stride for st in parse_stages(args.retokenize, Genotype.parse(args.genotype).kernels[0], args.img))}"
        f" so that three merges still fit (the paper's 16 needs 224 px), and its later stages are "
        f"already 4x4 tokens or fewer; the re-tokenization speed-up grows with the token grid (--img-size on a GPU).",
        "- AutoProg's search picks each stage's (size, depth) from step times it measures while training, "
        "so on a loaded machine its choices (and then its accuracy) can differ from run to run; AutoProg "
        "trains the last stage at the full size and depth, searched or not.",
        "- train_s counts the training steps only; total_s adds the per-epoch evaluation of the model and its EMA "
        "and, for AutoProg, MoGrow growth and the search's candidate scoring. No number here is estimated or "
        "extrapolated: every time and accuracy was measured (in this run, or for kept rows in the run the notes "
        "name), and fwd_mmacs counted.",
    ]
    return lines


def publish(rows: list[dict], info: dict, data: data_lib.ImageData, config: TrainConfig, args) -> None:
    if args.out:
        harness.RESULTS = Path(args.out).resolve()
    cfg = config.to_dict()
    cpu_text = ("train_cpu_s = process CPU seconds of the same training steps, speedup_cpu = baseline train_cpu_s / "
                "train_cpu_s; " if info["device"] == "cpu" else "")
    notes = (f"{data.name} {args.img}x{args.img}, {len(data.train)} train / {len(data.val)} val images, "
             f"{config.epochs} epochs, batch {config.batch_size}, seed {config.seed}, AdamW lr {config.lr:g} "
             f"(warm-up {config.warmup_epochs:g} epochs, cosine to {config.min_lr:g}), EMA decay "
             f"{config.ema_decays[-1]:g}, amp {info['amp']}, {info['threads']} thread(s); As-ViT {args.genotype}, "
             f"ViT embed {args.vit_embed} depth {args.vit_depth} heads {args.vit_heads} patch {args.patch}; "
             f"AutoProg {args.stages} stages (search: {args.search_epochs} search epoch(s) per stage). "
             f"train_s = sum of the epoch records' seconds (training steps only); total_s = Trainer + fit() "
             f"wall-clock (with evaluation and the strategies' between-epoch work); img_per_s = training images / "
             f"train_s; fwd_mmacs = forward MMACs per training image averaged over the steps as trained "
             f"(models.counting.count_flops), macs_ratio = baseline fwd_mmacs / fwd_mmacs; "
             f"{cpu_text}"
             f"final_acc / final_acc_ema / best_acc = validation top-1 (%) of the model / EMA after the "
             f"last epoch / best epoch; speedup = baseline train_s / train_s and d_acc = final_acc - baseline "
             f"final_acc (points; baseline: asvit for asvit-retokenize, vit for the AutoProg rows); load_1m = "
             f"1-minute load average before -> after the row; measured = when the row was measured (UTC). "
             f"Total {info['wall_s']:.0f} s wall.")
    if info.get("kept"):
        k = info["kept"]
        notes += (f" Re-measured in this run ({info['date']}, load average {info['loadavg_before'][0]} before -> "
                  f"{info['loadavg_after'][0]} after; the total above is this run's): {', '.join(info['rows_run'])}. "
                  f"Kept unchanged from {k['from']} (measured {k['date']}, load average {k['loadavg_before'][0]} "
                  f"-> {k['loadavg_after'][0]}): {', '.join(k['rows'])}.")
    if args.note:
        notes += " " + args.note
    json_path, md_path = harness.write(NAME, info, markdown_rows(rows), columns(info["device"]), notes)
    json_path.write_text(json.dumps({"machine": info, "settings": {**vars(args), "train_config": cfg},
                                     "rows": rows, "notes": notes}, indent=2, default=str))
    with md_path.open("a") as f:
        f.write("\n".join(details(rows, info, data, args)) + "\n")
    png = harness.plot_bars(NAME, info, rows, "model", "schedule", ["train_s", "total_s", "final_acc",
                                                                     "final_acc_ema"])
    print("wrote", json_path, md_path, png or "(no PNG: matplotlib is not installed)")


# ------------------------------------------------------------------------------------ main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default 1 on the CPU: the machine is shared; on CUDA torch's default)")
    ap.add_argument("--data", default=None, help="dataset directory (CIFAR pickles or ImageFolder); default: the "
                    "bundled digits at 32x32")
    ap.add_argument("--img-size", type=int, default=None,
                    help="train and evaluate at this size (the dataset resized once in memory; e.g. 224 on CIFAR on a "
                         "GPU); default: the data's size")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=None, help="default 64 on the CPU, 128 on CUDA")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the quick preset's 2e-3)")
    ap.add_argument("--ema-decay", type=float, default=None,
                    help="EMA decay (default 1 - 1 / (2 x steps per epoch): a two-epoch horizon)")
    ap.add_argument("--genotype", default=GENOTYPE, help=f"As-ViT genotype (default {GENOTYPE})")
    ap.add_argument("--retokenize", default="paper", help="Retokenize schedule (parse_stages text; default paper)")
    ap.add_argument("--vit-embed", type=int, default=96)
    ap.add_argument("--vit-depth", type=int, default=6)
    ap.add_argument("--vit-heads", type=int, default=3)
    ap.add_argument("--patch", type=int, default=None, help="ViT patch size (default 4 up to 64 px, else 16)")
    ap.add_argument("--stages", type=int, default=4, help="AutoProg stages K")
    ap.add_argument("--search-epochs", type=int, default=1, help="AutoProg search epochs per stage")
    ap.add_argument("--size-multiple", type=int, default=None, help="AutoProg size granularity (module doc)")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run of a few seconds (small models, 256 training images, 4 epochs); prints only "
                         "unless --out is given")
    ap.add_argument("--keep-from", default=None, metavar="JSON",
                    help="an earlier results file: rows not in --rows are copied from it (module doc)")
    ap.add_argument("--note", default="", help="a sentence appended to the results' notes (e.g. why rows were kept)")
    ap.add_argument("--out", default=None, help="results folder (default bench/results)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    keys = args.rows.split(",")
    if unknown := set(keys) - set(ROWS):
        ap.error(f"unknown rows {sorted(unknown)}; choose from {', '.join(ROWS)}")
    gpu = args.device.startswith("cuda")
    if args.threads is not None or not gpu:
        torch.set_num_threads(args.threads or 1)
    if args.quick:
        for k in ("epochs", "vit_embed", "vit_depth", "vit_heads"):
            if ap.get_default(k) == getattr(args, k):
                setattr(args, k, QUICK[k])
    args.batch_size = args.batch_size or (QUICK["batch_size"] if args.quick else 128 if gpu else 64)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    load_before = [round(v, 2) for v in os.getloadavg()]

    data = data_lib.open_dataset(args.data, image_size=args.img_size, seed=args.seed)
    if args.quick:
        data = data._replace(train=torch.utils.data.Subset(data.train, range(min(len(data.train),
                                                                                  QUICK["train_images"]))),
                             val=torch.utils.data.Subset(data.val, range(min(len(data.val), QUICK["val_images"]))))
    args.img = data.image_size
    args.patch = args.patch or (4 if args.img <= 64 else 16)
    steps_per_epoch = data_lib.num_batches(len(data.train), batch_size=args.batch_size, drop_last=True)
    ema = args.ema_decay if args.ema_decay is not None else round(1 - 1 / (2 * steps_per_epoch), 4)
    config = train_config(PRESETS["quick"], seed=args.seed, epochs=args.epochs, batch_size=args.batch_size,
                          lr=args.lr, ema_decays=(ema,), amp="auto" if gpu else "off", progress=False)

    kept, kept_machine = kept_rows(args.keep_from, keys, args) if args.keep_from else ([], None)
    warm_s = warm_up(keys, data, config, args)
    rows = []
    for key in keys:
        rows.append(run_row(key, data, config, args))
    rows = sorted(rows + kept, key=lambda r: ROWS.index(r["row"]))
    compare(rows)
    elapsed = time.perf_counter() - start

    info = harness.machine(args.device)
    info.update(amp=("bf16/fp16 (auto)" if gpu else "off"), cpu_count=os.cpu_count(), data=data.name,
                img=args.img, train_images=len(data.train), val_images=len(data.val), epochs=config.epochs,
                batch_size=config.batch_size, steps_per_epoch=steps_per_epoch, ema_decay=ema,
                warm_up_s=round(warm_s, 1),
                command="python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                wall_s=round(elapsed, 1), loadavg_before=load_before,
                loadavg_after=[round(v, 2) for v in os.getloadavg()], rows_run=keys)
    if kept:
        info["kept"] = {"from": args.keep_from, "rows": [r["row"] for r in kept], "date": kept_machine["date"],
                        "loadavg_before": kept_machine["loadavg_before"],
                        "loadavg_after": kept_machine["loadavg_after"], "command": kept_machine.get("command")}
    print("\n" + harness.table(markdown_rows(rows), columns(info["device"])))
    print(f"total {elapsed:.0f} s")
    if args.no_write or (args.quick and not args.out):
        return
    publish(rows, info, data, config, args)


if __name__ == "__main__":
    main()
