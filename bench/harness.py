"""Shared benchmark harness: timing, machine description, result files.

Tables compare methods with ``interleaved_ms``: short alternating slices, so the speed drift of a
shared machine hits every method of a row alike. ``time_ms`` (``torch.utils.benchmark``'s
``blocked_autorange`` median, CUDA synchronised) times one fn on its own. Results go to
``bench/results/<name>_<machine>.json`` and a Markdown table beside it, with the machine named in
both; ``plot_bars`` adds a PNG bar chart (matplotlib, when installed).

The scripts' workload definitions (shapes, methods, checks) are also what the pytest-benchmark
suites ``bench/test_*.py`` time: they load a script with ``script(name)``, so there is one
definition of each workload and two ways to time it (this module's ``interleaved_ms`` for the
scripts' tables, pytest-benchmark's fixture for ``pytest bench``).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Callable

import torch
import torch.utils.benchmark as tbench

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
SLICE_S = 0.02   # interleaved_ms: one timed slice, seconds


def script(name: str) -> ModuleType:
    """``bench/<name>.py`` as a module (its workloads, methods and checks; ``main`` is not run).

    Loaded by path as ``bench_<name>``, so ``bench/models.py`` neither shadows nor is shadowed by the
    top-level ``models/`` package whatever ``sys.path`` holds. Loaded once per process.
    """
    key = f"bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[key]
        raise
    return module


def machine(device: str) -> dict:
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def machine_tag(info: dict) -> str:
    name = info.get("gpu") or f"cpu{info['threads']}t"
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").lower()


def time_ms(fn: Callable[[], object], min_run_time: float = 0.5) -> float:
    """Median milliseconds of ``fn()`` (warmed up once first)."""
    fn()
    # Timer defaults to one thread; time with all the threads torch would use, as machine() reports.
    m = tbench.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()).blocked_autorange(
        min_run_time=min_run_time)
    return m.median * 1e3


def interleaved_ms(timed: dict, rounds: int, min_run_time: float = 0.5, failed: dict | None = None,
                   slice_s: float = SLICE_S, clock: Callable[[], float] = time.perf_counter) -> dict:
    """Milliseconds per call of each ``key: (fn, context)`` of ``timed``, measured side by side.

    Every fn is warmed up once, then timed in short slices (``slice_s``, or one call when a call is
    longer) that alternate between the fns, the order rotating each slice, until each has had
    ``rounds * min_run_time`` seconds and at least ``rounds`` slices; the result is the mean of the
    middle half of its slices (``middle_mean``). The machine we measure on drifts by up to ~1.5x over
    seconds: with a slice of ~20 ms every fn sees the same drift, where a half-second block each
    (``time_ms`` per method in turn) let one method of a row catch a fast second and another a slow
    one. A context (a callable returning a context manager, or None) is entered around each of its
    fn's slices.

    ``clock``: ``time.perf_counter`` (wall) or, for one thread, ``time.thread_time`` (CPU time of this
    thread: time descheduled on a loaded machine is not counted). CUDA is synchronised around slices.

    ``failed``: a dict to collect ``key: exception`` of fns that raise; such a key takes no further
    slices and is left out of the result, and the others go on. None: exceptions propagate."""
    dropped = failed if failed is not None else {}

    def attempt(key, n: int, warm: bool = False):
        """Seconds per call of a slice of ``n`` calls, or None once the key has failed."""
        try:
            return _timed_slice(timed[key], n, clock, warm)
        except Exception as e:  # noqa: BLE001 - recorded for the caller, only when asked
            if failed is None:
                raise
            failed[key] = e
            return None

    calls, budget = {}, rounds * min_run_time
    for key in timed:
        per_call = attempt(key, 1, warm=True)
        if per_call is not None:
            calls[key] = max(1, int(slice_s / max(per_call, 1e-9)))
    times = {key: [] for key in calls}
    spent = dict.fromkeys(calls, 0.0)

    def pending(key):
        return key not in dropped and (spent[key] < budget or len(times[key]) < rounds)

    keys, turn = list(calls), 0
    while any(pending(k) for k in keys):
        for key in keys[turn % len(keys):] + keys[:turn % len(keys)]:
            per_call = attempt(key, calls[key]) if pending(key) else None
            if per_call is not None:
                times[key].append(per_call * 1e3)
                spent[key] += per_call * calls[key]
        turn += 1
    return {key: middle_mean(ts) for key, ts in times.items() if ts and key not in dropped}


def middle_mean(values: list[float]) -> float:
    """Mean of the middle half (the interquartile mean); the median below four values. It drops
    the odd descheduled slice like a median does, but where the machine flips between two speeds it
    averages them as every method saw them, where a median jumps to whichever speed has one more
    slice."""
    if len(values) < 4:
        return statistics.median(values)
    v, cut = sorted(values), len(values) // 4
    return statistics.fmean(v[cut:len(v) - cut])


def _timed_slice(entry, calls: int, clock, warm: bool = False) -> float:
    """Seconds per call of ``calls`` back-to-back calls of ``entry = (fn, context)`` (after one
    untimed call when ``warm``)."""
    fn, context = entry
    with context() if context is not None else contextlib.nullcontext():
        if warm:
            fn()
        _sync()
        t0 = clock()
        for _ in range(calls):
            fn()
        _sync()
        return (clock() - t0) / calls


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def add_timing_args(ap, rounds: int = 3, what: str = "timing") -> None:
    """``--min-run-time`` and ``--rounds``, the budget of ``interleaved_ms``, as the table scripts
    take them (``what``: whose timing the rounds are, for the help text)."""
    ap.add_argument("--min-run-time", type=float, default=0.5,
                    help="seconds of timing per method and round (see --rounds)")
    ap.add_argument("--rounds", type=int, default=rounds,
                    help=f"{what}: each method gets rounds x --min-run-time s of alternating slices "
                         f"(harness.interleaved_ms)")


def interleaved_note(rounds: int, min_run_time: float, slice_s: float = SLICE_S) -> str:
    """How ``interleaved_ms`` timed a table, for the table's notes."""
    return (f"ms per call: mean of the middle half of alternating slices of ~{slice_s * 1e3:.0f} ms (or one "
            f"call when a call is longer), the methods of a row taking turns in rotating order, "
            f"{rounds * min_run_time:.1f} s and at least {rounds} slices per method, after one warm-up call "
            f"each; so the machine's speed drift over seconds hits every method of a row alike")


