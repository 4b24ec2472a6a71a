"""bench/harness.py's side-by-side timer, on a fake clock: the committed tables' ratios rest on it."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "bench_harness", Path(__file__).resolve().parents[1] / "bench" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


class FakeMachine:
    """A clock whose calls cost ``cost[name]`` seconds times the machine's speed factor at that moment."""

    def __init__(self, speed=lambda t: 1.0):
        self.now, self.speed, self.calls = 0.0, speed, []

    def clock(self):
        return self.now

    def fn(self, name, cost):
        def call():
            self.calls.append(name)
            self.now += cost * self.speed(self.now)
        return call


def test_each_method_gets_its_budget_in_rotating_slices():
    m = FakeMachine()
    timed = {"a": (m.fn("a", 0.004), None), "b": (m.fn("b", 0.010), None), "c": (m.fn("c", 0.050), None)}
    ms = harness.interleaved_ms(timed, rounds=2, min_run_time=0.1, clock=m.clock)
    assert ms == {"a": pytest.approx(4.0), "b": pytest.approx(10.0), "c": pytest.approx(50.0)}
    for name, cost in (("a", 0.004), ("b", 0.010), ("c", 0.050)):
        assert m.calls.count(name) * cost >= 0.2   # rounds * min_run_time of calls each, warm-up aside
    turns = [n for i, n in enumerate(m.calls) if i == 0 or m.calls[i - 1] != n]
    assert turns[3:9] == ["a", "b", "c", "b", "c", "a"]   # after the warm-ups, the order rotates


def test_drifting_machine_hits_every_method_alike():
    """Speed flips between 1x and 1.5x every half second. Two methods of equal cost read within 3% of
    each other; timed in half-second blocks in turn (time_ms's way) they read 1.5x apart."""
    m = FakeMachine(speed=lambda t: 1.0 if int(t / 0.5) % 2 == 0 else 1.5)
    ms = harness.interleaved_ms({k: (m.fn(k, 0.001), None) for k in "ab"}, rounds=3, min_run_time=0.5,
                                clock=m.clock)
    assert ms["a"] / ms["b"] == pytest.approx(1.0, rel=0.03)
    assert 1.0 < ms["a"] < 1.5

    m.now = 0.0
    blocks = {"a": [], "b": []}   # the old way: half a second of each method in turn
    for _ in range(3):
        for k, fn in (("a", m.fn("a", 0.001)), ("b", m.fn("b", 0.001))):
            t0, n = m.clock(), 0
            while m.clock() - t0 < 0.5:
                fn()
                n += 1
            blocks[k].append((m.clock() - t0) / n)
    assert harness.middle_mean(blocks["a"]) / harness.middle_mean(blocks["b"]) == pytest.approx(1 / 1.5, rel=0.03)


def test_a_failing_method_is_recorded_and_the_others_go_on():
    m = FakeMachine()
    calls = []

    def bad():
        calls.append("bad")
        raise RuntimeError("out of memory")

    failed = {}
    ms = harness.interleaved_ms({"a": (m.fn("a", 0.005), None), "bad": (bad, None)}, rounds=3,
                                min_run_time=0.05, failed=failed, clock=m.clock)
    assert list(ms) == ["a"] and ms["a"] == pytest.approx(5.0)
    assert isinstance(failed["bad"], RuntimeError) and calls == ["bad"]
    with pytest.raises(RuntimeError, match="out of memory"):
        harness.interleaved_ms({"bad": (bad, None)}, rounds=1, min_run_time=0.0, clock=m.clock)


def test_context_is_entered_around_each_slice():
    m, entered = FakeMachine(), []

    class Ctx:
        def __enter__(self):
            entered.append(len(m.calls))

        def __exit__(self, *exc):
            return False

    harness.interleaved_ms({"a": (m.fn("a", 0.005), Ctx)}, rounds=3, min_run_time=0.0, clock=m.clock)
    assert len(entered) == 1 + 3   # the warm-up slice, then one per timed slice


def test_middle_mean_drops_the_outer_quarters():
    assert harness.middle_mean([1.0, 2.0, 3.0]) == 2.0
    assert harness.middle_mean([100.0, 1.0, 2.0, 3.0, 4.0, 0.0, 2.5, 2.5]) == pytest.approx(2.5)
