"""Sub-network forward+backward through ``elastic_linear`` / ``elastic_layer_norm`` against (a) a
dense standalone ``nn.Linear`` / ``nn.LayerNorm`` of the sub-network's shape and (b) copy-slicing
the shared parameters (what OFA and ViTAS do: ``weight[:o, :i].contiguous()``, or an index gather
for wrapped/cyclic ranges), and (c) a floor: the dense layer plus the full-size parameter
gradients that autograd needs from any op on the shared parameters (``with_full_size_grads``).
Where a first-k row misses dense, ``bench/elastic_profile.py`` shows where the time goes.

    python bench/elastic.py                    # CPU, torch backend
    python bench/elastic.py --threads 1 --timer thread   # one thread, thread CPU time (loaded machine)
    python bench/elastic.py --device cuda      # GPU: torch and triton backends

Each row times its methods side by side (``harness.interleaved_ms``: alternating ~20 ms slices,
mean of the middle half), so a load change during the run hits every method alike; the machine load
(``os.getloadavg``) before and after goes into the table header. Prints a table and writes
bench/results/elastic_<tag>_<machine>.{json,md} (tag: the date by default, so earlier results stay).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import asvit_kernels as ak  # noqa: E402
from asvit_kernels import backends  # noqa: E402


def fwd_bwd(f, params, x, dy):
    def step():
        for p in params:
            p.grad = None
        f(x).backward(dy)
    return step


def with_full_size_grads(step, shared):
    """``step`` (the dense layer's) plus a zero-filled buffer of each shared parameter's full shape,
    held until the next call as a ``.grad`` is: what autograd's full-size gradients cost on top of
    the dense layer. Any op that takes the shared parameters pays this: autograd hands a parameter
    a gradient of its own size, and with ``.grad = None`` each step that is a fresh full-size buffer
    every step. A fused op would write the block straight into that buffer and skip dense's own
    block gradient, so this floor is an upper estimate of the least such an op pays."""
    held = []

    def floor():
        held.clear()
        held.extend(torch.zeros_like(p) for p in shared)
        step()
    return floor


def timed_rows(row: dict, methods: dict, clock, min_run_time: float, rounds: int, backend_list) -> dict:
    """Each method's ms, timed side by side (``harness.interleaved_ms``); ratios against dense,
    copy-slicing and the full-size-gradient floor."""
    times = harness.interleaved_ms({k: (fn, None) for k, fn in methods.items()}, rounds, min_run_time, clock=clock)
    for k, ms in times.items():
        row[f"{k}_ms"] = ms
    for be in backend_list:
        t = row[f"elastic_{be}_ms"]
        row[f"{be}_vs_dense"] = t / row["dense_ms"]
        row[f"{be}_vs_copy"] = t / row["copy_slice_ms"]
        row[f"{be}_vs_floor"] = t / row["dense_full_grads_ms"]
    return row


def kind(offsets_zero: bool, wraps: bool) -> str:
    return "wrapped" if wraps else ("first-k" if offsets_zero else "offset")


def linear_methods(device, dtype, tokens, C_in, C_out, in_r, out_r, backend_list) -> tuple[dict, dict]:
    """(row, methods): the row's description and a forward+backward step per method."""
    g = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(C_out, C_in, generator=g).to(device, dtype).requires_grad_()
    b = torch.randn(C_out, generator=g).to(device, dtype).requires_grad_()
    i_w, o_w = in_r[1], out_r[1]
    x = torch.randn(tokens, i_w, generator=g).to(device, dtype)
    dy = torch.randn(tokens, o_w, generator=g).to(device, dtype)
    dense = torch.nn.Linear(i_w, o_w, device=device, dtype=dtype)
    wraps = in_r[0] + i_w > C_in or out_r[0] + o_w > C_out
    if wraps:  # a copy-slicing codebase has to gather the cyclic rows/columns
        in_idx = ak.channel_indices(in_r, C_in, device)
        out_idx = ak.channel_indices(out_r, C_out, device)
        copy_slice = lambda x: F.linear(x, w[out_idx][:, in_idx], b[out_idx])  # noqa: E731
    else:
        copy_slice = lambda x: F.linear(  # noqa: E731
            x, w[out_r[0]:out_r[0] + o_w, in_r[0]:in_r[0] + i_w].contiguous(), b[out_r[0]:out_r[0] + o_w])
    dense_step = fwd_bwd(dense, list(dense.parameters()), x, dy)
    methods = {"dense": dense_step, "dense_full_grads": with_full_size_grads(dense_step, [w, b]),
               "copy_slice": fwd_bwd(copy_slice, [w, b], x, dy)}
    for be in backend_list:
        f = lambda x, be=be: ak.elastic_linear(x, w, b, in_r, out_r, backend=be)  # noqa: E731
        methods[f"elastic_{be}"] = fwd_bwd(f, [w, b], x, dy)
    row = {"op": "linear", "tokens": tokens, "full": f"{C_out}x{C_in}", "sub": f"{o_w}x{i_w}",
           "ranges": kind(in_r[0] == out_r[0] == 0, wraps)}
    return row, methods


def layer_norm_methods(device, dtype, tokens, C, r, backend_list) -> tuple[dict, dict]:
    """(row, methods), as ``linear_methods``."""
    g = torch.Generator(device="cpu").manual_seed(0)
    w = torch.randn(C, generator=g).to(device, dtype).requires_grad_()
    b = torch.randn(C, generator=g).to(device, dtype).requires_grad_()
    x = torch.randn(tokens, r[1], generator=g).to(device, dtype)
    dy = torch.randn(tokens, r[1], generator=g).to(device, dtype)
    dense = torch.nn.LayerNorm(r[1], device=device, dtype=dtype)
    idx = ak.channel_indices(r, C, device)
    copy_slice = lambda x: F.layer_norm(x, (r[1],), w[idx], b[idx])  # noqa: E731
    dense_step = fwd_bwd(dense, list(dense.parameters()), x, dy)
    methods = {"dense": dense_step, "dense_full_grads": with_full_size_grads(dense_step, [w, b]),
               "copy_slice": fwd_bwd(copy_slice, [w, b], x, dy)}
    for be in backend_list:
        f = lambda x, be=be: ak.elastic_layer_norm(x, w, b, r, backend=be)  # noqa: E731
        methods[f"elastic_{be}"] = fwd_bwd(f, [w, b], x, dy)
    row = {"op": "layer_norm", "tokens": tokens, "full": f"{C}", "sub": f"{r[1]}",
           "ranges": kind(r[0] == 0, r[0] + r[1] > C)}
    return row, methods


def cases(dim: int) -> list[tuple]:
    """Every row of the table, in order: ("linear", in_range, out_range) or ("layer_norm", range),
    at 1/2, 3/4 and full width; first-k and, below full width, a range wrapping in both dims."""
    C_in, C_out = dim, 4 * dim
    out = []
    for frac in (0.5, 0.75, 1.0):
        i_w, o_w = round(C_in * frac), round(C_out * frac)
        out.append(("linear", (0, i_w), (0, o_w)))
        if frac < 1.0:  # cyclic sharing: a range that wraps past the end in both dims
            out.append(("linear", (C_in - i_w // 2, i_w), (C_out - o_w // 3, o_w)))
        out.append(("layer_norm", (0, i_w)))
        if frac < 1.0:
            out.append(("layer_norm", (C_in - i_w // 2, i_w)))
    return out


def methods_for(case: tuple, device, dtype, tokens: int, dim: int, backend_list) -> tuple[dict, dict]:
    """(row, methods) of one of ``cases(dim)``."""
    if case[0] == "linear":
        return linear_methods(device, dtype, tokens, dim, 4 * dim, case[1], case[2], backend_list)
    return layer_norm_methods(device, dtype, tokens, dim, case[1], backend_list)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32|float16|bfloat16 (default: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--tokens", type=int, default=None, help="rows per call (default 8x197 CPU, 64x197 GPU)")
    ap.add_argument("--dim", type=int, default=384, help="supernet embed dim; the layer is (4*dim, dim)")
    ap.add_argument("--backends", default=None, help="comma list (default: what runs here, interpreter excluded)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--timer", choices=("wall", "thread"), default="wall",
                    help="wall: wall-clock time; thread: this thread's CPU time (one thread; a loaded machine's "
                         "descheduled time is not counted)")
    harness.add_timing_args(ap)
    ap.add_argument("--tag", default=time.strftime("%Y-%m-%d"), help="result file tag (default today's date)")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.timer == "thread" and (args.device != "cpu" or torch.get_num_threads() != 1):
        ap.error("--timer thread measures one CPU thread: use it with --device cpu --threads 1")
    clock = time.thread_time if args.timer == "thread" else time.perf_counter
    device = args.device
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    tokens = args.tokens or (8 * 197 if device == "cpu" else 64 * 197)
    if args.backends:
        backend_list = args.backends.split(",")
    else:  # interpreted Triton is a correctness tool, not something to time
        backend_list = [b for b in backends.available("elastic_linear", torch.device(device), dtype)
                        if not (b == "triton" and device == "cpu")]
    load_before = os.getloadavg()
    rows = []
    for case in cases(args.dim):
        row, methods = methods_for(case, device, dtype, tokens, args.dim, backend_list)
        rows.append(timed_rows(row, methods, clock, args.min_run_time, args.rounds, backend_list))
        print(harness.table(rows[-1:], list(rows[-1])), flush=True)
    load_after = os.getloadavg()
    info = harness.machine(device)
    info["dtype"] = str(dtype).replace("torch.", "")
    info["load_before"], info["load_after"] = load_before, load_after
    cols = list(rows[0])
    print("\n" + harness.table(rows, cols))
    if not args.no_write:
        load = "/".join(f"{v:.1f}" for v in load_before) + " before, " + "/".join(f"{v:.1f}" for v in load_after)
        notes = (f"Machine load (1/5/15-min load average) {load} after, on {os.cpu_count()} cores; timer: "
                 f"{'wall clock' if args.timer == 'wall' else 'thread CPU time'}, "
                 f"{harness.interleaved_note(args.rounds, args.min_run_time)}. "
                 f"Forward+backward of one sub-network linear layer / "
                 f"LayerNorm, {info['dtype']}, ms. *_vs_dense / *_vs_copy: elastic time over the baseline's "
                 f"(lower is better; goals: <= 1.05 vs dense on first-k, <= 1.0 vs copy on wrapped). "
                 f"dense_full_grads: dense plus a zero-filled buffer of each shared parameter's full shape, "
                 f"held as a .grad is (the full-size gradients any op on the shared parameters hands "
                 f"autograd; an upper estimate of the floor); *_vs_floor: elastic time over it.")
        paths = harness.write(f"elastic_{args.tag}", info, rows, cols, notes)
        print("wrote", *paths)


if __name__ == "__main__":
    main()
