"""The common training loop every schedule runs on (As-ViT re-tokenization, AutoProg, ViTAS).

One ``Trainer`` = one model, one dataset (``train.data.ImageData``), one ``TrainConfig`` and one
``Strategy`` (what changes over training: tokenization, depth and input size, the sub-network).

Per step: the strategy picks this step's configuration (``before_step``), the uint8 batch goes to
the device and is augmented there (random-resized crop + flip, ``data.augment``, from a generator
seeded by (seed, epoch, step)), resized to the strategy's input size, forward under autocast
(bf16, or fp16 with a grad scaler, on CUDA; off on CPU), label-smoothed cross-entropy, backward,
gradient clipping, AdamW with a per-step learning rate (linear warmup, then cosine to ``min_lr``),
then every EMA copy is updated. Each epoch ends with an evaluation of the model and of the slowest
EMA on the validation split (at the data's own size), one JSONL metrics record, and a checkpoint.

Resuming (``fit(resume=True)`` on a run directory with a checkpoint) restores the weights, EMAs,
optimizer moments, grad scaler, every rank's RNG state, the strategy's state and the position in
the epoch; the data order and augmentation depend only on (seed, epoch, step), so on CPU a resumed
run is bit-for-bit the uninterrupted one. SIGTERM (what torchrun and cluster schedulers send) or
SIGINT (Ctrl-C) finishes the current step, writes a checkpoint and returns ``status="interrupted"``
(``signal`` says which; a second Ctrl-C raises KeyboardInterrupt at once, the last checkpoint kept).

Every checkpoint file's SHA-256 is recorded in its ``state.json`` and verified on resume; a
damaged checkpoint (or one whose weights are not finite) is moved aside with a warning naming the
file, and the previous one is resumed; with none left, ``DamagedCheckpoint`` (a ValueError) names
the file.

A non-finite loss stops the run with ``NonFiniteLossError`` before any checkpoint is written from
the diverged weights: the last good checkpoint stays the committed one. Losses are checked every
``log_every`` steps and before every checkpoint (a per-step check would sync the GPU every step).

Distributed: under torchrun (``search.distributed.init_from_env()`` first) the model is wrapped in
``DistributedDataParallel``; each rank reads its shard of every epoch's permutation; rank 0 writes
files. ``batch_size`` is per process.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from asvit_kernels import atomic
from asvit_kernels.progress import Progress
from asvit_kernels.search import distributed

from . import checkpoint as ckpt
from . import data as data_lib
from .ema import EmaModel
from .strategy import Strategy

__all__ = ["TrainConfig", "Trainer", "NonFiniteLossError", "AMP_MODES", "lr_at", "adamw", "describe_differences"]

log = logging.getLogger(__name__)
AMP_MODES = ("auto", "bf16", "fp16", "off")
MODEL_FILE, STATE_FILE = "model.safetensors", "state.safetensors"
_STATE_KEYS = ("epoch", "step", "step_in_epoch", "optimizer", "scaler", "records", "epoch_loss", "history",
               "strategy", "settings")


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the last good checkpoint was kept."""


