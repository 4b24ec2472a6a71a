"""Where the time of a first-k elastic layer goes on CPU, next to the dense layer's, from the PyTorch
profiler: the first-k rows of ``bench/elastic.py`` (forward+backward of one sub-network linear layer
or LayerNorm, the same methods and inputs), where ours and dense run the same aten kernels on the
same shapes, so what ours adds is visible as the other columns.

    python bench/elastic_profile.py --threads 1   # writes bench/results/elastic_profile_cpu1t.{json,md}

Per method, per call, the profiled calls of a row's methods taking turns
(``harness.interleaved_profile``):
    time_ms        unprofiled, alternating slices (``harness.interleaved_ms``)
    compute_ms     self time of the layer's own kernels: mm/addmm (linear), native_layer_norm and
                   its backward, and the bias gradient's sum
    fill_copy_ms   self time of zero-fills, copies and fresh buffers (fill_, zero_, copy_, zeros,
                   empty, slice_backward, as_strided_backward...): the full-size gradients of the
                   shared parameters, and every method's own buffers (addmm copies the bias into
                   its output first)
    views_ms       self time of view ops (slice, as_strided, t, view, transpose, detach...)
    other_ops_ms   self time of every other aten op
    outside_ms     profiled wall time minus all op self times: Python, the autograd engine and its
                   nodes, and the profiler's own cost, so larger than the unprofiled difference
    nodes          autograd nodes run per call (backward functions, Python ones included, and
                   AccumulateGrad)
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

elastic = harness.script("elastic")

COMPUTE = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::native_layer_norm", "aten::native_layer_norm_backward",
           "aten::sum")
FILL = ("aten::fill_", "aten::zero_", "aten::copy_", "aten::zeros", "aten::zeros_like", "aten::empty",
        "aten::empty_like", "aten::empty_strided", "aten::new_zeros", "aten::new_empty_strided",
        "aten::slice_backward", "aten::as_strided_backward", "aten::resize_")
VIEWS = ("aten::slice", "aten::as_strided", "aten::t", "aten::view", "aten::transpose", "aten::detach",
         "aten::alias", "aten::narrow", "aten::reshape", "aten::_reshape_alias", "aten::expand",
         "aten::unsqueeze", "aten::squeeze", "aten::permute", "aten::numpy_T", "aten::matrix_H")
# Ops whose self time is their children's (they only dispatch): counting them would count twice.
WRAPPERS = ("aten::linear", "aten::layer_norm", "aten::matmul")
COLUMNS = ("compute_ms", "fill_copy_ms", "views_ms", "other_ops_ms")


def category(key: str):
    if not key.startswith("aten::") or key in WRAPPERS:
        return None
    return ("compute_ms" if key in COMPUTE else "fill_copy_ms" if key in FILL else "views_ms" if key in VIEWS
            else "other_ops_ms")


def is_node(key: str) -> bool:
    """An autograd node's own event (not the engine's ``evaluate_function`` wrapper around it)."""
    return not key.startswith("autograd::") and key.endswith(("Backward", "Backward0", "Backward1",
                                                               "AccumulateGrad"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--calls", type=int, default=30, help="profiled calls per method")
    harness.add_timing_args(p, rounds=6, what="unprofiled timing")
    p.add_argument("--dim", type=int, default=384, help="supernet embed dim, as bench/elastic.py's")
    p.add_argument("--tokens", type=int, default=8 * 197, help="rows per call, as bench/elastic.py's CPU default")
    p.add_argument("--tag", default=None, help="result file name: elastic_profile_<tag>_<machine>")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    rows = []
    for case in elastic.cases(args.dim):
        ranges = case[1:]
        if any(r[0] != 0 for r in ranges) or all(r[1] == full for r, full in zip(ranges, (args.dim, 4 * args.dim))):
            continue  # first-k rows below full width: the ones the goal compares with dense
        desc, methods = elastic.methods_for(case, "cpu", torch.float32, args.tokens, args.dim, ["torch"])
        methods = {k: methods[k] for k in ("dense", "dense_full_grads", "elastic_torch")}
        times = harness.interleaved_ms({k: (fn, None) for k, fn in methods.items()}, args.rounds, args.min_run_time)
        profiles = harness.interleaved_profile(methods, args.calls, category)
        for name, prof in profiles.items():
            rows.append({**desc, "method": name, "time_ms": times[name],
                         "vs_dense": times[name] / times["dense"],
                         **{c: prof["ms"].get(c, 0.0) for c in COLUMNS}, "outside_ms": prof["outside_ms"],
                         "profiled_ms": prof["profiled_ms"],
                         "nodes": sum(n for k, n in prof["counts"].items() if is_node(k))})
        print(harness.table(rows[-3:], list(rows[-1])), flush=True)
    info = harness.machine("cpu")
    notes = (f"{harness.load_note(load_before)}. float32, the first-k rows of "
             f"bench/elastic.py below full width. time_ms: unprofiled, wall clock, "
             f"{harness.interleaved_note(args.rounds, args.min_run_time)}; vs_dense = time_ms over dense's; "
             f"dense_full_grads = dense plus zero-filled full-size buffers of the shared parameters (see "
             f"bench/elastic.py); the other columns: torch.profiler self CPU time per call over {args.calls} "
             f"calls of each method, taking turns (see the script's docstring). CPU timings.")
    cols = ["op", "sub", "method", "time_ms", "vs_dense", *COLUMNS, "outside_ms", "profiled_ms", "nodes"]
    name = "elastic_profile" + (f"_{args.tag}" if args.tag else "")
    paths = harness.write(name, info, rows, cols, notes)
    print(harness.table(rows, cols))
    print("wrote", *paths)


if __name__ == "__main__":
    main()
