"""Attention over variable token counts: ``varlen_attention`` (packed tokens, flash-attn varlen
semantics) against padded SDPA with a key-padding mask, nested-tensor SDPA, compiled FlexAttention
with a document mask, and flash-attn / xformers when installed, on ViT-shaped workloads:

    a  256 images x 197 tokens (ViT/DeiT, 224 px, patch 16)
    b  256 images, lengths cycling 50, 197, 257 (mixed resolutions, token dropping)
    c  64 images x 16 windows = 1024 windows of 49 tokens (Swin, 7x7 windows)
    d  32 sequences of 3136 tokens (56x56 stage-1 maps)
    e  workload a with head dim 45 (a is its head-dim-64 point)

    python bench/attention.py                  # CPU: 1/16 of the batch counts (d: 2), fp32
    python bench/attention.py --device cuda    # GPU: full size, bf16, every backend that runs

    python bench/attention.py --useful-work    # only the Triton tiles' useful-work fractions (a count)

Every method's output and input gradients are first checked against
``varlen_attention(..., backend="torch")``; a method that fails to run or disagrees is recorded as
"n/a: <reason>" and not timed. Prints a table and writes bench/results/attention_<machine>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import asvit_kernels as ak  # noqa: E402
from asvit_kernels import backends  # noqa: E402

HAVE_VARLEN = hasattr(ak, "varlen_attention")
# Forward: QK^T and PV, 2 * Lq * Lk * D each per head. Backward: 2.5x forward (dV, dP, dQ, dK and
# the recomputed QK^T: the flash-attn convention), so forward+backward counts 3.5x forward.
FWD_BWD_FLOP_FACTOR = 3.5
TOLERANCE = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}  # x max(1, max |ref|)

warnings.filterwarnings("ignore", message=".*nested tensors is in prototype.*")


# ---------------------------------------------------------------------------------------- workloads

def workloads(scale: float, head_dim: int) -> dict[str, tuple[list[int], int]]:
    """key -> (sequence lengths, head dim); ``scale`` shrinks the number of sequences."""
    def n(count):
        return max(1, round(count * scale))
    return {"a": ([197] * n(256), head_dim),
            "b": ([(50, 197, 257)[i % 3] for i in range(n(256))], head_dim),
            "c": ([49] * n(1024), head_dim),
            "d": ([3136] * n(32), head_dim),
            "e": ([197] * n(256), 45)}


def make_work(lens: list[int], heads: int, head_dim: int, device: str, dtype: torch.dtype):
    """Packed q, k, v and an output gradient (total, H, D), cu_seqlens and a padding mask."""
    g = torch.Generator().manual_seed(0)
    total = sum(lens)
    q, k, v, dout = (torch.randn(total, heads, head_dim, generator=g).to(device, dtype) for _ in range(4))
    lens_t = torch.tensor(lens, device=device)
    distinct = sorted(set(lens))
    shape = f"{len(lens)}x{lens[0]}" if len(distinct) == 1 else f"{len(lens)}x({'/'.join(map(str, distinct))})"
    return SimpleNamespace(
        lens=lens, q=q, k=k, v=v, dout=dout, max_len=max(lens), shape=f"{shape} D{head_dim}",
        cu=F.pad(lens_t.cumsum(0), (1, 0)).to(torch.int32),
        pad_mask=torch.arange(max(lens), device=device) < lens_t[:, None],      # (B, Nmax), True = token
        flops=4 * sum(n * n for n in lens) * heads * head_dim)


def reference(w):
    """Output and (dq, dk, dv) for ``w.dout`` from varlen_attention(backend="torch"), packed."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (w.q, w.k, w.v))
    if HAVE_VARLEN:
        out = ak.varlen_attention(q, k, v, w.cu, w.cu, w.max_len, w.max_len, backend="torch")
    else:  # until the op lands: one SDPA call per sequence
        bounds = w.cu.tolist()
        out = torch.cat([F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v))).transpose(0, 1)
                         for a, b in zip(bounds[:-1], bounds[1:])])
    return out.detach(), torch.autograd.grad(out, (q, k, v), w.dout)


