"""Scale-out of independent evaluations over ``torch.distributed`` ranks.

Launch a search script with ``torchrun --nproc-per-node N script.py`` (or through a cluster
launcher that sets the same variables) and call ``init_from_env()`` first: it joins the process
group NCCL when CUDA is available (each rank on ``cuda:LOCAL_RANK``) and gloo otherwise. Without
those variables nothing is initialised and every helper here behaves as a one-process world, so
the same search code runs on one CPU process unchanged. End such a script with ``shutdown()``.

``map_candidates(fn, items)``: item ``i`` is evaluated by rank ``i % world`` (rank ``r`` takes
``items[r::world]``). Work proceeds in rounds of ``world`` items; after each round every rank
receives every result of the round (``all_gather_object``), so all ranks hold the full, ordered
list at the end and make identical decisions from it (lockstep). A failing ``fn`` on one rank is
gathered too and makes every rank raise, instead of leaving the others blocked in a collective.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from asvit_kernels.progress import Progress

__all__ = ["init_from_env", "is_initialized", "rank", "world_size", "is_main", "device", "barrier", "shutdown",
           "broadcast_object", "map_candidates", "show_progress", "CandidateError"]

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class CandidateError(RuntimeError):
    """Raised on every rank when ``fn`` failed on another rank during ``map_candidates``."""


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a one-process run): the rank that writes files and shows progress."""
    return rank() == 0


def local_rank() -> int:
    """``LOCAL_RANK`` from the environment (0 when unset)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def device() -> torch.device:
    """The device evaluations of this rank should use: ``cuda:LOCAL_RANK`` with CUDA, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank() % torch.cuda.device_count())
    return torch.device("cpu")


def init_from_env(backend: Optional[str] = None) -> bool:
    """Join the process group described by torchrun's environment variables.

    ``backend`` defaults to NCCL when CUDA is available (the rank's CUDA device is set from
    ``LOCAL_RANK`` first) and gloo otherwise. Returns True when a process group is (now or
    already) initialised, False when the variables are absent (a plain one-process run).
    """
    if is_initialized():
        return True
    if not all(k in os.environ for k in _ENV):
        return False
    if not dist.is_available():
        raise RuntimeError("torchrun environment found but torch.distributed is not available in this build")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device())
    dist.init_process_group(backend=backend)
    log.info("joined process group: rank %d of %d, backend %s", rank(), world_size(), backend)
    return True


def barrier() -> None:
    """Wait for every rank (no-op in a one-process run)."""
    if is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group at the end of a run: a barrier, then ``destroy_process_group``.
    The barrier matters: a rank that destroys its group while a peer's last transfer is still in
    flight can make the peer abort at exit (gloo). No-op without a process group."""
    if is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` from rank ``src`` on every rank (picklable objects; identity in a one-process run)."""
    if not is_initialized():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def _all_gather(obj: Any) -> list:
    if not is_initialized():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def show_progress(progress: Optional[bool]) -> bool:
    """Progress bars only on rank 0; ``None`` means "when stderr is a terminal"."""
    if not is_main():
        return False
    return sys.stderr.isatty() if progress is None else bool(progress)


def map_candidates(fn: Callable[[T], R], items: Sequence[T], *, progress: Optional[bool] = False,
                   desc: str = "candidates",
                   on_round: Optional[Callable[[dict[int, R]], None]] = None) -> list[R]:
    """``[fn(x) for x in items]``, with item ``i`` evaluated on rank ``i % world_size()``.

    Every rank must call this with the same ``items`` (same length and order). All ranks return
    the full list in item order. ``on_round(done)`` is called on every rank after each round
    (``world`` items) with ``{index: result}`` of all items finished so far, e.g. to checkpoint
    partial progress (write from rank 0 only). Results travel through pickling between ranks.

    If ``fn`` raises on some rank, every rank raises after that round: the failing rank its own
    exception, the others ``CandidateError`` naming the failing item and rank.
    """
    items = list(items)
    world, me = world_size(), rank()
    done: dict[int, R] = {}
    bar = Progress(total=len(items), desc=desc, progress=progress if is_main() else False, leave=False)
    try:
        for start in range(0, len(items), world):
            index = start + me
            mine: tuple[str, Any] = ("skip", None)
            error: Optional[BaseException] = None
            if index < len(items):
                try:
                    mine = ("ok", fn(items[index]))
                except Exception as e:  # noqa: BLE001 - reported to every rank below
                    error, mine = e, ("error", f"{type(e).__name__}: {e}")
            gathered = _all_gather(mine)
            for r, (status, value) in enumerate(gathered):
                if status == "error":
                    if error is not None:
                        raise error
                    raise CandidateError(f"candidate {start + r} failed on rank {r}: {value}")
                if status == "ok":
                    done[start + r] = value
            bar.update(min(world, len(items) - start))
            if on_round is not None:
                on_round(dict(done))
    finally:
        bar.close()
    return [done[i] for i in range(len(items))]
