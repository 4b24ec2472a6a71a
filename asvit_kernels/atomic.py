"""Atomic files for long jobs (search, training): write to a temporary file in the same directory,
fsync, then rename over the target, so a kill at any moment leaves either the old file or the new
one, never a torn one."""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch

PathLike = Union[str, os.PathLike]


def write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (parent directories are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def torch_save(path: PathLike, obj: Any) -> None:
    """``torch.save`` atomically (tensors, RNG states, optimizer states)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def torch_load(path: PathLike) -> Any:
    # weights_only: our states hold tensors, numbers, strings and containers only.
    return torch.load(path, map_location="cpu", weights_only=True)
