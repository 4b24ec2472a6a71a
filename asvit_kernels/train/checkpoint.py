"""Training checkpoints: safetensors weights plus a JSON state, committed atomically.

Layout of ``run_dir/checkpoints``::

    latest.json                  {"dir": "e0004-s00001234"}: replaced last, the commit point
    e0004-s00001234/
        model.safetensors        the model's weights (loadable alone: safetensors.torch.load_file)
        state.safetensors        optimizer moments and EMA weights
        rng-rank0.safetensors    each rank's torch RNG state (drop path draws differ per rank)
        state.json               epoch, step, optimizer hyper-parameters, grad scaler, strategy, ...,
                                 the SHA-256 of every other file ("checksums") and of itself ("sha256")

Every file is written atomically (``asvit_kernels.atomic``) into a fresh directory, and only then
does ``latest.json`` point at it: a kill at any moment leaves the previous checkpoint in force.
Older directories are pruned after the commit (``keep`` most recent kept).

Reading verifies every checksum (``read_state``): a damaged file (flipped bytes, truncation, a
hand edit) raises ``DamagedCheckpoint`` naming it, and ``candidates`` lists the older committed
checkpoints a loader can fall back to (``fall_back`` moves the damaged ones aside).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from asvit_kernels import atomic

__all__ = ["checkpoint_dir", "latest", "write_tensors", "read_tensors", "commit", "flatten_optimizer",
           "unflatten_optimizer", "tag", "DamagedCheckpoint", "write_state", "read_state", "candidates",
           "fall_back", "sha256"]

log = logging.getLogger(__name__)
LATEST = "latest.json"
STATE = "state.json"
DAMAGED_SUFFIX = ".damaged"
_TAG = re.compile(r"e\d{4,}-s\d{8,}")


class DamagedCheckpoint(ValueError):
    """A checkpoint file does not match its recorded checksum, or cannot be read."""


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
    name = atomic.read_json(pointer, keys=("dir",))["dir"]
    if not isinstance(name, str) or not _TAG.fullmatch(name):
        raise ValueError(f"{pointer} is damaged: 'dir' must name a checkpoint directory like e0004-s00001234, "
                         f"got {name!r}; delete {pointer} to start over")
    path = checkpoint_dir(run_dir) / name
    if not path.is_dir():
        raise FileNotFoundError(f"{pointer} names {name}, which does not exist: the checkpoint directory was "
                                f"modified by hand; delete {pointer} to start over")
    return path


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_tensors(path: atomic.PathLike, tensors: Mapping[str, torch.Tensor]) -> str:
    """Atomically write ``tensors`` as one safetensors file; returns the SHA-256 of the bytes written."""
    data = _serialize(tensors)
    atomic.write_bytes(path, data)
    return sha256(data)


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


def _serialize(tensors: Mapping[str, torch.Tensor]) -> bytes | memoryview:
    """The safetensors file of ``tensors``: an 8-byte little-endian header length, the JSON header
    (padded with spaces to 8 bytes), then each tensor's bytes, largest elements first so each is
    aligned. Every tensor is copied once, from any device, straight into the file's buffer:
    safetensors.torch.save of a detached CPU copy made three copies (the quick preset's 69 MB
    checkpoint, 1 thread, load ~5: 254 -> 97 ms). Other dtypes go through safetensors."""
    if sys.byteorder != "little" or any(v.dtype not in _ST_DTYPES for v in tensors.values()):
        return st_save({k: v.detach().to("cpu", copy=True).contiguous() for k, v in tensors.items()})
    items = sorted(tensors.items(), key=lambda kv: (-kv[1].element_size(), kv[0]))
    header, end = {}, 0
    for k, v in items:
        start, end = end, end + v.numel() * v.element_size()
        header[k] = {"dtype": _ST_DTYPES[v.dtype], "shape": list(v.shape), "data_offsets": [start, end]}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    base = 8 + len(text)
    out = torch.empty(base + end, dtype=torch.uint8, device="cpu")
    data = memoryview(out.numpy())
    data[:base] = len(text).to_bytes(8, "little") + text
    for k, v in items:
        start, stop = header[k]["data_offsets"]
        if stop > start:
            out[base + start:base + stop].view(v.dtype).view(v.shape).copy_(v.detach())
    return data


def _parse_tensors(path: Path, data: bytes) -> dict[str, torch.Tensor]:
    if not data:
        raise DamagedCheckpoint(f"{path} is damaged: the file is empty")
    try:
        return st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as e:  # truncated header or data, not safetensors
        raise DamagedCheckpoint(f"{path} is damaged: not a readable safetensors file ({e})") from None


def read_tensors(path: atomic.PathLike, expected_sha256: Optional[str] = None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; DamagedCheckpoint naming it when it is empty, torn, or
    (with ``expected_sha256``) not the bytes that were written."""
    path = Path(path)
    data = path.read_bytes()
    if expected_sha256 is not None and sha256(data) != expected_sha256:
        raise DamagedCheckpoint(f"{path} is damaged: its SHA-256 does not match the one recorded in "
                                f"{path.parent / STATE} ({len(data)} bytes)")
    return _parse_tensors(path, data)