def load_note(before) -> str:
    """The machine load at the start of a run (``before``: ``os.getloadavg()`` then) and now, for a
    table's notes."""
    def fmt(avgs):
        return "/".join(f"{x:.2f}" for x in avgs)
    return (f"Machine load (1/5/15-min averages, {os.cpu_count()} cores) {fmt(before)} before, "
            f"{fmt(os.getloadavg())} after")


def interleaved_profile(fns: dict, calls: int, classify: Callable[[str], str | None]) -> dict:
    """Per-call self CPU times (ms) by category, op counts and profiled wall time of each fn of
    ``fns``, from ``torch.profiler``: ``calls`` profiled calls each, taking turns (one call per
    profiler session, the order rotating), so the machine's speed drift hits every fn alike, as in
    ``interleaved_ms``. Profiling the fns in blocks let two calls of the same aten kernel read up
    to ~30% apart on this machine (bench/results/attention_profile_2026-12-01-night_*).

    ``classify(event_key)`` names the category an event's self time goes to, or None to leave it
    out (wrappers whose work is their children's, non-op events such as autograd nodes). Returns
    ``{key: {"ms": {category: ms}, "counts": {event_key: calls per fn call}, "profiled_ms": ...,
    "outside_ms": ...}}``; ``counts`` covers every event, classified or not, and ``outside_ms`` is
    the profiled wall time minus the classified self times (Python, and the profiler's own cost)."""
    from torch.profiler import ProfilerActivity, profile

    acc = {key: {"ms": {}, "counts": {}, "profiled_ms": 0.0} for key in fns}
    for fn in fns.values():
        fn()
    keys = list(fns)
    for i in range(calls):
        for key in keys[i % len(keys):] + keys[:i % len(keys)]:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                fns[key]()
                wall = (time.perf_counter() - start) * 1e3
            a = acc[key]
            a["profiled_ms"] += wall / calls
            for e in prof.key_averages():
                a["counts"][e.key] = a["counts"].get(e.key, 0.0) + e.count / calls
                category = classify(e.key)
                if category is not None:
                    a["ms"][category] = a["ms"].get(category, 0.0) + e.self_cpu_time_total / 1e3 / calls
    for a in acc.values():
        a["outside_ms"] = max(0.0, a["profiled_ms"] - sum(a["ms"].values()))
    return acc