def useful_work_fraction(lens: list[int], head_dim: int, dtype: torch.dtype, arch: int, tiling=None) -> float:
    """Useful score entries / score entries the Triton kernels' tiles compute, forward + backward
    (fwd, dq and dk/dv), with the tiles and per-call tiling the launchers choose on ``arch``
    (``tiling``: force "packed" or "per_seq"). A count from the tile sizes, not a timing."""
    from asvit_kernels.triton import attention_config as ac

    counts = {}
    for kernel in ("fwd", "dq", "dkdv"):
        cfg = ac.attention_config(dtype, head_dim, arch, kernel)
        rows, other = (cfg.block_n, cfg.block_m) if kernel == "dkdv" else (cfg.block_m, cfg.block_n)
        mode = tiling or ac.choose_tiling(sum(lens), sum(lens), len(lens), max(lens), max(lens), rows, other)
        n = ac.computed_score_entries(lens, lens, cfg.block_m, cfg.block_n, mode)
        counts[kernel] = n["dkdv" if kernel == "dkdv" else "fwd"]
        counts["useful"] = n["useful"]
    return 3 * counts["useful"] / (counts["fwd"] + counts["dq"] + counts["dkdv"])


USEFUL_ARCHS = (80, 90)


# ------------------------------------------------------------------------------------------ methods

class Method(NamedTuple):
    attn: Callable                                 # (q, k, v) in the method's layout -> output, same layout
    native: Callable = lambda x: x                 # packed (total, H, D) -> the method's layout
    packed: Callable = lambda x: x                 # the method's layout -> packed


def varlen(backend):
    def make(w):
        return Method(lambda q, k, v: ak.varlen_attention(q, k, v, w.cu, w.cu, w.max_len, w.max_len, backend=backend))
    return make


def sdpa_padded(sdpa_backend=None):
    """(B, H, Nmax, D) SDPA; a key-padding mask only when lengths differ (else there is no padding)."""
    def make(w):
        B, N = w.pad_mask.shape
        mask = None if len(set(w.lens)) == 1 else w.pad_mask[:, None, None, :]
        ctx = (lambda: torch.nn.attention.sdpa_kernel(sdpa_backend)) if sdpa_backend else contextlib.nullcontext

        def native(x):  # (B, Nmax, H, D), zeros in the padding, as a ViT's qkv projection leaves it
            out = x.new_zeros(B, N, *x.shape[1:])
            out[w.pad_mask] = x
            return out

        def attn(q, k, v):
            with ctx():
                o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                   attn_mask=mask)
            return o.transpose(1, 2)
        return Method(attn, native, lambda x: x[w.pad_mask])
    return make


def sdpa_nested(w):
    offsets = w.cu.long()

    def attn(q, k, v):
        q, k, v = (torch.nested.nested_tensor_from_jagged(x, offsets).transpose(1, 2) for x in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).values()
    return Method(attn)


