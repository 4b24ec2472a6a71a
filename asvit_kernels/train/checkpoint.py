"""Training checkpoints: safetensors weights plus a JSON state, committed atomically.

Layout of ``run_dir/checkpoints``::

    latest.json                  {"dir": "e0004-s00001234"}: replaced last, the commit point
    e0004-s00001234/
        model.safetensors        the model's weights (loadable alone: safetensors.torch.load_file)
        state.safetensors        optimizer moments and EMA weights
        rng-rank0.safetensors    each rank's torch RNG state (drop path draws differ per rank)
        state.json               epoch, step, optimizer hyper-parameters, grad scaler, strategy, ...

Every file is written atomically (``asvit_kernels.atomic``) into a fresh directory, and only then
does ``latest.json`` point at it: a kill at any moment leaves the previous checkpoint in force.
Older directories are pruned after the commit (``keep`` most recent kept).
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from asvit_kernels import atomic

__all__ = ["checkpoint_dir", "latest", "write_tensors", "read_tensors", "commit", "flatten_optimizer",
           "unflatten_optimizer", "tag"]

log = logging.getLogger(__name__)
LATEST = "latest.json"
_TAG = re.compile(r"e\d{4,}-s\d{8,}")


def checkpoint_dir(run_dir: atomic.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def tag(epoch: int, step: int) -> str:
    """Directory name of the checkpoint taken after ``step`` optimizer steps, in ``epoch``."""
    return f"e{epoch:04d}-s{step:08d}"


def latest(run_dir: atomic.PathLike) -> Optional[Path]:
    """The committed checkpoint directory, or None when there is none."""
    pointer = checkpoint_dir(run_dir) / LATEST
    if not pointer.exists():
        return None
    name = atomic.read_json(pointer)["dir"]
    path = checkpoint_dir(run_dir) / name
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {name}, which does not exist: the checkpoint directory was "
                                f"modified by hand; delete {pointer} to start over")
    return path


def write_tensors(path: atomic.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    """Atomically write ``tensors`` (copied to contiguous CPU tensors) as one safetensors file."""
    flat = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()}
    atomic.write_bytes(path, st_save(flat))


def read_tensors(path: atomic.PathLike) -> dict[str, torch.Tensor]:
    return st_load(Path(path).read_bytes())


def commit(run_dir: atomic.PathLike, name: str, *, keep: int = 2) -> None:
    """Point ``latest.json`` at ``name`` (atomic), then delete all but the ``keep`` newest."""
    root = checkpoint_dir(run_dir)
    atomic.write_json(root / LATEST, {"dir": name})
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and _TAG.fullmatch(p.name))
    for old in dirs[:-keep] if keep > 0 else dirs:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def flatten_optimizer(state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer ``state_dict()`` as (tensors for safetensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for pid, st in state["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of ``flatten_optimizer`` (tensors stay on CPU; ``load_state_dict`` moves them)."""
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = v
    for pid, st in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": [dict(g) for g in meta["param_groups"]]}
