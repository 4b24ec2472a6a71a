"""An exclusive lock on a run directory, so two runs never write into the same ``--out``.

The lock is ``fcntl.flock`` on ``<dir>/.asvit.lock``: the kernel releases it when the holding
process exits in any way (SIGKILL included), so a killed run never leaves a stale lock. The file
itself stays and holds the last holder's PID; its existence means nothing. Under torchrun only
rank 0 takes it (the other ranks write through rank 0 or into per-rank files).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import Iterator

__all__ = ["LOCK_NAME", "RunDirectoryLocked", "hold"]

LOCK_NAME = ".asvit.lock"


class RunDirectoryLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


def _holder(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    pid = os.read(fd, 64).decode(errors="replace").strip()
    return pid if pid.isdigit() else "unknown (it is starting)"


@contextlib.contextmanager
def hold(run_dir: os.PathLike | str) -> Iterator[Path]:
    """Hold the lock of ``run_dir`` (created if missing) for the ``with`` block; RunDirectoryLocked
    naming the directory and the holder's PID when another process holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirectoryLocked(f"run directory {run_dir} is in use by another run (PID {_holder(fd)}); "
                                     f"wait for it to finish or use another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
