"""Run-directory state shared by the As-ViT searches (topology search, scaling).

A run directory holds one authoritative state file, ``<name>_state.pt``, replaced atomically
(``asvit_kernels.atomic``) after every step, plus a readable ``<name>.json`` summary written right
after it (informational; resumption reads only the ``.pt`` file). Only rank 0 writes; on resume
rank 0 reads the state and broadcasts it, so every rank restarts from the same state even when
the run directory is visible to rank 0 only.

The state stores the run's settings; resuming with different settings raises ``ValueError``
(except for the keys a search declares extendable, e.g. the number of steps).
"""
from __future__ import annotations

import hashlib
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

import torch

from asvit_kernels.atomic import PathLike, torch_load, torch_save, write_json

from . import distributed

__all__ = ["state_path", "load", "save", "check_settings", "restore", "tensor_digest", "json_safe"]

log = logging.getLogger(__name__)


def state_path(run_dir: PathLike, name: str) -> Path:
    """``run_dir/<name>_state.pt``."""
    return Path(run_dir) / f"{name}_state.pt"


def load(run_dir: Optional[PathLike], name: str, keys: Iterable[str] = ("settings",)) -> Optional[dict]:
    """The saved state of run ``name`` (rank 0 reads, every rank receives it), or None when there
    is no run directory or no state in it yet. ValueError naming the file when it is torn, not a
    dict, or lacks one of ``keys``."""
    state = None
    if run_dir is not None and distributed.is_main():
        path = state_path(run_dir, name)
        if path.exists():
            state = torch_load(path)  # ValueError naming the file when it is torn
            _check_keys(path, name, state, keys)
            log.info("resuming %s from %s", name, path)
    return distributed.broadcast_object(state)


def _check_keys(path: Path, name: str, state: Any, keys: Iterable[str]) -> None:
    if not isinstance(state, dict):
        raise ValueError(f"{path} is damaged: expected the {name} state (a dict), got {type(state).__name__}")
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{path} is damaged: missing key(s) {', '.join(map(repr, missing))}")


def restore(run_dir: PathLike, name: str, load_state_dict, state: Mapping[str, Any]) -> None:
    """``load_state_dict(state)``, a state whose inner parts are missing or malformed (KeyError,
    TypeError, IndexError, ValueError) reported as ValueError naming the file, like ``load``."""
    try:
        load_state_dict(state)
    except (KeyError, TypeError, IndexError, ValueError) as e:
        what = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{state_path(run_dir, name)} is damaged: {what}") from None


def save(run_dir: Optional[PathLike], name: str, state: Mapping[str, Any],
         summary: Optional[Mapping[str, Any]] = None) -> None:
    """Atomically replace the state file (rank 0 only; nothing without a run directory), then the
    readable ``<name>.json`` summary (``summary``, made JSON-safe)."""
    if run_dir is None or not distributed.is_main():
        return
    torch_save(state_path(run_dir, name), dict(state))
    if summary is not None:
        write_json(Path(run_dir) / f"{name}.json", json_safe(summary))


def check_settings(saved: Mapping[str, Any], current: Mapping[str, Any], *,
                   extendable: Iterable[str] = ()) -> None:
    """ValueError naming every setting that differs between a saved run and this call (keys in
    ``extendable`` may differ)."""
    skip = set(extendable)
    keys = (set(saved) | set(current)) - skip
    diff = sorted(k for k in keys if saved.get(k) != current.get(k))
    if diff:
        details = "; ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in diff)
        raise ValueError(f"the run directory holds a run with other settings ({details}); "
                         "use another run_dir or the same settings")


def tensor_digest(t: Optional[torch.Tensor]) -> Optional[str]:
    """SHA-256 of a tensor's shape, dtype and values (None for None): identifies the input batch
    a run was started with without storing it."""
    if t is None:
        return None
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{tuple(t.shape)}|{t.dtype}".encode())
    h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def json_safe(obj: Any) -> Any:
    """Containers of numbers and strings with non-finite floats written as the strings "inf",
    "-inf", "nan" (strict JSON), tuples and tensors as lists, anything else as its ``str``."""
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist())
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)  # e.g. a torch.dtype among evaluate_fn's keyword arguments
