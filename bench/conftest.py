"""pytest-benchmark suites over the benchmark scripts' workloads (``pytest bench``).

Plain ``pytest`` from the repository root does not collect this directory (pyproject's
``testpaths = ["tests"]``). Each suite loads its script with ``harness.script(name)`` and times the
script's own workloads and methods with the ``benchmark`` fixture: one benchmark group per workload,
holding our op and the stock PyTorch baseline(s), each checked against the reference before it is
timed. Sizes are small CPU sizes (29 benchmarks, 104 s of CPU time measured); the scripts
themselves make the full tables and plots.

    pytest bench                                   # table per group, ours next to the baseline
    pytest bench --benchmark-json out.json         # machine-readable results
    pytest bench --benchmark-autosave              # .benchmarks/<machine>/0001_*.json
    pytest bench --benchmark-compare               # against the last saved run
    pytest bench --benchmark-histogram             # SVG histograms (needs pygal)
    pytest bench --bench-device cuda               # on a GPU (adds the triton / cuda backends)
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402,F401  (the same module object the scripts import)


def pytest_addoption(parser):
    parser.addoption("--bench-device", default=None,
                     help="device of the benchmark suites (default: cuda when available, else cpu)")


def bench_device(config) -> str:
    """The suites' device (also at collection time: the parametrization depends on it)."""
    dev = config.getoption("--bench-device") or ("cuda" if torch.cuda.is_available() else "cpu")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError("--bench-device cuda: no CUDA device here")
    return dev


def bench_dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


def timed_backends(op: str, device: str) -> list[str]:
    """``op``'s backends that run here, the Triton interpreter excluded (a correctness tool)."""
    from asvit_kernels import backends
    return [b for b in backends.available(op, torch.device(device), bench_dtype(device))
            if not (b == "triton" and device == "cpu")]


def pytest_configure(config):
    # Shorter default than pytest-benchmark's 1 s per benchmark: the suites hold 29 benchmarks and
    # should take a minute or two on 2 cores. Explicit --benchmark-max-time / -min-rounds win.
    given = " ".join(config.invocation_params.args)
    if "--benchmark-max-time" not in given and hasattr(config.option, "benchmark_max_time"):
        config.option.benchmark_max_time = 0.25
    if "--benchmark-min-rounds" not in given and hasattr(config.option, "benchmark_min_rounds"):
        config.option.benchmark_min_rounds = 3


@pytest.fixture(scope="session")
def device(request) -> str:
    return bench_device(request.config)


@pytest.fixture(scope="session")
def dtype(device) -> torch.dtype:
    return bench_dtype(device)


@pytest.fixture
def measure(benchmark, device):
    """measure(group, fn, **extra_info): time ``fn()`` in benchmark group ``group`` (warmed up once;
    on CUDA each call ends with a synchronize, as pytest-benchmark reads the host clock)."""
    def go(group: str, fn, **extra):
        benchmark.group = group
        benchmark.extra_info.update(extra)
        if device.startswith("cuda"):
            def call():
                fn()
                torch.cuda.synchronize()
        else:
            call = fn
        call()
        return benchmark(call)
    return go


def pytest_generate_tests(metafunc):
    """A suite's ``method`` parameter: the module's ``methods_for(device, timed_backends)``, so only
    methods that run on this device are collected (no wall of skips)."""
    make = getattr(metafunc.module, "methods_for", None)
    if make is not None and "method" in metafunc.fixturenames:
        metafunc.parametrize("method", make(bench_device(metafunc.config), timed_backends))
