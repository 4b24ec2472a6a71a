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


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_honour_the_umask(tmp_path, umask, mode):
    # tempfile.mkstemp would create every file 0600, whatever the umask says.
    old = os.umask(umask)
    try:
        atomic.write_json(tmp_path / "a.json", {"x": 1})
        atomic.torch_save(tmp_path / "b.pt", {"x": torch.ones(2)})
    finally:
        os.umask(old)
    for name in ("a.json", "b.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


@pytest.mark.parametrize("content, keys, needle", [
    ("", (), "not valid JSON"), ("{oops", (), "not valid JSON"), (b"\xff\xfe", (), "not valid JSON"),
    ("[1]", ("dir",), "expected a JSON object"), ('{"a": 1}', ("a", "b"), "missing key(s) 'b'"),
])
def test_read_json_names_the_file_and_the_problem(tmp_path, content, keys, needle):
    p = tmp_path / "latest.json"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError) as info:
        atomic.read_json(p, keys=keys)
    msg = str(info.value)
    assert str(p) in msg and needle in msg and "damaged" in msg and "\n" not in msg


@pytest.mark.parametrize("damage", [b"", b"garbage", None])
def test_torch_load_of_a_damaged_file_names_it(tmp_path, damage):
    p = tmp_path / "topology_state.pt"
    atomic.torch_save(p, {"step": 3, "x": torch.randn(100)})
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2] if damage is None else damage)
    with pytest.raises(ValueError) as info:
        atomic.torch_load(p)
    assert str(p) in str(info.value) and "damaged" in str(info.value) and "\n" not in str(info.value)