def peak_memory_mb(fn: Callable[[], object], device: str = "cpu") -> float:
    """MiB that one ``fn()`` call adds, at its peak, over what was live just before it.

    CUDA: ``torch.cuda.max_memory_allocated`` (tensor bytes held by the caching allocator). CPU:
    tracemalloc cannot see torch's allocations, so this is the process's peak resident set minus the
    resident set before the call: the Linux ``VmHWM`` counter reset through ``/proc/self/clear_refs``
    where allowed, else ``getrusage`` ``ru_maxrss``, whose high-water mark cannot be reset (a call
    that stays under an earlier peak then reads too low). A CPU figure means something only in a fresh
    process whose malloc hands freed blocks back to the OS: run it through ``run_isolated``.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    if _reset_hwm():
        base = _proc_status_kb("VmRSS")
        fn()
        return (_proc_status_kb("VmHWM") - base) / 1024
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def cpu_memory_method() -> str:
    """Which counter ``peak_memory_mb`` reads on CPU here (for a result file's notes)."""
    return "VmHWM (reset via /proc/self/clear_refs)" if _reset_hwm() else "getrusage ru_maxrss"


def run_isolated(args: list[str], timeout: float | None = None) -> dict:
    """Run ``python *args`` in a fresh process and return the JSON object it printed last on stdout.

    ``MALLOC_MMAP_THRESHOLD_`` is lowered so that glibc serves large blocks by mmap and returns them
    on free: the resident set then follows live memory, as ``peak_memory_mb`` needs on CPU.
    """
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))}
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"isolated run failed (rc {proc.returncode}): {tail}")
    return json.loads(lines[-1])


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def write(name: str, info: dict, rows: list[dict], columns: list[str], notes: str = "") -> tuple[Path, Path]:
    """Write ``rows`` as JSON and as a Markdown table; returns both paths."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"{name}_{machine_tag(info)}"
    stem.with_suffix(".json").write_text(json.dumps({"machine": info, "rows": rows, "notes": notes}, indent=2))
    lines = [f"# {name} on {info.get('gpu') or 'CPU (' + str(info['threads']) + ' threads)'}", "",
             f"torch {info['torch']}, triton {info['triton']}, {info['date']}. {notes}", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return stem.with_suffix(".json"), stem.with_suffix(".md")


def plot_bars(name: str, info: dict, rows: list[dict], group: str, series: str, metrics: list[str],
              ylabel: str = "") -> Path | None:
    """Grouped bar chart, one panel per metric: x = ``row[group]``, one bar per ``row[series]``.

    Non-numeric cells (``"n/a"``, None) are gaps; a series with no number at all is named under the
    chart instead. Writes ``bench/results/<name>_<machine>.png`` and returns its path, or None when
    matplotlib is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None

    def num(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    groups = list(dict.fromkeys(r[group] for r in rows))
    names = list(dict.fromkeys(r[series] for r in rows))
    shown = [s for s in names if any(num(r.get(m)) for r in rows if r[series] == s for m in metrics)]
    width = 0.8 / max(1, len(shown))
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6.0, 1.8 * len(groups) + 2), 3.2 * len(metrics)),
                             squeeze=False)
    for ax, metric in zip(axes[:, 0], metrics):
        for j, s in enumerate(shown):
            val = {r[group]: r.get(metric) for r in rows if r[series] == s}
            at = [i for i, g in enumerate(groups) if num(val.get(g))]
            ax.bar([i + (j - (len(shown) - 1) / 2) * width for i in at], [val[groups[i]] for i in at], width,
                   label=s, color=f"C{j}")
        ax.set_xticks(range(len(groups)), groups, fontsize=8)
        ax.set_title(metric, fontsize=10)
        ax.set_ylabel(ylabel)
        ax.grid(axis="y", alpha=0.3)
    handles = {}  # the first panel where a series has bars gives its legend entry
    for ax in axes[:, 0]:
        for h, lb in zip(*ax.get_legend_handles_labels()):
            if len(h) and lb not in handles:
                handles[lb] = h
    fig.legend([handles[s] for s in shown], shown, loc="lower center", ncol=min(len(shown), 5), fontsize=8)
    missing = [s for s in names if s not in shown]
    title = info.get("gpu") or f"CPU ({info['threads']} threads)"
    fig.suptitle(f"{name} on {title}, torch {info['torch']}" + (f"\nno data: {', '.join(missing)}" if missing else ""),
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}_{machine_tag(info)}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "" if v is None else str(v)
