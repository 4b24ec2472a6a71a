"""Sub-network forward+backward through ``elastic_linear`` against (a) a dense standalone
``nn.Linear`` of the sub-network's shape and (b) copy-slicing the shared weight (what OFA and ViTAS
do: ``weight[:o, :i].contiguous()``, or an index gather for wrapped/cyclic ranges).

    python bench/elastic.py                # CPU, torch backend
    python bench/elastic.py --device cuda  # GPU: torch and triton backends

Prints a table and writes bench/results/elastic_<machine>.{json,md}.
"""
from __future__ import annotations

import argparse
import sys
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


def bench_case(device, dtype, tokens, C_in, C_out, in_r, out_r, backend_list, min_run_time):
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
    row = {"tokens": tokens, "full": f"{C_out}x{C_in}", "sub": f"{o_w}x{i_w}",
           "ranges": "wrapped" if wraps else ("first-k" if in_r[0] == out_r[0] == 0 else "offset"),
           "dense_ms": harness.time_ms(fwd_bwd(dense, list(dense.parameters()), x, dy), min_run_time),
           "copy_slice_ms": harness.time_ms(fwd_bwd(copy_slice, [w, b], x, dy), min_run_time)}
    for be in backend_list:
        f = lambda x, be=be: ak.elastic_linear(x, w, b, in_r, out_r, backend=be)  # noqa: E731
        t = harness.time_ms(fwd_bwd(f, [w, b], x, dy), min_run_time)
        row[f"elastic_{be}_ms"] = t
        row[f"{be}_vs_dense"] = t / row["dense_ms"]
        row[f"{be}_vs_copy"] = t / row["copy_slice_ms"]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32|float16|bfloat16 (default: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--tokens", type=int, default=None, help="rows per call (default 8x197 CPU, 64x197 GPU)")
    ap.add_argument("--dim", type=int, default=384, help="supernet embed dim; the layer is (4*dim, dim)")
    ap.add_argument("--backends", default=None, help="comma list (default: what runs here, interpreter excluded)")
    ap.add_argument("--min-run-time", type=float, default=0.5, help="seconds of timing per measurement")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)

    device = args.device
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    tokens = args.tokens or (8 * 197 if device == "cpu" else 64 * 197)
    if args.backends:
        backend_list = args.backends.split(",")
    else:  # interpreted Triton is a correctness tool, not something to time
        backend_list = [b for b in backends.available("elastic_linear", torch.device(device), dtype)
                        if not (b == "triton" and device == "cpu")]
    C_in, C_out = args.dim, 4 * args.dim
    rows = []
    for frac in (0.5, 0.75, 1.0):
        i_w, o_w = round(C_in * frac), round(C_out * frac)
        cases = [((0, i_w), (0, o_w))]
        if frac < 1.0:  # cyclic sharing: a range that wraps past the end in both dims
            cases.append(((C_in - i_w // 2, i_w), (C_out - o_w // 3, o_w)))
        for in_r, out_r in cases:
            rows.append(bench_case(device, dtype, tokens, C_in, C_out, in_r, out_r, backend_list, args.min_run_time))
            print(harness.table(rows[-1:], list(rows[-1])), flush=True)
    info = harness.machine(device)
    info["dtype"] = str(dtype).replace("torch.", "")
    cols = list(rows[0])
    print("\n" + harness.table(rows, cols))
    if not args.no_write:
        notes = (f"Forward+backward of one sub-network linear layer, {info['dtype']}, median ms. "
                 f"*_vs_dense / *_vs_copy: elastic time over the baseline's (lower is better).")
        paths = harness.write("elastic", info, rows, cols, notes)
        print("wrote", *paths)


if __name__ == "__main__":
    main()
