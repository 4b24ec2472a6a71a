"""Where the time of one varlen_attention call goes on CPU, next to padded SDPA's, from the PyTorch
profiler: the equal-length workloads of ``bench/attention.py`` (a, c, e; d with ``--with-d``), where
both run the same aten kernel (``_scaled_dot_product_flash_attention_for_cpu`` and its backward)
on the same (B, N, H, D) layout, so what ours adds is visible as the other rows.

    python bench/attention_profile.py --threads 1     # writes bench/results/attention_profile_cpu1t.{json,md}

Per method and pass (forward under no_grad; forward + backward), per call, the profiled calls of
all methods and passes of a workload taking turns (so load drift hits them alike):
    time_ms       unprofiled, alternating slices (``harness.interleaved_ms``)
    kernel_ms     self time of the flash kernels (forward, backward)
    check_ms      self time of ``aten::sum`` and the scalar read-back (``aten::item``): our
                  finiteness check: of q and k in the forward of these non-causal workloads (v and
                  the output gradient are read only under causal or a window)
    other_ops_ms  self time of every other aten op (views, allocations, copies, fills)
    outside_ms    profiled wall time minus all op self times: Python (validation, backend choice,
                  the plan, autograd bookkeeping) plus the profiler's own cost, so larger than the
                  unprofiled difference
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

attention = harness.script("attention")

KERNELS = ("aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
CHECK = ("aten::sum", "aten::item", "aten::_local_scalar_dense")
# Ops whose self time is the sum of their children's: counting them would count those twice.
WRAPPERS = ("aten::scaled_dot_product_attention",)


def _category(key: str):
    if not key.startswith("aten::") or key in WRAPPERS:
        return None
    return "kernel_ms" if key in KERNELS else "check_ms" if key in CHECK else "other_ops_ms"


def profiled(fns: dict, calls: int) -> dict:
    """Per-call self times (ms) by category, and the profiled wall time per call, of each fn of
    ``fns``: ``calls`` profiled calls each, taking turns (``harness.interleaved_profile``)."""
    out = {}
    for key, p in harness.interleaved_profile(fns, calls, _category).items():
        row = {c: p["ms"].get(c, 0.0) for c in ("kernel_ms", "check_ms", "other_ops_ms")}
        out[key] = {**row, "check_sums": p["counts"].get("aten::sum", 0.0), "profiled_ms": p["profiled_ms"],
                    "outside_ms": p["outside_ms"]}
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--calls", type=int, default=10, help="profiled calls per method and pass")
    harness.add_timing_args(p, what="unprofiled timing")
    p.add_argument("--with-d", action="store_true", help="also workload d (2 x 3136 tokens; slow)")
    p.add_argument("--tag", default=None, help="result file name: attention_profile_<tag>_<machine>")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    keys = ["a", "c", "e"] + (["d"] if args.with_d else [])
    all_work = attention.workloads(1 / 16, 64)
    rows = []
    for key in keys:
        lens, head_dim = all_work[key]
        w = attention.make_work(lens, 6, head_dim, "cpu", torch.float32)
        ref = attention.reference(w)
        timed, passes = {}, {}
        for name, make in (("varlen_torch", attention.varlen("torch")), ("sdpa_padded", attention.sdpa_padded())):
            row, fns = attention.bench_method(make, w, ref, attention.TOLERANCE[torch.float32])
            if set(fns) != {"fwd_ms", "fwdbwd_ms"}:
                raise RuntimeError(f"{name} on workload {key} did not run or disagree: {row.get('note')}")
            for pass_, fn in fns.items():
                timed[(name, pass_)] = (fn, None)
                passes[(name, pass_)] = fn
        times = harness.interleaved_ms(timed, args.rounds, args.min_run_time)
        profiles = profiled(passes, args.calls)
        for (name, pass_) in passes:
            rows.append({"workload": key, "shape": w.shape, "pass": pass_.removesuffix("_ms"), "method": name,
                         "time_ms": times[(name, pass_)], **profiles[(name, pass_)]})
        for pass_ in ("fwd", "fwdbwd"):
            ours, sdpa = (next(r for r in rows if r["workload"] == key and r["pass"] == pass_ and r["method"] == m)
                          for m in ("varlen_torch", "sdpa_padded"))
            ours["speedup_vs_sdpa"] = sdpa["time_ms"] / ours["time_ms"]
    info = harness.machine("cpu")
    notes = (f"{harness.load_note(load_before)}. float32, 6 heads, CPU sizes of "
             f"bench/attention.py. time_ms: unprofiled, {harness.interleaved_note(args.rounds, args.min_run_time)}; "
             f"the other "
             f"columns: torch.profiler self CPU time per call over {args.calls} calls of each method and pass, "
             f"taking turns (see the script's docstring); check_sums = aten::sum calls per call (ours: q and k, "
             f"in the forward; non-causal attention reads neither v nor the output gradient). speedup_vs_sdpa = "
             f"SDPA time_ms / ours (> 1 is ours faster). CPU timings.")
    cols = ["workload", "shape", "pass", "method", "time_ms", "speedup_vs_sdpa", "kernel_ms", "check_ms",
            "check_sums", "other_ops_ms", "outside_ms", "profiled_ms"]
    name = "attention_profile" + (f"_{args.tag}" if args.tag else "")
    paths = harness.write(name, info, rows, cols, notes)
    print(harness.table(rows, cols))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
