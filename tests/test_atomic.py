"""Atomic writes: the target holds the old or the new content, never a torn file; no temp left."""
import os

import pytest
import torch

from asvit_kernels import atomic


def test_roundtrip_and_no_leftovers(tmp_path):
    p = tmp_path / "sub" / "state.json"
    atomic.write_json(p, {"step": 3, "h": [1.5, 2]})
    assert atomic.read_json(p) == {"step": 3, "h": [1.5, 2]}
    t = tmp_path / "rng.pt"
    state = {"rng": torch.get_rng_state(), "x": torch.randn(3)}
    atomic.torch_save(t, state)
    back = atomic.torch_load(t)
    assert torch.equal(back["rng"], state["rng"]) and torch.equal(back["x"], state["x"])
    assert sorted(os.listdir(tmp_path)) == ["rng.pt", "sub"] and os.listdir(tmp_path / "sub") == ["state.json"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    p = tmp_path / "state.json"
    atomic.write_json(p, {"step": 1})

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic.write_json(p, {"step": 2})
    assert atomic.read_json(p) == {"step": 1} and os.listdir(tmp_path) == ["state.json"]