@dataclass
class TrainConfig:
    """Hyper-parameters of the common loop (``batch_size`` per process, ``lr`` the peak).

    ``warmup_epochs`` may be fractional. ``ema_decays``: one EMA copy per decay, kept sorted so the
    slowest is last (AutoProg's MoGrow source; also the EMA that is evaluated). ``drop_path``: the
    rate of the last block, times the strategy's per-stage scale. ``amp``: "auto" = bf16 on CUDA
    devices that have it, else fp16, and off on CPU. ``eval_batches``: cap on validation batches
    (None: all). ``checkpoint_every``: also checkpoint every that many steps (0: per epoch only).
    ``augment``: GPU-side random-resized crop + flip (off: only normalisation).
    """

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    clip_grad: Optional[float] = 5.0
    amp: str = "auto"
    ema_decays: tuple[float, ...] = (0.9996,)
    drop_path: float = 0.1
    seed: int = 0
    num_workers: int = 2
    log_every: int = 20
    eval_batches: Optional[int] = None
    eval_batch_size: Optional[int] = None
    checkpoint_every: int = 0
    augment: bool = True
    crop_scale: tuple[float, float] = (0.35, 1.0)
    tensorboard: bool = False
    progress: Optional[bool] = None

    def __post_init__(self):
        def pos_int(name, low=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")

        def number(name, low, high=math.inf, *, low_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not (
                    (low < v if low_open else low <= v) and v <= high):
                bounds = f"{'(' if low_open else '['}{low}, {high}{']' if math.isfinite(high) else ')'}"
                raise ValueError(f"{name} must be a finite number in {bounds}, got {v!r}")

        pos_int("epochs")
        pos_int("batch_size")
        pos_int("num_workers", 0)
        pos_int("log_every")
        pos_int("checkpoint_every", 0)
        pos_int("seed", 0)
        number("lr", 0.0, low_open=True)
        number("min_lr", 0.0)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr:g}) must not exceed lr ({self.lr:g}): the cosine decays from "
                             f"lr to min_lr")
        number("weight_decay", 0.0)
        number("warmup_epochs", 0.0)
        number("label_smoothing", 0.0, 1.0)
        number("drop_path", 0.0, 0.99)
        if self.clip_grad is not None:
            number("clip_grad", 0.0, low_open=True)
        for name in ("eval_batches", "eval_batch_size"):
            if getattr(self, name) is not None:
                pos_int(name)
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        decays = tuple(float(d) for d in self.ema_decays)
        if any(not 0.0 <= d < 1.0 for d in decays):
            raise ValueError(f"ema_decays must be in [0, 1), got {self.ema_decays!r}")
        self.ema_decays = tuple(sorted(decays))
        lo, hi = (float(v) for v in self.crop_scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"crop_scale must be (low, high) with 0 < low <= high <= 1, got {self.crop_scale!r}")
        self.crop_scale = (lo, hi)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))


def lr_at(step: int, total_steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warmup from lr/warmup_steps to ``lr``, then cosine from ``lr`` to ``min_lr``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    t = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * min(1.0, t)))


def adamw(groups: list[dict[str, Any]], lr: float) -> torch.optim.AdamW:
    """AdamW over parameter ``groups``, fused (one kernel for all parameters) where torch has it:
    floating-point weights on CPU or CUDA. On CPU the default per-parameter loop took 34 ms per
    step of the quick preset's 4.3M-parameter member, the fused one 9 ms (1 thread); they agree to
    float rounding."""
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None)


def _clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> None:
    """``nn.utils.clip_grad_norm_``, without its multiplication by exactly 1.0 when the norm is
    within ``max_norm`` on CPU, where asking is free (~2 ms of a quick-preset step's 4.3M gradients,
    1 thread); on other devices the test would sync every step."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    if grads[0].device.type != "cpu":
        nn.utils.clip_grad_norm_(params, max_norm)
        return
    total = nn.utils.get_total_norm(grads, 2.0)
    if not bool(max_norm / (total + 1e-6) >= 1.0):  # NaN clips, as in torch: every gradient becomes NaN
        nn.utils.clip_grads_with_norm_(params, max_norm, total)


def _mix(*parts: int) -> int:
    """A 63-bit seed from small ints (per-step generators: the same on every rank)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (1 << 63)
    return h


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _StopFlag:
    """Set by SIGTERM or SIGINT while installed (main thread only); the loop stops after the
    current step and checkpoints. A second SIGINT raises KeyboardInterrupt at once (the user
    insists; the previous checkpoint stays committed, files are written atomically)."""

    def __init__(self):
        self.set = False
        self.signal: Optional[str] = None
        self._old: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def _handle(self, signum, frame):
        if self.set and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.set, self.signal = True, signal.Signals(signum).name
        log.warning("%s: finishing the current step, then checkpointing and stopping", self.signal)

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


