"""Progress through the CLI (issue 20): a tqdm bar on a terminal - also on a pseudo-terminal that
reports no window size, where tqdm alone prints nothing - and a plain periodic line when stderr is
a pipe; nested loops; rank 0 only."""
import logging
import os
import pty
import subprocess
import sys
import time

import pytest

from asvit_kernels import progress
from asvit_kernels.progress import Progress

SEARCH = ["-m", "asvit_kernels.cli", "search", "--steps", "2", "--repeats", "1"]


@pytest.fixture(autouse=True)
def _no_tqdm_disable(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)


def _env():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("TQDM_DISABLE", progress.INTERVAL_ENV, "COLUMNS", "LINES"):
        env.pop(k, None)
    return env


def _read_all(fd, proc, timeout):
    out, end = b"", time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the child closed its side
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=max(1, end - time.monotonic()))
    return out.decode(errors="replace")


def test_a_pseudo_terminal_without_a_window_size_sees_a_bar(tmp_path):
    # pty.openpty() sets no window size (0 x 0), like `script` without a terminal and some CI ttys:
    # tqdm then took every row as off-screen and `asvit search` printed no bar at all.
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, *SEARCH, "--out", str(tmp_path / "s")], stdin=slave, stdout=slave,
                            stderr=slave, env=_env(), close_fds=True)
    os.close(slave)
    try:
        text = _read_all(master, proc, 300)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, text
    assert "search: 100%|" in text and "2/2 [" in text and "step/s" in text, text  # bar, rate, elapsed<ETA
    assert "ntk: fast path" not in text  # per-call details are DEBUG


def test_a_pipe_sees_a_periodic_progress_line(tmp_path):
    r = subprocess.run([sys.executable, *SEARCH, "--out", str(tmp_path / "s"), "--progress-interval", "0"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "asvit_kernels.progress:" in ln]
    assert any("search 1/2 (50%" in ln and "step/s" in ln and "ETA" in ln for ln in lines), r.stderr
    assert any("search done: 2/2 in" in ln for ln in lines), r.stderr
    assert "\r" not in r.stderr and "%|" not in r.stderr  # no bar


def test_no_line_before_the_interval(caplog, monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "3600")
    with caplog.at_level(logging.INFO, logger="asvit_kernels.progress"):
        with Progress(total=5, desc="loop", progress=None, stream=_NotATty()) as p:
            assert p.mode == "lines"
            for _ in range(5):
                p.update()
    assert [r.getMessage() for r in caplog.records][0].startswith("loop done: 5/5 in")
    assert len(caplog.records) == 1


def test_nested_lines_name_every_open_loop_and_inner_loops_end_silently(caplog):
    progress.set_interval(0)
    try:
        with caplog.at_level(logging.INFO, logger="asvit_kernels.progress"):
            with Progress(total=2, desc="outer", unit="epoch", stream=_NotATty()) as outer:
                for _ in range(2):
                    with Progress(total=3, desc="inner", unit="step", stream=_NotATty()) as inner:
                        assert inner.depth == 1 and not inner.leave
                        for _ in range(3):
                            inner.update()
                    outer.set_postfix(acc="50%")
                    outer.update()
    finally:
        progress.set_interval(None)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("outer 0/2 (0%) > inner 1/3 (33%") for m in msgs), msgs
    assert msgs[-1].startswith("outer done: 2/2 in") and msgs[-1].endswith("acc=50%")
    assert not any("inner done" in m for m in msgs)


def test_an_inner_loop_left_open_by_an_exception_is_closed_with_its_outer_one():
    with pytest.raises(RuntimeError):
        with Progress(total=2, desc="outer", stream=_NotATty()):
            Progress(total=3, desc="inner", stream=_NotATty())
            raise RuntimeError
    assert progress._open == []


def test_off_when_false_quiet_or_not_rank_0(monkeypatch):
    assert progress.mode(False) == "off"
    assert progress.mode(None, _NotATty()) == "lines" and progress.mode(True, _NotATty()) == "lines"
    monkeypatch.setenv("TQDM_DISABLE", "1")  # what asvit --quiet sets
    assert progress.mode(None, _NotATty()) == "off"
    monkeypatch.delenv("TQDM_DISABLE")
    monkeypatch.setattr(progress, "_not_rank_0", lambda: True)
    assert progress.mode(None, _NotATty()) == "off"


def test_a_zero_size_terminal_gets_a_usable_size(monkeypatch):
    master, slave = pty.openpty()
    try:
        with os.fdopen(slave, "w", closefd=False) as stream:
            assert progress.mode(None, stream) == "bar"
            monkeypatch.delenv("COLUMNS", raising=False)
            monkeypatch.delenv("LINES", raising=False)
            assert progress._terminal_size(stream) == {"ncols": 80, "nrows": 24}
            monkeypatch.setenv("COLUMNS", "132")
            assert progress._terminal_size(stream)["ncols"] == 132
    finally:
        os.close(slave)
        os.close(master)


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.setenv(progress.INTERVAL_ENV, "5")
    assert progress.interval() == 5.0
    monkeypatch.setenv(progress.INTERVAL_ENV, "soon")
    assert progress.interval() == progress.DEFAULT_INTERVAL
    with pytest.raises(ValueError, match="progress interval"):
        progress.set_interval(-1)


class _NotATty:
    def isatty(self):
        return False

    def write(self, s):
        pass

    def flush(self):
        pass


def test_watch_sees_every_update_of_its_loop_in_every_mode():
    """progress.watch: the callback sees each update of loops with that name (also when progress is
    off), not other loops', and nothing once the block is left."""
    seen = []
    with progress.watch("search", lambda p: seen.append((p.desc, p.n, p.mode))):
        with Progress(total=3, desc="search", progress=False) as p:
            p.update(1)
            p.update(2)
        with Progress(total=3, desc="scaling", progress=False) as q:
            q.update(1)
    with Progress(total=3, desc="search", progress=False) as p:
        p.update(1)
    assert seen == [("search", 1, "off"), ("search", 3, "off")]
    # no callback is left behind (other tests may have left empty lists of their loops' names)
    assert not any(progress._watchers.values()), progress._watchers
