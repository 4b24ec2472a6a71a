"""Channel ranges: which channels of a shared dimension a sub-network uses.

A range is ``(offset, width)`` and means channels ``(offset + j) % size`` for ``j < width``:
first-k sharing is ``(0, k)``, last-k ``(size - k, k)``, and cyclic sharing any offset, so a range
may wrap past the end. ``None`` means the whole dimension. Every kernel serves a range either as
one affine piece (no wrap) or through an index table; nothing here touches weights.
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple, Optional, Union

import torch

Range = tuple[int, int]
RangeLike = Optional[Union[Range, Sequence[Range]]]


class Piece(NamedTuple):
    """A contiguous run of a range: ``length`` channels from ``src`` land at position ``dst``."""

    src: int
    length: int
    dst: int


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_single_range(r) -> bool:
    return isinstance(r, Sequence) and len(r) == 2 and all(_is_int(v) for v in r)


def _plain_key(ranges):
    """``ranges`` as a hashable tuple when it holds only exact ints (so it can key a cache), else None.

    Exact ints only: ``True == 1`` and ``hash(True) == hash(1)``, so a bool must never hit an entry an
    int made (it is refused by the uncached check instead)."""
    if ranges is None or type(ranges) not in (tuple, list):
        return None
    if len(ranges) == 2 and all(type(v) is int for v in ranges):
        return tuple(ranges)
    out = []
    for r in ranges:
        if type(r) not in (tuple, list) or len(r) != 2 or not all(type(v) is int for v in r):
            return None
        out.append(tuple(r))
    return tuple(out)


def _check_range(channel_range, size: int, name: str) -> Range:
    if channel_range is None:
        return (0, size)
    if not isinstance(channel_range, Sequence) or len(channel_range) != 2:
        raise TypeError(f"{name} must be None or an (offset, width) pair of ints, got {channel_range!r}")
    offset, width = channel_range
    if not (_is_int(offset) and _is_int(width)):
        raise TypeError(f"{name} must hold two ints (offset, width), got {channel_range!r}")
    if offset < 0:
        raise ValueError(f"{name}: offset must be >= 0, got {offset}")
    if not 1 <= width <= size:
        raise ValueError(f"{name}: width must be in [1, {size}] (the full size), got {width}")
    return (offset % size, width)


def _check_ranges(ranges: RangeLike, size: int, name: str) -> tuple[Range, ...]:
    if ranges is None or _is_single_range(ranges):
        return (_check_range(ranges, size, name),)
    if not isinstance(ranges, Sequence) or len(ranges) == 0:
        raise TypeError(f"{name} must be None, an (offset, width) pair or a non-empty sequence of pairs, "
                        f"got {ranges!r}")
    out = tuple(_check_range(r, size, f"{name}[{i}]") for i, r in enumerate(ranges))
    total = sum(w for _, w in out)
    if total > size:
        raise ValueError(f"{name}: the ranges use {total} channels in all, more than the {size} there are")
    used = set()
    for i, (o, w) in enumerate(out):
        chans = {(o + j) % size for j in range(w)}
        if used & chans:
            raise ValueError(f"{name}[{i}] = {ranges[i]!r} overlaps an earlier range of {name}")
        used |= chans
    return out


# A result depends only on (ranges, size), which are immutable ints: the caches never go stale and
# need no invalidation. Bounded, since a search visits many sub-networks; errors are never cached.
@functools.lru_cache(maxsize=4096)
def _check_range_cached(key, size: int, name: str) -> Range:
    return _check_range(key, size, name)


@functools.lru_cache(maxsize=4096)
def _check_ranges_cached(key, size: int, name: str) -> tuple[Range, ...]:
    return _check_ranges(key, size, name)


def normalize_range(channel_range, size: int, name: str = "channel_range") -> Range:
    """Validate one range against a dimension of ``size`` channels; returns ``(offset % size, width)``."""
    key = _plain_key(channel_range)
    if key is None or len(key) != 2 or type(key[0]) is not int or type(size) is not int:
        return _check_range(channel_range, size, name)
    return _check_range_cached(key, size, name)


def normalize_ranges(ranges: RangeLike, size: int, name: str) -> tuple[Range, ...]:
    """Validate one range or a sequence of ranges (concatenated in order) over ``size`` channels.

    Ranges of a sequence may not share a channel: their gradients are written straight into one
    full-size buffer, which needs every used channel to have exactly one writer. Cached for ranges
    given as plain ints (the per-call cost of a sub-network's forward).
    """
    key = _plain_key(ranges)
    if key is None or type(size) is not int:
        return _check_ranges(ranges, size, name)
    return _check_ranges_cached(key, size, name)


@functools.lru_cache(maxsize=4096)
def pieces(channel_range: Range, size: int) -> tuple[Piece, ...]:
    """The one or two contiguous runs of a normalized range (cached: it depends only on its ints)."""
    offset, width = channel_range
    first = min(width, size - offset)
    runs = [Piece(offset, first, 0)]
    if first < width:
        runs.append(Piece(0, width - first, first))
    return tuple(runs)


@functools.lru_cache(maxsize=4096)
def _concat_pieces(ranges: tuple[Range, ...], size: int) -> tuple[Piece, ...]:
    runs, base = [], 0
    for r in ranges:
        for p in pieces(r, size):
            last = runs[-1] if runs else None
            if last is not None and last.src + last.length == p.src and last.dst + last.length == base + p.dst:
                runs[-1] = Piece(last.src, last.length + p.length, last.dst)  # adjacent: one run
            else:
                runs.append(Piece(p.src, p.length, base + p.dst))
        base += r[1]
    return tuple(runs)


def concat_pieces(ranges: Sequence[Range], size: int) -> tuple[Piece, ...]:
    """Contiguous runs of concatenated normalized ranges, with destinations in the concatenated
    order; runs that continue each other in both are merged (a full-width qkv's q, k and v blocks
    are one run, so the torch backend serves it as dense F.linear on views)."""
    return _concat_pieces(tuple(tuple(r) for r in ranges), size)


def total_width(ranges: Sequence[Range]) -> int:
    return sum(w for _, w in ranges)


def channel_indices(channel_range: RangeLike, size: int, device=None) -> torch.Tensor:
    """The int64 index tensor a range (or a sequence of ranges, concatenated) means (a fresh tensor)."""
    if not _is_int(size) or size < 1:
        raise ValueError(f"size must be a positive int, got {size!r}")
    rngs = normalize_ranges(channel_range, size, "channel_range")
    parts = [(torch.arange(w, device=device) + o) % size for o, w in rngs]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


@functools.lru_cache(maxsize=1024)
def index_table(ranges: tuple[Range, ...], size: int, device: torch.device,
                dtype: torch.dtype = torch.int32) -> torch.Tensor:
    """``channel_indices(ranges, size)`` as a ``dtype`` tensor on ``device``, built once per
    (ranges, size, device, dtype) and shared by every later call: ranges are immutable tuples of
    ints, so an entry never goes stale and nothing invalidates the cache (bounded LRU). The tensor
    is shared: callers only read it."""
    if not isinstance(device, torch.device):
        raise TypeError(f"device must be a torch.device, got {type(device).__name__}")
    return channel_indices(ranges, size, "cpu").to(device=device, dtype=dtype)


def cyclic_ranges(widths: Sequence[int], size: int) -> dict[int, Range]:
    """ViTAS cyclic sharing: candidate width ``w_k`` (sorted ascending) uses ``(o_k, w_k)`` with
    ``o_k = (w_1 + ... + w_{k-1}) % size``, so every channel serves a near-equal share of candidates."""
    out, offset = {}, 0
    for w in sorted(set(widths)):
        out[w] = normalize_range((offset, w), size, f"width {w}")
        offset = (offset + w) % size
    return out
