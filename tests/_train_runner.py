"""Shared pieces of the training-loop tests (not a test module itself), and a torchrun entry point.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/_train_runner.py \
        ddp OUT_DIR RUN_DIR,TAG[,MAX_EPOCHS] ...

``ddp`` (under torchrun, gloo on CPU) runs each job in turn (one process start for several runs):
it trains ``tiny_model()`` on ``small_digits(DDP_TRAIN, DDP_VAL)`` with ``ddp_config()`` and a
two-stage ``Retokenize`` in RUN_DIR (resuming when it has a checkpoint; ``fit(max_epochs_this_call=
MAX_EPOCHS)``), then every rank writes ``OUT_DIR/TAG-rank<r>.safetensors`` (its final model and EMA
weights, keys prefixed ``model.`` / ``ema<i>.``) and ``OUT_DIR/TAG-rank<r>.json`` (the summary).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import signal
import sys
from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Subset

from asvit_kernels.models.asvit import AsViT
from asvit_kernels.train import TrainConfig, Trainer
from asvit_kernels.train.data import open_dataset
from asvit_kernels.train.retokenize import Retokenize, parse_stages

GENOTYPE = "8,2,3,1|4,1,2,1|4,1,4,1|4,1,6,1|32,8"
TWO_STAGES = "0:7,0.5:4"  # at 32 px: stride 7 (5x5 grid) for the first half, stride 4 after
VOLATILE = ("seconds", "images_per_s")  # metrics fields that are wall-clock measurements
DDP_TRAIN, DDP_VAL = 256, 64


@functools.lru_cache(maxsize=None)
def digits():
    return open_dataset(None)


def small_digits(n_train: int = 512, n_val: int = 128):
    """The bundled digits (32x32), train/val cut to their first ``n_train`` / ``n_val`` images."""
    d = digits()
    return d._replace(train=Subset(d.train, range(n_train)), val=Subset(d.val, range(n_val)))


def tiny_model(seed: int = 0, genotype: str = GENOTYPE, img_size: int = 32) -> AsViT:
    torch.manual_seed(seed)
    return AsViT.from_genotype(genotype, num_classes=10, img_size=img_size)


def config(**overrides) -> TrainConfig:
    """4 epochs of 8 steps (512 images, batch 64), drop path on, two EMA copies."""
    kw = dict(epochs=4, batch_size=64, lr=2e-3, warmup_epochs=1, ema_decays=(0.99, 0.9), num_workers=0,
              drop_path=0.1, log_every=3, progress=False)
    kw.update(overrides)
    return TrainConfig(**kw)


def two_stages(kernel: int = 8, img_size: int = 32):
    return parse_stages(TWO_STAGES, kernel, img_size)


class Probe(Retokenize):
    """Retokenize plus test hooks (its name stays "retokenize", so runs with and without the hooks
    have the same settings and resume each other):

    * ``sigterm_at`` / ``sigint_at``: send this process SIGTERM / SIGINT after that global step;
    * ``crash_at``: raise ``Crash`` after global step ``crash_at`` (a kill without a checkpoint);
    * ``nan_at``: fill the first model parameter with NaN before global step ``nan_at``;
    * ``seen``: per finished epoch, (epoch, model tokenization, every EMA copy's tokenization)."""

    def __init__(self, stages=None, *, sigterm_at: Optional[int] = None, crash_at: Optional[int] = None,
                 nan_at: Optional[int] = None, sigint_at: Optional[int] = None):
        super().__init__(two_stages() if stages is None else stages)
        self.sigterm_at, self.crash_at, self.nan_at, self.sigint_at = sigterm_at, crash_at, nan_at, sigint_at
        self.seen: list[tuple[int, tuple, list]] = []

    def before_step(self, trainer, epoch, step_in_epoch, generator):
        if self.nan_at is not None and trainer.step == self.nan_at:
            with torch.no_grad():
                next(trainer.model.parameters()).fill_(float("nan"))
        return super().before_step(trainer, epoch, step_in_epoch, generator)

    def after_step(self, trainer, epoch, step_in_epoch, loss):
        super().after_step(trainer, epoch, step_in_epoch, loss)
        if self.sigterm_at is not None and trainer.step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if self.sigint_at is not None and trainer.step == self.sigint_at:
            os.kill(os.getpid(), signal.SIGINT)
        if self.crash_at is not None and trainer.step == self.crash_at:
            raise Crash(f"simulated crash after step {trainer.step}")

    def on_epoch_end(self, trainer, epoch):
        super().on_epoch_end(trainer, epoch)
        self.seen.append((epoch, trainer.model.tokenization, [e.module.tokenization for e in trainer.emas]))


class Crash(RuntimeError):
    pass


def metrics(run_dir, drop=VOLATILE) -> list[dict]:
    """``run_dir/metrics.jsonl`` without the wall-clock fields."""
    out = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k in drop:
            rec.pop(k, None)
        out.append(rec)
    return out


def tensors_equal(a: dict, b: dict) -> list[str]:
    """Keys whose tensors differ (bitwise), plus keys present in only one of the two."""
    bad = sorted(set(a) ^ set(b))
    bad += [k for k in sorted(set(a) & set(b)) if not torch.equal(a[k], b[k])]
    return bad


# ----------------------------------------------------------------------------- torchrun entry point

def ddp_config(**overrides) -> TrainConfig:
    kw = dict(epochs=2, batch_size=32, lr=2e-3, warmup_epochs=0.5, ema_decays=(0.9, 0.5), num_workers=0,
              drop_path=0.2, log_every=2, progress=False)
    kw.update(overrides)
    return TrainConfig(**kw)


def _ddp(args) -> None:
    from asvit_kernels.search import distributed

    torch.set_num_threads(1)
    assert distributed.init_from_env(backend="gloo"), "not started by torchrun"
    try:
        for job in args.jobs:
            _ddp_job(Path(args.out_dir), *job.split(","))
    finally:
        distributed.shutdown()


def _ddp_job(out: Path, run_dir: str, tag: str, max_epochs: str = "") -> None:
    from safetensors.torch import save_file

    from asvit_kernels.search import distributed

    rank = distributed.rank()
    trainer = Trainer(tiny_model(), small_digits(DDP_TRAIN, DDP_VAL), ddp_config(),
                      strategy=Retokenize(two_stages()), run_dir=run_dir, device="cpu")
    summary = trainer.fit(max_epochs_this_call=int(max_epochs) if max_epochs else None)
    out.mkdir(parents=True, exist_ok=True)
    state = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    for i, e in enumerate(trainer.emas):
        state.update({f"ema{i}.{k}": v for k, v in e.module.state_dict().items()})
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / f"{tag}-rank{rank}.safetensors"))
    summary = {**summary, "world": distributed.world_size(), "rank": rank,
               "finite": all(math.isfinite(r["val_acc"]) for r in summary["epochs"])}
    (out / f"{tag}-rank{rank}.json").write_text(json.dumps(summary, default=str))


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("ddp")
    d.add_argument("out_dir")
    d.add_argument("jobs", nargs="+", help="RUN_DIR,TAG[,MAX_EPOCHS]")
    args = p.parse_args(argv)
    if args.cmd == "ddp":
        _ddp(args)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
