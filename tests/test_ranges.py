"""Channel ranges: the index lists they mean, their contiguous runs, and their validation."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from asvit_kernels import channel_indices
from asvit_kernels.ranges import concat_pieces, normalize_range, normalize_ranges


@st.composite
def size_and_range(draw):
    size = draw(st.integers(1, 300))
    return size, (draw(st.integers(0, 2 * size)), draw(st.integers(1, size)))


@settings(max_examples=200, deadline=None)
@given(size_and_range())
def test_indices_follow_the_definition(sr):
    size, (offset, width) = sr
    idx = channel_indices((offset, width), size)
    assert idx.tolist() == [(offset + j) % size for j in range(width)]


@settings(max_examples=200, deadline=None)
@given(size_and_range())
def test_pieces_cover_the_range_in_at_most_two_runs(sr):
    size, rng = sr
    runs = concat_pieces([normalize_range(rng, size)], size)
    assert len(runs) <= 2
    rebuilt = [p.src + j for p in sorted(runs, key=lambda p: p.dst) for j in range(p.length)]
    assert rebuilt == channel_indices(rng, size).tolist()


def test_named_kinds():
    assert channel_indices(None, 5).tolist() == [0, 1, 2, 3, 4]
    assert channel_indices((0, 2), 5).tolist() == [0, 1]  # first-k
    assert channel_indices((3, 2), 5).tolist() == [3, 4]  # last-k
    assert channel_indices((4, 3), 5).tolist() == [4, 0, 1]  # cyclic, wrapping
    assert channel_indices([(0, 1), (3, 2)], 5).tolist() == [0, 3, 4]  # concatenated


@pytest.mark.parametrize("rng,exc,msg", [
    ((0, 0), ValueError, "width"),
    ((0, 6), ValueError, "width"),
    ((-1, 2), ValueError, "offset"),
    ((0.5, 2), TypeError, "ints"),
    ((True, 2), TypeError, "ints"),
    ("ab", TypeError, "offset, width"),
    ((1, 2, 3), TypeError, "offset, width"),
])
def test_bad_ranges(rng, exc, msg):
    with pytest.raises(exc, match=msg):
        normalize_range(rng, 5, "in_range")


def test_bad_range_sequences():
    with pytest.raises(ValueError, match=r"out_range\[1\].*overlaps"):
        normalize_ranges([(0, 3), (2, 2)], 8, "out_range")
    with pytest.raises(ValueError, match="more than"):
        normalize_ranges([(0, 5), (5, 4)], 8, "out_range")
    with pytest.raises(TypeError, match="out_range"):
        normalize_ranges([], 8, "out_range")
    with pytest.raises(ValueError, match="size"):
        channel_indices(None, 0)


def test_indices_device_and_dtype():
    idx = channel_indices((2, 3), 4, device="cpu")
    assert idx.dtype == torch.int64 and idx.device.type == "cpu"


def test_cached_normalisation_still_refuses_bools_and_floats():
    assert normalize_range((1, 2), 5) == (1, 2)            # cached as ints
    with pytest.raises(TypeError, match="ints"):
        normalize_range((True, 2), 5)                       # equal hash, must not hit that entry
    assert normalize_ranges([(0, 2), (3, 2)], 5, "r") == ((0, 2), (3, 2))
    with pytest.raises(TypeError):
        normalize_ranges([(0, 2.0), (3, 2)], 5, "r")
    with pytest.raises(ValueError, match="overlaps"):      # twice: an error is never cached away
        normalize_ranges([(0, 3), (2, 2)], 8, "r")
    with pytest.raises(ValueError, match="overlaps"):
        normalize_ranges([(0, 3), (2, 2)], 8, "r")
    assert normalize_range((7, 2), 5) == (2, 2) and normalize_range((7, 2), 9) == (7, 2)  # size is keyed


def test_index_table_is_cached_per_ranges_size_device_and_dtype():
    from asvit_kernels.ranges import index_table
    cpu, meta = torch.device("cpu"), torch.device("meta")
    a = index_table(((4, 3),), 5, cpu)
    assert a is index_table(((4, 3),), 5, cpu)             # same key: the same tensor, not rebuilt
    assert a.dtype == torch.int32 and a.tolist() == [4, 0, 1]
    assert index_table(((4, 3),), 6, cpu).tolist() == [4, 5, 0]      # other size, other table
    assert index_table(((4, 3),), 5, cpu, torch.int64).dtype == torch.int64
    m = index_table(((4, 3),), 5, meta)
    assert m.device.type == "meta" and m.shape == (3,)
    assert index_table(((0, 1), (3, 2)), 5, cpu).tolist() == [0, 3, 4]
    with pytest.raises(TypeError, match="device"):
        index_table(((0, 1),), 5, "cpu")