def _canonical_digest(obj: Any) -> str:
    # A JSON round trip first: int keys become strings, so the digest is the same after reading.
    text = json.dumps(json.loads(json.dumps(obj)), sort_keys=True)
    return sha256(text.encode())


def write_state(path: atomic.PathLike, state: Mapping[str, Any], checksums: Mapping[str, str]) -> None:
    """Write ``state.json`` with the SHA-256 of every other file of the checkpoint and its own."""
    body = {**state, "checksums": dict(checksums)}
    atomic.write_json(path, {**body, "sha256": _canonical_digest(body)})


def read_state(ckpt: Path, files: Iterable[str], keys: Iterable[str] = ()) -> dict[str, Any]:
    """``ckpt/state.json``, checked against its own digest, with ``keys`` and a checksum for each
    of ``files``; DamagedCheckpoint naming the file otherwise. Returns the state (with
    ``checksums``), so a loader can verify each file it reads with ``read_tensors``."""
    path = ckpt / STATE
    try:
        state = atomic.read_json(path, keys=("checksums", "sha256", *keys))
    except FileNotFoundError:
        raise DamagedCheckpoint(f"{path} is missing: the checkpoint directory was modified by hand") from None
    except ValueError as e:
        raise DamagedCheckpoint(str(e)) from None
    digest = state.pop("sha256")
    if _canonical_digest(state) != digest:
        raise DamagedCheckpoint(f"{path} is damaged: its content does not match its recorded SHA-256")
    missing = [f for f in files if f not in state["checksums"]]
    if missing:
        raise DamagedCheckpoint(f"{path} is damaged: no checksum recorded for {', '.join(missing)}")
    return state


def candidates(run_dir: atomic.PathLike) -> list[Path]:
    """Checkpoint directories to resume from, best first: the committed one, then the older
    ones (committed before it). Empty when nothing was committed."""
    newest = latest(run_dir)
    if newest is None:
        return []
    older = sorted((p for p in checkpoint_dir(run_dir).iterdir()
                    if p.is_dir() and _TAG.fullmatch(p.name) and p.name < newest.name), reverse=True)
    return [newest, *older]


def fall_back(run_dir: atomic.PathLike, good: Optional[str], damaged: Iterable[str]) -> None:
    """Point ``latest.json`` at ``good`` (or remove it when None) and move every ``damaged``
    directory aside to ``<name>.damaged`` (kept for inspection, never resumed or overwritten)."""
    root = checkpoint_dir(run_dir)
    if good is None:
        (root / LATEST).unlink(missing_ok=True)
    else:
        atomic.write_json(root / LATEST, {"dir": good})
    for name in damaged:
        aside = root / f"{name}{DAMAGED_SUFFIX}"
        shutil.rmtree(aside, ignore_errors=True)
        (root / name).rename(aside)


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
