"""Atomic files for long jobs (search, training): write to a temporary file in the same directory,
fsync, then rename over the target, so a kill at any moment leaves either the old file or the new
one, never a torn one.

Files are created with mode 0o666 minus the umask, like any other tool's output (``tempfile.mkstemp``
would make every run-directory file 0600). Readers raise ``ValueError`` naming the file and what is
wrong with it (unreadable JSON, missing keys, a torn torch file), never a bare parser error.
"""
from __future__ import annotations

import io
import json
import os
import secrets
from pathlib import Path
from typing import Any, Iterable, Union

import torch

PathLike = Union[str, os.PathLike]


def _create_temp(path: Path) -> tuple[int, Path]:
    """An exclusive new file next to ``path``; os.open applies the umask to 0o666."""
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def write_bytes(path: PathLike, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (parent directories are created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: PathLike, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def read_json(path: PathLike, keys: Iterable[str] = ()) -> Any:
    """The JSON value in ``path``; with ``keys``, it must be an object holding each of them.
    ValueError naming the file when it is not valid JSON or lacks a key."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged: not valid JSON ({e})") from None
    keys = list(keys)
    if keys:
        if not isinstance(obj, dict):
            raise ValueError(f"{path} is damaged: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in keys if k not in obj]
        if missing:
            raise ValueError(f"{path} is damaged: missing key(s) {', '.join(map(repr, missing))}")
    return obj


def torch_save(path: PathLike, obj: Any) -> None:
    """``torch.save`` atomically (tensors, RNG states, optimizer states)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def torch_load(path: PathLike) -> Any:
    """``torch.load`` of a file ``torch_save`` wrote; ValueError naming the file when it is torn."""
    try:
        # weights_only: our states hold tensors, numbers, strings and containers only.
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:  # torn zip, not a torch file, unpickling refused: RuntimeError, EOFError, ...
        raise ValueError(f"{path} is damaged: cannot be read as a torch file "
                         f"({' '.join(str(e).split())[:200]})") from None
