"""The Trainer under torchrun with two gloo CPU processes: the run finishes with one metrics record
per epoch, both ranks hold identical weights, and a run paused after one epoch and relaunched ends
bit-for-bit where the uninterrupted two-process run ends."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from _train_runner import DDP_TRAIN, metrics, tensors_equal

RUNNER = Path(__file__).resolve().parent / "_train_runner.py"

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available() and importlib.util.find_spec("torch.distributed.run")),
    reason="torch.distributed with gloo (and torchrun) is not available")


def torchrun(out_dir, *jobs):
    """One torchrun launch (2 CPU ranks) running ``jobs`` = (run_dir, tag, max_epochs) in turn;
    per job: both ranks' summaries and final weights."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(
        [str(RUNNER.parent), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(RUNNER),
           "ddp", str(out_dir)] + [f"{d},{tag},{'' if m is None else m}" for d, tag, m in jobs]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = {}
    for _, tag, _ in jobs:
        out[tag] = ([json.loads((Path(out_dir) / f"{tag}-rank{r}.json").read_text()) for r in (0, 1)],
                    [load_file(str(Path(out_dir) / f"{tag}-rank{r}.safetensors")) for r in (0, 1)])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One launch: the uninterrupted 2-epoch run, and the first epoch of the run resumed below."""
    root = tmp_path_factory.mktemp("ddp")
    full, paused = root / "full", root / "paused"
    return full, paused, root / "out", torchrun(root / "out", (full, "full", None), (paused, "first", 1))


def test_two_processes_train_in_lockstep(runs):
    run_dir, _, _, results = runs
    summaries, weights = results["full"]
    steps_per_epoch = DDP_TRAIN // 2 // 32
    for r, s in enumerate(summaries):
        assert (s["rank"], s["world"], s["status"]) == (r, 2, "finished")
        assert (s["epoch"], s["step"]) == (2, 2 * steps_per_epoch)
        assert s["finite"] and 0.0 <= s["final_acc"] <= 100.0
    # evaluation is reduced over both ranks: every rank reports the same numbers
    walltime = ("seconds", "images_per_s")
    assert [{k: v for k, v in r.items() if k not in walltime} for r in summaries[0]["epochs"]] == \
           [{k: v for k, v in r.items() if k not in walltime} for r in summaries[1]["epochs"]]
    # gradients are averaged: both ranks end with the same model and EMA weights
    assert set(weights[0]) == set(weights[1]) and any(k.startswith("ema1.") for k in weights[0])
    assert tensors_equal(weights[0], weights[1]) == []
    assert all(torch.isfinite(v).all() for v in weights[0].values())
    # rank 0 wrote the files: one record per epoch (plus the re-tokenization event), final weights
    recs = metrics(run_dir, drop=())
    epochs = [r for r in recs if r.get("kind") == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1] and all(math.isfinite(r["val_acc"]) for r in epochs)
    assert [r["epoch"] for r in recs if r.get("event") == "retokenize"] == [1]
    assert len(recs) == 3
    info = json.loads((run_dir / "train.json").read_text())
    assert info["world_size"] == 2 and info["steps_per_epoch"] == steps_per_epoch
    final = load_file(str(run_dir / "model.safetensors"))
    assert tensors_equal(final, {k[len("model."):]: v for k, v in weights[0].items() if k.startswith("model.")}) == []
    latest = run_dir / "checkpoints" / json.loads((run_dir / "checkpoints" / "latest.json").read_text())["dir"]
    assert sorted(p.name for p in latest.iterdir()) == ["model.safetensors", "rng-rank0.safetensors",
                                                        "rng-rank1.safetensors", "state.json", "state.safetensors"]
    # the ranks draw different drop-path masks: their saved RNG states differ
    rng = [load_file(str(latest / f"rng-rank{r}.safetensors"))["cpu"] for r in (0, 1)]
    assert not torch.equal(rng[0], rng[1])


def test_two_processes_resume_is_bit_for_bit(runs):
    ref_dir, run_dir, out, results = runs
    ref_weights = results["full"][1]
    first = results["first"][0]
    assert [s["status"] for s in first] == ["paused", "paused"] and first[0]["epoch"] == 1
    assert [len(s["epochs"]) for s in first] == [1, 1]
    assert not (run_dir / "model.safetensors").exists() and len(metrics(run_dir)) == 1
    (second, weights), = torchrun(out, (run_dir, "second", None)).values()  # a new launch resumes
    assert [s["status"] for s in second] == ["finished", "finished"]
    assert [len(s["epochs"]) for s in second] == [2, 2]
    assert tensors_equal(weights[0], weights[1]) == []
    assert tensors_equal(weights[0], ref_weights[0]) == []
    assert metrics(run_dir) == metrics(ref_dir)