def flex_compiled(w):
    """torch.compile(flex_attention) over the whole packed sequence with a block-diagonal mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    # A fresh compile per workload: once a compiled call raises (FlexAttention has no CPU backward),
    # dynamo runs flex_attention eagerly from then on, which would slow every later forward.
    torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False)
    device, total = w.q.device, w.q.shape[0]
    doc = torch.repeat_interleave(torch.arange(len(w.lens), device=device), torch.tensor(w.lens, device=device))
    mask = create_block_mask(lambda b, h, qi, ki: doc[qi] == doc[ki], None, None, total, total, device=device)
    return Method(lambda q, k, v: flex(q, k, v, block_mask=mask),
                  native=lambda x: x.transpose(0, 1).unsqueeze(0).contiguous(),   # (1, H, total, D)
                  packed=lambda x: x[0].transpose(0, 1))


def flash_attn_varlen(w):
    from flash_attn import flash_attn_varlen_func
    return Method(lambda q, k, v: flash_attn_varlen_func(q, k, v, w.cu, w.cu, w.max_len, w.max_len))


def xformers_blockdiag(w):
    from xformers.ops import fmha
    bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(w.lens)
    return Method(lambda q, k, v: fmha.memory_efficient_attention(q, k, v, attn_bias=bias),
                  native=lambda x: x.unsqueeze(0), packed=lambda x: x[0])


def methods(device: str, varlen_backends: list[str]) -> dict[str, Callable]:
    ms = {f"varlen_{b}": varlen(b) for b in varlen_backends}
    if not HAVE_VARLEN:
        ms["varlen"] = None
    if device == "cuda":
        from torch.nn.attention import SDPBackend
        for name in ("MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION"):
            ms[f"sdpa_padded_{name.split('_')[0].lower()}"] = sdpa_padded(getattr(SDPBackend, name))
    else:
        ms["sdpa_padded"] = sdpa_padded()
    ms.update(sdpa_nested=sdpa_nested, flex_compiled=flex_compiled, flash_attn_varlen=flash_attn_varlen,
              xformers_blockdiag=xformers_blockdiag)
    return ms


# -------------------------------------------------------------------------------------- measurement

def _reason(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0].split('. ')[0] if lines else ''}".strip()


def _max_diff(a, b) -> str:  # a string: the table's 3 decimals would show 0.000
    return f"{(a.float() - b.float()).abs().max().item():.1e}"


def bench_method(make, w, ref, tol) -> tuple[dict, dict]:
    """Check one method; return its row and its timed passes ({"fwd_ms": fn, "fwdbwd_ms": fn}, only
    those that ran and agreed): forward (no grad) and forward+backward (dq, dk, dv)."""
    out_ref, grads_ref = ref
    row, timed = {}, {}
    try:
        if make is None:
            raise RuntimeError("asvit_kernels has no varlen_attention yet")
        m = make(w)
        q, k, v = (m.native(x) for x in (w.q, w.k, w.v))
        with torch.no_grad():
            row["max_abs_diff"] = _max_diff(m.packed(m.attn(q, k, v)), out_ref)
        if not float(row["max_abs_diff"]) <= tol * max(1.0, out_ref.abs().max().item()):
            raise ValueError(f"output differs from varlen_attention(backend='torch') by {row['max_abs_diff']}")

        def fwd():
            with torch.no_grad():
                m.attn(q, k, v)
        timed["fwd_ms"] = fwd
    except Exception as e:  # noqa: BLE001 - a baseline that cannot run is a result, not a crash
        return {**row, "fwd_ms": "n/a", "fwdbwd_ms": "n/a", "note": f"n/a: {_reason(e)}"[:110],
                "error": repr(e)}, timed
    try:
        leaves = [m.native(x).detach().clone().requires_grad_() for x in (w.q, w.k, w.v)]
        dout = m.native(w.dout)

        def step():
            for p in leaves:
                p.grad = None
            m.attn(*leaves).backward(dout)
        step()
        if any(p.grad is None for p in leaves):
            raise ValueError("no gradient reached q, k or v")
        row["grad_max_abs_diff"] = max((_max_diff(m.packed(p.grad), g) for p, g in zip(leaves, grads_ref)), key=float)
        if not float(row["grad_max_abs_diff"]) <= tol * max(1.0, max(g.abs().max().item() for g in grads_ref)):
            raise ValueError(f"gradients differ from varlen_attention(backend='torch') by {row['grad_max_abs_diff']}")
        timed["fwdbwd_ms"] = step
    except Exception as e:  # noqa: BLE001
        row.update(fwdbwd_ms="n/a", note=f"fwd+bwd n/a: {_reason(e)}"[:110], error=repr(e))
    return row, timed


def print_useful_work(all_work: dict, keys: list[str], dtype: torch.dtype) -> None:
    """Per workload and arch: the useful-work fraction of packed tiles (the only tiling before
    per-call tiling), of per-sequence tiles, and of the launcher's choice."""
    rows = []
    for key in keys:
        lens, head_dim = all_work[key]
        for arch in USEFUL_ARCHS:
            rows.append({"workload": key, "arch": f"sm_{arch}", "sequences": len(lens),
                         **{t: useful_work_fraction(lens, head_dim, dtype, arch, t) for t in ("packed", "per_seq")},
                         "chosen": useful_work_fraction(lens, head_dim, dtype, arch)})
    print(harness.table(rows, ["workload", "arch", "sequences", "packed", "per_seq", "chosen"]))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32|float16|bfloat16 (default: fp32 on CPU, bf16 on GPU)")
    ap.add_argument("--scale", type=float, default=None,
                    help="fraction of the batch counts (default 1/16 on CPU, 1 on GPU)")
    ap.add_argument("--heads", type=int, default=6, help="attention heads (default 6, ViT-S)")
    ap.add_argument("--head-dim", type=int, default=64, help="head dim of workloads a-d (e uses 45)")
    ap.add_argument("--workloads", default="a,b,c,d,e", help="comma list of workload keys")
    ap.add_argument("--backends", default=None,
                    help="varlen_attention backends, comma list (default: what runs here, interpreter excluded)")
    harness.add_timing_args(ap)
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--useful-work", action="store_true",
                    help="print only the Triton tiles' useful-work fractions (packed, per-sequence, chosen)")
    args = ap.parse_args(argv)

    device = args.device
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    scale = args.scale if args.scale is not None else (1 / 16 if device == "cpu" else 1.0)
    if not HAVE_VARLEN:
        varlen_backends = []
    elif args.backends:
        varlen_backends = args.backends.split(",")
    else:  # interpreted Triton is a correctness tool, not something to time
        varlen_backends = [b for b in backends.available("varlen_attention", torch.device(device), dtype)
                           if not (b == "triton" and device == "cpu")]
    all_work = workloads(scale, args.head_dim)
    keys = args.workloads.split(",")
    if unknown := set(keys) - set(all_work):
        ap.error(f"unknown workloads {sorted(unknown)}; choose from {','.join(all_work)}")
    tol = TOLERANCE[dtype]
    useful_cols = [f"triton_useful_sm{a}" for a in USEFUL_ARCHS]
    cols = ["workload", "shape", "method", "fwd_ms", "fwd_tflops", "fwdbwd_ms", "fwdbwd_tflops",
            "max_abs_diff", "grad_max_abs_diff", *useful_cols, "note"]
    if args.useful_work:
        return print_useful_work(all_work, keys, dtype)
    rows = []
    for key in keys:
        lens, head_dim = all_work[key]
        w = make_work(lens, args.heads, head_dim, device, dtype)
        ref = reference(w)
        useful = {c: useful_work_fraction(lens, head_dim, dtype, a) for c, a in zip(useful_cols, USEFUL_ARCHS)}
        work_rows, timed = {}, {}
        for name, make in methods(device, varlen_backends).items():
            row, passes = bench_method(make, w, ref, tol)
            work_rows[name] = {"workload": key, "shape": w.shape, "method": name, **row, **useful}
            timed.update({(name, metric): (fn, None) for metric, fn in passes.items()})
        for (name, metric), ms in harness.interleaved_ms(timed, args.rounds, args.min_run_time).items():
            work_rows[name][metric] = ms
            work_rows[name][metric.replace("_ms", "_tflops")] = \
                (FWD_BWD_FLOP_FACTOR if metric == "fwdbwd_ms" else 1.0) * w.flops / ms / 1e9
        rows += work_rows.values()
        print(harness.table(list(work_rows.values()), cols), flush=True)
        del w, ref
        if device == "cuda":
            torch.cuda.empty_cache()

    info = harness.machine(device)
    info.update(dtype=str(dtype).replace("torch.", ""), scale=scale, heads=args.heads,
                varlen_backends=varlen_backends, varlen_attention=HAVE_VARLEN)
    print("\n" + harness.table(rows, cols))
    if not args.no_write:
        notes = (f"{info['dtype']}, {args.heads} heads, non-causal self-attention, batch counts x{scale:g} "
                 f"(a 256x197, b 256 cycling 50/197/257, c 1024x49, d 32x3136, e = a with head dim 45). "
                 f"{harness.interleaved_note(args.rounds, args.min_run_time)}. TFLOP/s counts useful work only: "
                 f"forward 4*sum(len_b^2)*H*D (QK^T and PV); "
                 f"forward+backward {FWD_BWD_FLOP_FACTOR}x that (backward = 2.5x forward, flash-attn convention); "
                 f"padded methods get no credit for padding. triton_useful_smXX: useful score entries / entries "
                 f"the Triton kernels' tiles compute (fwd + dq + dk/dv), with the tiles the launcher picks for "
                 f"{info['dtype']} on that arch: a count, not a timing, the same for every row of a workload. "
                 f"Each method runs in its own layout (packed, "
                 f"padded (B,N,H,D), (1,H,total,D)); packing, masks and compilation are outside the timing. "
                 f"Forward is timed under no_grad; forward+backward computes dq, dk, dv. sdpa_padded* pass a "
                 f"key-padding mask only when lengths differ. Before timing, every output and gradient is "
                 f"compared with varlen_attention(backend='torch') (max_abs_diff, grad_max_abs_diff); n/a rows "
                 f"failed to run or disagreed (reason in note; full error in the JSON).")
        paths = harness.write("attention", info, rows, cols, notes)
        png = harness.plot_bars("attention", info, rows, "shape", "method", ["fwd_tflops", "fwdbwd_tflops"],
                                "TFLOP/s")
        print("wrote", *paths, png or "(no PNG: matplotlib is not installed)")


if __name__ == "__main__":
    main()