class Trainer:
    """Train ``model`` on ``data`` under ``strategy`` (default: plain training).

    Args:
        model: built as at the start of training (same parameter shapes as every checkpoint of
            this run). Moved to ``device``.
        data: ``train.data.ImageData`` (uint8 datasets, classes, normalisation stats).
        config: ``TrainConfig``.
        strategy: a ``train.strategy.Strategy`` (``Retokenize``, ``AutoProg``, ``SupernetTraining``).
        run_dir: where checkpoints, ``metrics.jsonl``, ``train.json`` and the final weights go
            (None: nothing is written and there is no resume).
        device: default ``search.distributed.device()`` (this rank's GPU, else CPU).
    """

    def __init__(self, model: nn.Module, data: "data_lib.ImageData", config: TrainConfig, *,
                 strategy: Optional[Strategy] = None, run_dir: Optional[atomic.PathLike] = None,
                 device: Optional[torch.device | str] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if strategy is not None and not isinstance(strategy, Strategy):
            raise TypeError(f"strategy must be a train.strategy.Strategy, got {type(strategy).__name__}")
        for name in ("train", "val", "num_classes", "mean", "std"):
            if not hasattr(data, name):
                raise TypeError(f"data must be a train.data.ImageData (missing {name!r})")
        if len(data.train) == 0 or len(data.val) == 0:
            raise ValueError(f"data {getattr(data, 'name', '')!r} has an empty train or val split")
        self.config, self.data = config, data
        self.strategy = strategy if strategy is not None else Strategy()
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.device = distributed.device() if device is None else torch.device(device)
        self.rank, self.world = distributed.rank(), distributed.world_size()
        self.model = model.to(self.device)
        self.steps_per_epoch = data_lib.num_batches(len(data.train), batch_size=config.batch_size, world=self.world,
                                                    drop_last=True)
        if self.steps_per_epoch < 1:
            raise ValueError(f"batch_size={config.batch_size} x {self.world} process(es) is larger than the "
                             f"{len(data.train)} training images: not one full batch per epoch")
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup_steps = round(config.warmup_epochs * self.steps_per_epoch)
        self.epoch, self.step, self.step_in_epoch = 0, 0, 0
        self.emas = [EmaModel(self.model, d) for d in config.ema_decays]
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.optimizer = self._new_optimizer()
        self.ddp: Optional[nn.Module] = None
        self.history: list[dict[str, Any]] = []
        self._records = 0
        self._tb = None
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self._loss_n = 0
        self._epoch_loss, self._epoch_n = 0.0, 0  # this epoch's loss so far (kept across a resume)

    # ------------------------------------------------------------------ for strategies

    def reset_optimizer(self) -> None:
        """A fresh AdamW state (AutoProg: per stage); the learning-rate schedule keeps its place."""
        self.optimizer = self._new_optimizer()

    def resize(self, images: torch.Tensor, size: Optional[int]) -> torch.Tensor:
        return images if size is None else data_lib.resize(images, size)

    def val_batches(self, limit: Optional[int] = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's validation batches: normalised float images at the data's size, labels (on device)."""
        subset = torch.utils.data.Subset(self.data.val, range(self.rank, len(self.data.val), self.world))
        bs = self.config.eval_batch_size or self.config.batch_size
        it = data_lib.batches(subset, batch_size=bs, shuffle=False, seed=0, epoch=0, drop_last=False,
                              num_workers=self.config.num_workers)
        for i, (x, y) in enumerate(it):
            if limit is not None and i >= limit:
                break
            x = x.to(self.device, non_blocking=True)
            yield data_lib.to_float(x, self.data.mean, self.data.std), y.to(self.device, non_blocking=True)

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one metrics record to ``metrics.jsonl`` (rank 0); ``epoch`` and ``step`` are
        stamped with the current ones unless the record has them."""
        rec = {"epoch": self.epoch, "step": self.step, **record}
        self.history.append(rec)
        self._records += 1
        if self.run_dir is not None and distributed.is_main():
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(rec, default=_json_default) + "\n")
            if self._tb is not None:
                for k, v in rec.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch", "step"):
                        self._tb.add_scalar(k, v, self.step)

    # ------------------------------------------------------------------ the loop

    def fit(self, *, resume: bool = True, max_epochs_this_call: Optional[int] = None,
            on_epoch: Optional[Callable[[list], None]] = None) -> dict[str, Any]:
        """Train to ``config.epochs`` (or ``max_epochs_this_call`` more epochs). Returns a summary:
        status ("finished" | "interrupted" | "paused"), signal (the stopping signal's name, e.g.
        "SIGINT", when this process received it), epoch, step, final and best top-1 (%) of
        the model and the slowest EMA, seconds, and the per-epoch records. ``on_epoch(records)``
        is called on rank 0 after each epoch's checkpoint with every epoch record so far (e.g. to
        rewrite a report as the run goes)."""
        cfg = self.config
        resumed = False
        if self.run_dir is not None:
            if distributed.is_main():
                self.run_dir.mkdir(parents=True, exist_ok=True)
            distributed.barrier()
            resumed = resume and self._load()
            if not resumed:
                self._check_fresh()
            self._write_run_info()
            self._open_tensorboard()
        if not resumed and self.step == 0:
            torch.manual_seed(_mix(cfg.seed, 7919, self.rank))  # drop path draws: per rank, reproducible
        self._wrap_ddp()
        self.strategy.on_train_start(self, resumed=resumed)
        end = cfg.epochs if max_epochs_this_call is None else min(cfg.epochs, self.epoch + max_epochs_this_call)
        status, t_start = "finished", time.perf_counter()
        with _StopFlag() as stop, Progress(total=cfg.epochs, initial=self.epoch, desc="train", unit="epoch",
                                           progress=cfg.progress) as epochs:
            while self.epoch < end:
                if not self._train_epoch(stop):
                    status = "interrupted"
                    break
                last = next(r for r in reversed(self.history) if r.get("kind") == "epoch")
                epochs.set_postfix(val=f"{last['val_acc']:.2f}%", **(
                    {} if last["val_acc_ema"] is None else {"ema": f"{last['val_acc_ema']:.2f}%"}))
                epochs.update(1)
                if on_epoch is not None and distributed.is_main():
                    on_epoch([r for r in self.history if r.get("kind") == "epoch"])
        if status == "finished" and self.epoch < cfg.epochs:
            status = "paused"
        if status == "finished" and self.run_dir is not None and distributed.is_main():
            self._write_final_weights()
        if self._tb is not None:
            self._tb.close()
        evals = [r for r in self.history if r.get("kind") == "epoch"]
        best = max((r["val_acc"] for r in evals), default=None)
        last = evals[-1] if evals else {}
        return {"status": status, "signal": stop.signal, "epoch": self.epoch, "step": self.step,
                "final_acc": last.get("val_acc"),
                "final_acc_ema": last.get("val_acc_ema"), "best_acc": best,
                "seconds_this_call": time.perf_counter() - t_start, "epochs": evals,
                "strategy": self.strategy.describe()}

    def _train_epoch(self, sigterm: _StopFlag) -> bool:
        """One epoch (or its rest after a resume); False when stopped by SIGTERM or SIGINT."""
        cfg, epoch = self.config, self.epoch
        self.strategy.on_epoch_start(self, epoch)
        rate = cfg.drop_path * self.strategy.drop_path_scale(epoch, cfg.epochs)
        if hasattr(self.model, "set_drop_path"):
            self.model.set_drop_path(rate)
        self.model.train()
        net = self.ddp if self.ddp is not None else self.model
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
        start = self.step_in_epoch
        it = data_lib.batches(self.data.train, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed, epoch=epoch,
                              rank=self.rank, world=self.world, drop_last=True, skip=start,
                              num_workers=cfg.num_workers)
        bar = Progress(total=self.steps_per_epoch, initial=start, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                       progress=cfg.progress, leave=False)
        t0, images_seen = time.perf_counter(), 0
        if start == 0:
            self._epoch_loss, self._epoch_n = 0.0, 0
        for x, y in it:
            k = self.step_in_epoch
            gen = torch.Generator().manual_seed(_mix(cfg.seed, epoch, k, 1))
            size = self.strategy.before_step(self, epoch, k, gen)
            size = self.strategy.input_size() if size is None else size
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            if cfg.augment:
                aug = torch.Generator(self.device).manual_seed(_mix(cfg.seed, epoch, k, 2, self.rank))
                x = data_lib.augment(x, aug, mean=self.data.mean, std=self.data.std, out_size=size,
                                     scale=cfg.crop_scale)
            else:
                x = self.resize(data_lib.to_float(x, self.data.mean, self.data.std), size)
            loss = self._step(net, criterion, x, y)
            self._loss_sum += loss.detach().double()
            self._loss_n += 1
            images_seen += x.shape[0]
            self.step += 1
            self.step_in_epoch += 1
            synced = self.step_in_epoch % cfg.log_every == 0
            value = float("nan")
            if synced:
                value = mean = self._sync_loss()
                rate_now = images_seen / max(1e-9, time.perf_counter() - t0)
                bar.set_postfix(loss=f"{mean:.4f}", img_s=f"{rate_now:.0f}",
                                eta=_eta(self, rate_now))
            self.strategy.after_step(self, epoch, k, value)
            bar.update(1)
            if self._stop_requested(sigterm):
                bar.close()
                self._sync_loss()
                self._save()
                return False
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 \
                    and self.step_in_epoch < self.steps_per_epoch:
                self._sync_loss()
                self._save()
        bar.close()
        self._sync_loss()
        seconds = time.perf_counter() - t0
        self.strategy.on_epoch_end(self, epoch)
        record = {"kind": "epoch", "epoch": epoch, "train_loss": self._epoch_loss / max(1, self._epoch_n), **self._evaluate(),
                  "lr": self.optimizer.param_groups[0]["lr"], "drop_path": rate, "seconds": seconds,
                  "images_per_s": images_seen * self.world / max(seconds, 1e-9),
                  "stage": _stage_text(self.strategy.describe())}
        if not math.isfinite(record["val_loss"]):  # the last step's update can break weights a finite loss missed
            raise NonFiniteLossError(f"validation loss became {record['val_loss']} after epoch {epoch + 1}: stopping. "
                                     f"{latest_text(self.run_dir)}")
        self.epoch, self.step_in_epoch = epoch + 1, 0
        self.log(record)
        log.debug("epoch %d/%d: train loss %.4f, val top-1 %.2f%% (EMA %s), %.0f img/s", epoch + 1, cfg.epochs,
                 record["train_loss"], record["val_acc"],
                 "-" if record["val_acc_ema"] is None else f"{record['val_acc_ema']:.2f}%", record["images_per_s"])
        self._save()
        return True

    def _step(self, net: nn.Module, criterion: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        lr = lr_at(self.step, self.total_steps, self.warmup_steps, cfg.lr, cfg.min_lr)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                            enabled=self.amp_dtype is not None):
            loss = criterion(net(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            _clip_grad_norm(list(self.model.parameters()), cfg.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        for e in self.emas:
            e.update(self.model)
        return loss

    def _sync_loss(self) -> float:
        """Check the loss since the last sync (``_check_loss``) and add it to the epoch's total."""
        if not self._loss_n:
            return float("nan")
        mean = self._check_loss()
        self._epoch_loss += mean * self._loss_n
        self._epoch_n += self._loss_n
        self._loss_sum.zero_()
        self._loss_n = 0
        return mean

    def _check_loss(self) -> float:
        """Mean loss since the last check (over ranks); NonFiniteLossError when it is not finite."""
        total = torch.stack([self._loss_sum, torch.tensor(float(self._loss_n), dtype=torch.float64,
                                                          device=self.device)])
        if self.world > 1:
            dist.all_reduce(total)
        mean = (total[0] / total[1].clamp_min(1)).item()
        if not math.isfinite(mean):
            where = latest_text(self.run_dir)
            raise NonFiniteLossError(
                f"training loss became {mean} in epoch {self.epoch + 1}, before step {self.step}: stopping. "
                f"{where} Lower the learning rate ({self.config.lr:g}), enable clipping (clip_grad) or turn "
                f"off fp16 (amp='bf16' or 'off').")
        return mean

    def _stop_requested(self, sigterm: _StopFlag) -> bool:
        if self.world == 1:  # no device tensor, no sync: this runs every step
            return sigterm.set
        flag = torch.tensor([1.0 if sigterm.set else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank must stop at the same step
        return bool(flag.item())

    @torch.no_grad()
    def _evaluate(self) -> dict[str, Any]:
        out = {}
        targets = [("", self.model)] + ([("_ema", self.emas[-1].module)] if self.emas else [])
        for suffix, module in targets:
            self.strategy.prepare_eval(module)
            was_training = module.training
            module.eval()
            stats = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss sum, correct, count
            for x, y in self.val_batches(self.config.eval_batches):
                with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                    enabled=self.amp_dtype is not None):
                    logits = module(x)
                stats[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
                stats[1] += (logits.argmax(-1) == y).sum()
                stats[2] += y.numel()
            if self.world > 1:
                dist.all_reduce(stats)
            module.train(was_training)
            n = max(1.0, stats[2].item())
            out[f"val_loss{suffix}"] = stats[0].item() / n
            out[f"val_acc{suffix}"] = 100.0 * stats[1].item() / n
        out.setdefault("val_acc_ema", None)
        out.setdefault("val_loss_ema", None)
        return out

    # ------------------------------------------------------------------ set-up helpers

    def _amp_dtype(self) -> Optional[torch.dtype]:
        mode = self.config.amp
        if mode == "off" or (mode == "auto" and self.device.type != "cuda"):
            return None
        if self.device.type != "cuda":
            raise ValueError(f"amp={mode!r} needs a CUDA device (this run is on {self.device}); use amp='off'")
        if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
            return torch.bfloat16
        return torch.float16

    def _new_optimizer(self) -> torch.optim.Optimizer:
        skip = set(getattr(self.model, "no_weight_decay", lambda: set())())
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name in skip or name.split(".")[0] in skip else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.config.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return adamw(groups, lr=self.config.lr)

    def _wrap_ddp(self) -> None:
        if self.world > 1 and self.ddp is None:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=ids, find_unused_parameters=self.strategy.find_unused_parameters)

    def _open_tensorboard(self) -> None:
        if not self.config.tensorboard or not distributed.is_main() or self._tb is not None:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError("tensorboard=True needs the tensorboard package (pip install tensorboard)") from e
        self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    def _settings(self) -> dict[str, Any]:
        cfg = self.config.to_dict()
        for k in ("progress", "num_workers", "tensorboard", "eval_batch_size"):
            cfg.pop(k)  # may differ on resume without changing the run
        shapes = {k: list(v.shape) for k, v in self.model.state_dict().items()}
        return {"config": cfg, "strategy": self.strategy.name, "world_size": self.world, "data": self.data.name,
                "model": type(self.model).__name__, "parameters": shapes}

    def _write_run_info(self) -> None:
        if distributed.is_main():
            atomic.write_json(self.run_dir / "train.json", {**self._settings(), "steps_per_epoch": self.steps_per_epoch})

    def _check_fresh(self) -> None:
        if distributed.is_main():
            metrics = self.run_dir / "metrics.jsonl"
            if metrics.exists():
                metrics.unlink()  # a fresh run (resume=False, or no checkpoint) starts its log over
            # ... and must never be resumed into the discarded run's checkpoints or final weights.
            shutil.rmtree(ckpt.checkpoint_dir(self.run_dir), ignore_errors=True)
            for name in ("model.safetensors", "model_ema.safetensors"):
                (self.run_dir / name).unlink(missing_ok=True)
        distributed.barrier()

    # ------------------------------------------------------------------ checkpoints

    def _save(self) -> None:
        if self.run_dir is None:
            return
        name = ckpt.tag(self.epoch, self.step)
        path = ckpt.checkpoint_dir(self.run_dir) / name
        rng_file = _rng_file(self.rank)
        sums = self._gather_checksums({rng_file: ckpt.write_tensors(path / rng_file, _rng_state(self.device))})
        if distributed.is_main():
            optim_tensors, optim_meta = ckpt.flatten_optimizer(self.optimizer.state_dict())
            tensors = dict(optim_tensors)
            for i, e in enumerate(self.emas):
                tensors.update({f"ema.{i}.{k}": v for k, v in e.state_dict().items()})
            sums[MODEL_FILE] = ckpt.write_tensors(path / MODEL_FILE, self.model.state_dict())
            sums[STATE_FILE] = ckpt.write_tensors(path / STATE_FILE, tensors)
            ckpt.write_state(path / ckpt.STATE, {
                "epoch": self.epoch, "step": self.step, "step_in_epoch": self.step_in_epoch,
                "optimizer": optim_meta, "scaler": self.scaler.state_dict(), "records": self._records,
                "epoch_loss": [self._epoch_loss, self._epoch_n],
                "history": self.history, "strategy": self.strategy.state_dict(), "settings": self._settings(),
                "ema_decays": [e.decay for e in self.emas]}, sums)
        distributed.barrier()
        if distributed.is_main():
            ckpt.commit(self.run_dir, name)
        distributed.barrier()

    def _gather_checksums(self, mine: dict[str, str]) -> dict[str, str]:
        """Every rank's file checksums, merged (rank 0 records them in state.json)."""
        if self.world == 1:
            return dict(mine)
        parts: list = [None] * self.world
        dist.all_gather_object(parts, mine)
        return {k: v for part in parts for k, v in part.items()}

    def _any_rank(self, flag: bool) -> bool:
        if self.world == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def _read_checkpoint(self, path: Path) -> tuple[dict, dict, dict, dict]:
        """(state, model tensors, state tensors, this rank's RNG tensors or {}), every file checked
        against its recorded SHA-256 and the weights checked finite; DamagedCheckpoint otherwise."""
        rng_file = _rng_file(self.rank)
        state = ckpt.read_state(path, (MODEL_FILE, STATE_FILE), keys=_STATE_KEYS)
        sums = state["checksums"]
        model = ckpt.read_tensors(path / MODEL_FILE, sums[MODEL_FILE])
        tensors = ckpt.read_tensors(path / STATE_FILE, sums[STATE_FILE])
        for file, group in ((MODEL_FILE, model), (STATE_FILE, tensors)):
            bad = next((k for k, v in group.items() if v.is_floating_point() and not bool(v.isfinite().all())), None)
            if bad is not None:
                raise ckpt.DamagedCheckpoint(f"{path / file} is damaged: tensor {bad!r} holds NaN or inf "
                                             f"(training never checkpoints non-finite weights)")
        rng = ckpt.read_tensors(path / rng_file, sums[rng_file]) if rng_file in sums else {}
        return state, model, tensors, rng

    def _load(self) -> bool:
        """Resume from the newest good checkpoint (older ones after a damaged one); False when
        there is none to resume."""
        candidates = ckpt.candidates(self.run_dir)
        if not candidates:
            return False
        damaged = []
        for path in candidates:
            try:
                loaded, error = self._read_checkpoint(path), None
            except ckpt.DamagedCheckpoint as e:
                loaded, error = None, e
            if not self._any_rank(error is not None):  # every rank resumes from the same checkpoint
                break
            if error is not None:
                log.warning("checkpoint %s is damaged (%s): falling back to the previous one", path.name, error)
            damaged.append(path.name)
            last_error = error
        else:
            raise ckpt.DamagedCheckpoint(f"{last_error or 'a checkpoint is damaged on another rank'}; no earlier "
                                         f"good checkpoint is left in {ckpt.checkpoint_dir(self.run_dir)} (start "
                                         f"over with resume=False / --no-resume)")
        if damaged and distributed.is_main():
            ckpt.fall_back(self.run_dir, path.name, damaged)
            log.warning("resuming from %s; damaged checkpoint(s) moved aside: %s", path,
                        ", ".join(f"{d}{ckpt.DAMAGED_SUFFIX}" for d in damaged))
        distributed.barrier()
        self._restore(path, *loaded)
        return True

    def _restore(self, path: Path, state: dict, model: dict, tensors: dict, rng: dict) -> None:
        diff = describe_differences(state["settings"], self._settings())
        if diff:
            raise ValueError(f"cannot resume {self.run_dir}: the run was started with other settings ({diff}). "
                             f"Use the same options, or a new run directory.")
        self.model.load_state_dict(model)
        for i, e in enumerate(self.emas):
            prefix = f"ema.{i}."
            e.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        self.optimizer.load_state_dict(ckpt.unflatten_optimizer(tensors, state["optimizer"]))
        self.scaler.load_state_dict(state["scaler"])
        self.strategy.load_state_dict(state["strategy"])
        self.epoch, self.step, self.step_in_epoch = state["epoch"], state["step"], state["step_in_epoch"]
        self.history, self._records = list(state["history"]), state["records"]
        self._epoch_loss, self._epoch_n = state["epoch_loss"]
        if rng:
            _set_rng_state(rng, self.device)
        else:
            log.warning("no RNG state for rank %d in %s (world size changed?): reseeding", self.rank, path)
            torch.manual_seed(_mix(self.config.seed, 7919, self.rank, self.step))
        if distributed.is_main():  # records logged after this checkpoint belong to the lost steps
            _truncate_lines(self.run_dir / "metrics.jsonl", self._records)
        distributed.barrier()
        log.info("resumed %s at epoch %d, step %d", path, self.epoch, self.step)

    def _write_final_weights(self) -> None:
        ckpt.write_tensors(self.run_dir / "model.safetensors", self.model.state_dict())
        if self.emas:
            ckpt.write_tensors(self.run_dir / "model_ema.safetensors", self.emas[-1].module.state_dict())


# ----------------------------------------------------------------------------- small helpers

def _rng_file(rank: int) -> str:
    return f"rng-rank{rank}.safetensors"


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    out = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        out["cuda"] = torch.cuda.get_rng_state(device)
    return out


def _set_rng_state(state: Mapping[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _truncate_lines(path: Path, n: int) -> None:
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) != n:
        atomic.write_bytes(path, "".join(lines[:n]).encode())


def latest_text(run_dir: Optional[Path]) -> str:
    if run_dir is None:
        return "No checkpoint is kept (no run directory)."
    path = ckpt.latest(run_dir)
    return f"The last good checkpoint is kept: {path}." if path else "No checkpoint was written yet."


def _eta(trainer: Trainer, images_per_s: float) -> str:
    left = (trainer.total_steps - trainer.step) * trainer.config.batch_size / max(images_per_s, 1e-9)
    return time.strftime("%H:%M:%S", time.gmtime(left))


def _stage_text(desc: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in desc.items() if k != "strategy")


def describe_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> str:
    """"key: saved A, now B; ..." for every (dotted) setting that differs; "" when none does."""
    return "; ".join(f"{k}: saved {_short(a)}, now {_short(b)}" for k, a, b in _differences(saved, now))


def _differences(saved: Mapping[str, Any], now: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, saved, now) of every leaf that differs (dicts compared key by key)."""
    out = []
    for k in sorted(set(saved) | set(now)):
        a, b = saved.get(k), now.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((prefix + k, a, b))
    return out


def _short(v: Any, limit: int = 120) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= limit else s[:limit] + "..."


def _json_default(o: Any) -> Any:
    if isinstance(o, (set, tuple)):
        return list(o)
    if torch.is_tensor(o):
        return o.tolist()
    return str(o)
