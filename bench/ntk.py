"""As-ViT's training-free indicators: the NTK condition number kappa and the length distortion L^E.

kappa = lambda_max / lambda_min of the empirical sum-of-outputs NTK over the parameters whose name
contains "weight" (As-ViT / TENAS), averaged over ``--repeats`` freshly initialised models, for

    proxy  an As-ViT-style small ViT: overlapping Conv2d patch embedding (kernel 7, stride 4) on
           32x32 input (64 tokens + class token), embed 96, 3 heads, depth 4, head of 256
    vit-s  ViT-S/16: embed 384, 6 heads, patch 16, 1000 classes; depth 12 on 224x224, or on CPU
           (--small, the CPU default) depth 4 on 96x96 (36 tokens + class token)

computed three ways:

    ours         asvit_kernels.ntk_condition_number(models, x, params="weights")
    loop         asvit_kernels.reference.ntk_loop per model (one backward per sample, As-ViT/TENAS),
                 then eigvalsh
    vmap_jacrev  torch.func: vmap over samples of jacrev of the summed output w.r.t. the selected
                 parameters (functional_call), the per-sample Jacobians contracted into the Gram here

and L^E = sum_n || J_f(x_n) t_n || on 10 points of asvit_kernels.circle_curve through the proxy
(256 output features): asvit_kernels.length_distortion (forward-mode) against
asvit_kernels.reference.length_distortion_loop (one backward per output feature).

Every method's value is first checked against the loop (kappa and the NTK matrices themselves;
L^E); then the methods of a row are timed side by side (``harness.interleaved_ms``: alternating
slices), so load drift on a shared machine hits them alike, and each one's peak memory is measured:
on CPU as the peak resident set over the one before the call, each measurement in a fresh process
(harness.run_isolated); on CUDA with torch.cuda.max_memory_allocated.

    python bench/ntk.py                  # CPU: --small, fp32
    python bench/ntk.py --device cuda    # GPU: full-size ViT-S

Prints a table and writes bench/results/ntk_<machine>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import asvit_kernels as ak  # noqa: E402

KAPPA_TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
LE_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}
LE_POINTS = 10


# ------------------------------------------------------------------------------------------- models

class Block(nn.Module):
    """Pre-norm transformer block; attention written out with matmul + softmax."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads, self.scale = heads, (dim // heads) ** -0.5
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x):  # (B, N, C): the batch stays the leading dim at every linear layer
        B, N, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, img: int, patch: int, stride: int, padding: int, dim: int, depth: int, heads: int,
                 num_classes: int, in_chans: int = 3):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, stride, padding)
        side = (img + 2 * padding - patch) // stride + 1
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, side * side + 1, dim) * 0.02)
        self.blocks = nn.Sequential(*(Block(dim, heads) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(x))[:, 0])


def model_configs(small: bool, vit_depth: int | None, vit_img: int | None) -> dict[str, dict]:
    return {"proxy": dict(img=32, patch=7, stride=4, padding=3, dim=96, depth=4, heads=3, num_classes=256),
            "vit-s": dict(img=vit_img or (96 if small else 224), patch=16, stride=16, padding=0, dim=384,
                          depth=vit_depth or (4 if small else 12), heads=6, num_classes=1000)}


def model_label(name: str, cfg: dict) -> str:
    return f"{name} {cfg['img']}px d{cfg['depth']}"


def build_models(cfg: dict, repeats: int, device, dtype) -> list[nn.Module]:
    models = []
    for seed in range(repeats):  # a fresh initialisation per repeat
        torch.manual_seed(seed)
        models.append(ViT(**cfg).to(device, dtype).eval())
    return models


def make_input(cfg: dict, B: int, device, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + B)
    return torch.randn(B, 3, cfg["img"], cfg["img"], generator=g).to(device, dtype)


def n_weights(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "weight" in n)


# ---------------------------------------------------------------------------------------- methods

def kappa_of(K: torch.Tensor) -> float:
    e = torch.linalg.eigvalsh(K.double())
    return (e[-1] / e[0]).item()


def ntk_vmap_jacrev(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, B) float64 NTK over the "weight" parameters: per-sample gradients of the summed output
    from vmap(jacrev), contracted per parameter (in the parameters' dtype) and summed in float64."""
    chosen = {n: p.detach() for n, p in model.named_parameters() if "weight" in n}
    fixed = {n: p.detach() for n, p in model.named_parameters() if "weight" not in n}
    fixed.update(model.named_buffers())

    def summed_output(p, xi):
        return functional_call(model, {**p, **fixed}, (xi.unsqueeze(0),)).sum()

    J = vmap(jacrev(summed_output), in_dims=(None, 0))(chosen, x)
    K = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    for j in J.values():
        j = j.reshape(x.shape[0], -1)
        K += (j @ j.T).double()
    return K


def kappa_methods() -> dict[str, tuple[Callable | None, Callable | None, str]]:
    """name -> (models, x -> mean kappa; models, x -> (R, B, B) NTKs; why unavailable)."""
    def stack(f):
        return lambda models, x: torch.stack([f(m, x) for m in models])

    def mean_kappa(f):
        return lambda models, x: sum(kappa_of(f(m, x)) for m in models) / len(models)

    ms = {}
    if hasattr(ak, "ntk_condition_number"):
        ntk = (lambda models, x: ak.ntk(models, x, params="weights")) if hasattr(ak, "ntk") else None
        ms["ours"] = (lambda models, x: float(ak.ntk_condition_number(models, x, params="weights")), ntk, "")
    else:
        ms["ours"] = (None, None, "asvit_kernels has no ntk_condition_number yet")
    if hasattr(ak.reference, "ntk_loop"):
        loop = lambda m, x: ak.reference.ntk_loop(m, x, params="weights")  # noqa: E731
        ms["loop"] = (mean_kappa(loop), stack(loop), "")
    else:
        ms["loop"] = (None, None, "asvit_kernels.reference has no ntk_loop yet")
    ms["vmap_jacrev"] = (mean_kappa(ntk_vmap_jacrev), stack(ntk_vmap_jacrev), "")
    return ms


def le_methods() -> dict[str, tuple[Callable | None, str]]:
    """name -> (model, points, tangents -> L^E; why unavailable)."""
    ms = {}
    ms["ours"] = ((lambda m, p, t: float(ak.length_distortion(m, p, t)), "") if hasattr(ak, "length_distortion")
                  else (None, "asvit_kernels has no length_distortion yet"))
    ms["loop"] = ((lambda m, p, t: float(ak.reference.length_distortion_loop(m, p, t)), "")
                  if hasattr(ak.reference, "length_distortion_loop")
                  else (None, "asvit_kernels.reference has no length_distortion_loop yet"))
    return ms


def circle_points(cfg: dict, device, dtype):
    if not hasattr(ak, "circle_curve"):
        raise RuntimeError("asvit_kernels has no circle_curve yet")
    pts, tans = ak.circle_curve((3, cfg["img"], cfg["img"]), LE_POINTS, generator=torch.Generator().manual_seed(0))
    return pts.to(device, dtype), tans.to(device, dtype)


# -------------------------------------------------------------------------------------- measurement

def _reason(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".strip()[:120]


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def job(spec: dict, args, tiny: bool = False) -> Callable[[], object]:
    """The zero-argument call one measurement runs, rebuilt from ``spec`` (in a child process too).
    ``tiny``: the same method on 2 samples of one model (1 point for L^E), a cheap warm-up."""
    cfgs = model_configs(args.small, args.vit_depth, args.vit_img)
    dtype, device = getattr(torch, args.dtype), args.device
    cfg = cfgs[spec["model"]]
    if spec["metric"] == "kappa":
        models = build_models(cfg, 1 if tiny else args.repeats, device, dtype)
        x = make_input(cfg, 2 if tiny else spec["B"], device, dtype)
        f = kappa_methods()[spec["method"]][0]
        return lambda: f(models, x)
    model = build_models(cfg, 1, device, dtype)[0]
    pts, tans = circle_points(cfg, device, dtype)
    if tiny:
        pts, tans = pts[:1], tans[:1]
    f = le_methods()[spec["method"]][0]
    return lambda: f(model, pts, tans)


def measure_memory(spec: dict, args, argv: list[str]) -> float | str:
    if args.no_mem:
        return "off"
    try:
        if args.device.startswith("cuda"):
            job(spec, args, tiny=True)()  # warm-up: lazy initialisation is not the method's memory
            fn = job(spec, args)
            return harness.peak_memory_mb(fn, args.device)
        out = harness.run_isolated([__file__, *argv, "--_child", json.dumps(spec)])
        return out["peak_mem_MB"]
    except Exception as e:  # noqa: BLE001
        return f"n/a: {_reason(e)}"[:60]


def child(spec: dict, args) -> None:
    # Warm-up on a tiny problem: the first call's one-time allocations (~170 MB here: lazy imports and
    # initialisation) are not the method's memory. Then the high-water mark is reset and one call measured.
    job(spec, args, tiny=True)()
    fn = job(spec, args)
    print(json.dumps({"peak_mem_MB": harness.peak_memory_mb(fn, args.device)}))


def time_and_measure(rows: list[dict], timed: dict, specs: dict, args, argv: list[str]) -> None:
    """Time the row's methods that passed their check side by side (``harness.interleaved_ms``),
    so load drift on a shared machine hits every method of the row alike; then each one's peak
    memory, in a fresh process per measurement. A method whose timing fails is marked n/a and takes
    no further turns; the others go on."""
    failed: dict[str, BaseException] = {}
    times = harness.interleaved_ms({m: (fn, None) for m, fn in timed.items()}, args.rounds, args.min_run_time,
                                   failed=failed)
    for row in rows:
        method = row["method"]
        if method in failed:
            e = failed[method]
            row.update(ms="n/a", note=f"n/a: {_reason(e)}", error=repr(e))
        elif method in timed:
            row["ms"] = times[method]
            row["peak_mem_MB"] = measure_memory(specs[method], args, argv)


def bench_kappa(name: str, cfg: dict, B: int, args, argv: list[str]) -> list[dict]:
    dtype, device = getattr(torch, args.dtype), args.device
    models = build_models(cfg, args.repeats, device, dtype)
    x = make_input(cfg, B, device, dtype)
    base = {"model": model_label(name, cfg), "metric": f"kappa (mean of {args.repeats})", "B": B}
    methods = {m: v for m, v in kappa_methods().items() if m in args.methods}
    ref_kappa = ref_K = None
    timed, specs = {}, {}
    loop_value, loop_ntk, why = methods.get("loop", (None, None, ""))
    if loop_value is not None:  # the loop's NTKs give its kappa directly: one pass for the check
        ref_K = loop_ntk(models, x)
        ref_kappa = sum(kappa_of(K) for K in ref_K) / len(ref_K)
    rows = []
    for method, (value_fn, ntk_fn, why) in methods.items():
        row = {**base, "method": method}
        spec = {"metric": "kappa", "model": name, "B": B, "method": method}
        try:
            if value_fn is None:
                raise RuntimeError(why)
            t0 = time.perf_counter()
            if method == "loop":
                row["value"], K = ref_kappa, ref_K
            else:
                row["value"] = value_fn(models, x)
                K = ntk_fn(models, x) if ntk_fn is not None else None
            row["check_s"] = time.perf_counter() - t0
            if ref_kappa is None:
                row["agrees"] = "no reference"
            else:
                rel = _rel(row["value"], ref_kappa)
                row["rel_diff"] = f"{rel:.1e}"
                if K is not None:
                    K = K.reshape(ref_K.shape).to(ref_K)
                    row["ntk_rel_diff"] = f"{max(((a - b).norm() / b.norm()).item() for a, b in zip(K, ref_K)):.1e}"
                row["agrees"] = "ref" if method == "loop" else ("yes" if rel <= KAPPA_TOL[dtype] else "no")
            timed[method], specs[method] = (lambda f=value_fn: f(models, x)), spec
        except Exception as e:  # noqa: BLE001 - a method that cannot run is a result, not a crash
            row.update(ms="n/a", note=f"n/a: {_reason(e)}", error=repr(e))
        rows.append(row)
    time_and_measure(rows, timed, specs, args, argv)
    print(harness.table(_speedups(rows), COLUMNS), flush=True)
    return rows


def bench_le(cfg: dict, args, argv: list[str]) -> list[dict]:
    dtype, device = getattr(torch, args.dtype), args.device
    model = build_models(cfg, 1, device, dtype)[0]
    base = {"model": model_label("proxy", cfg), "metric": f"L^E ({cfg['num_classes']} outputs)", "B": LE_POINTS}
    rows, ref, timed, specs = [], None, {}, {}
    try:
        pts, tans = circle_points(cfg, device, dtype)
    except Exception as e:  # noqa: BLE001
        return [{**base, "method": m, "ms": "n/a", "note": f"n/a: {_reason(e)}"} for m in le_methods()
                if m in args.methods]
    chosen = [(m, v) for m, v in le_methods().items() if m in args.methods]
    for method, (fn, why) in sorted(chosen, key=lambda kv: kv[0] != "loop"):  # loop first
        row = {**base, "method": method}
        spec = {"metric": "le", "model": "proxy", "B": LE_POINTS, "method": method}
        try:
            if fn is None:
                raise RuntimeError(why)
            t0 = time.perf_counter()
            row["value"] = fn(model, pts, tans)
            row["check_s"] = time.perf_counter() - t0
            if method == "loop":
                ref, row["agrees"] = row["value"], "ref"
            elif ref is None:
                row["agrees"] = "no reference"
            else:
                rel = _rel(row["value"], ref)
                row["rel_diff"] = f"{rel:.1e}"
                row["agrees"] = "yes" if rel <= LE_TOL[dtype] else "no"
            timed[method], specs[method] = (lambda f=fn: f(model, pts, tans)), spec
        except Exception as e:  # noqa: BLE001
            row.update(ms="n/a", note=f"n/a: {_reason(e)}", error=repr(e))
        rows.append(row)
    time_and_measure(rows, timed, specs, args, argv)
    print(harness.table(_speedups(rows), COLUMNS), flush=True)
    return rows


def _speedups(rows: list[dict]) -> list[dict]:
    loop = next((r["ms"] for r in rows if r["method"] == "loop" and isinstance(r.get("ms"), float)), None)
    for r in rows:
        if loop is not None and isinstance(r.get("ms"), float):
            r["speedup_vs_loop"] = loop / r["ms"]
    return rows


COLUMNS = ["model", "metric", "B", "method", "ms", "speedup_vs_loop", "peak_mem_MB", "value", "rel_diff",
           "ntk_rel_diff", "agrees", "note"]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", help="float32 (default) | float64 | float16 | bfloat16")
    ap.add_argument("--repeats", type=int, default=5, help="freshly initialised models per kappa (default 5)")
    ap.add_argument("--batch", default="16,64", help="comma list of batch sizes B for kappa")
    ap.add_argument("--vit-batch", default=None,
                    help="batch sizes for vit-s (default: --batch; on CPU with --small, 16 only)")
    ap.add_argument("--small", action=argparse.BooleanOptionalAction, default=None,
                    help="scaled-down vit-s (depth 4, 96px) so a CPU run ends in minutes (default: on CPU)")
    ap.add_argument("--vit-depth", type=int, default=None, help="vit-s depth (default 12, --small 4)")
    ap.add_argument("--vit-img", type=int, default=None, help="vit-s input side (default 224, --small 96)")
    ap.add_argument("--cases", default="proxy,vit-s,le", help="comma list of proxy, vit-s, le")
    harness.add_timing_args(ap)
    ap.add_argument("--methods", default="ours,loop,vmap_jacrev",
                    help="comma list of the methods to run (L^E has ours and loop); without loop there is "
                         "no reference to check against nor speedup_vs_loop")
    ap.add_argument("--no-mem", action="store_true", help="skip the peak-memory measurements")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.small is None:
        args.small = not args.device.startswith("cuda")
    if args.rounds < 1:
        ap.error("--rounds must be >= 1")
    args.methods = args.methods.split(",")
    if unknown := set(args.methods) - {"ours", "loop", "vmap_jacrev"}:
        ap.error(f"unknown methods {sorted(unknown)}")
    if args._child is not None:
        return child(json.loads(args._child), args)

    dtype = getattr(torch, args.dtype)
    cfgs = model_configs(args.small, args.vit_depth, args.vit_img)
    batches = [int(b) for b in args.batch.split(",")]
    skipped_reason = None
    if args.vit_batch:
        vit_batches = [int(b) for b in args.vit_batch.split(",")]
    elif args.small and not args.device.startswith("cuda"):
        vit_batches = [b for b in batches if b <= 16]
        skipped_reason = ("skipped: CPU default; the loop grows as B^2 (minutes per call at B=64, GBs of "
                          "float64 Jacobian); pass --vit-batch 16,64")
    else:
        vit_batches = batches
    cases = args.cases.split(",")
    if unknown := set(cases) - {"proxy", "vit-s", "le"}:
        ap.error(f"unknown cases {sorted(unknown)}")

    load_before = [round(v, 2) for v in os.getloadavg()]
    start = time.perf_counter()
    rows = []
    for name in ("proxy", "vit-s"):
        if name not in cases:
            continue
        for B in batches if name == "proxy" else sorted(set(batches) | set(vit_batches)):
            if name == "vit-s" and B not in vit_batches:
                rows.append({"model": model_label(name, cfgs[name]), "metric": f"kappa (mean of {args.repeats})",
                             "B": B, "method": "all", "ms": "n/a", "note": skipped_reason})
                print(harness.table(rows[-1:], COLUMNS), flush=True)
                continue
            rows += bench_kappa(name, cfgs[name], B, args, argv)
    if "le" in cases:
        rows += bench_le(cfgs["proxy"], args, argv)
    elapsed = time.perf_counter() - start

    info = harness.machine(args.device)
    proxy_w = n_weights(ViT(**cfgs["proxy"]))
    vit_w = n_weights(ViT(**cfgs["vit-s"]))
    info.update(dtype=args.dtype, repeats=args.repeats, rounds=args.rounds, small=args.small, models=cfgs,
                weights_selected={"proxy": proxy_w, "vit-s": vit_w}, wall_s=round(elapsed, 1),
                loadavg_before=load_before, loadavg_after=[round(v, 2) for v in os.getloadavg()],
                memory=("torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else
                        f"peak RSS over pre-call RSS, fresh process per measurement: {harness.cpu_memory_method()}"),
                api={k: hasattr(ak, k) for k in ("ntk", "ntk_condition_number", "circle_curve", "length_distortion")})
    print("\n" + harness.table(rows, COLUMNS))
    print(f"total {elapsed:.0f} s")
    if not args.no_write:
        mem = ("torch.cuda.max_memory_allocated over the allocation before the call" if args.device.startswith("cuda")
               else f"CPU peak resident set over the one before the call ({harness.cpu_memory_method()}), one "
                    f"warmed-up call in a fresh process per measurement with MALLOC_MMAP_THRESHOLD_=64KiB so freed "
                    f"tensors leave the resident set; includes the models' own gradients/activations, not the models")
        notes = (f"{args.dtype}. kappa = lambda_max/lambda_min (eigvalsh, float64) of the sum-of-outputs NTK over the "
                 f"'weight' parameters ({proxy_w / 1e6:.2f}M proxy, {vit_w / 1e6:.2f}M vit-s), mean over "
                 f"{args.repeats} fresh initialisations; ms times all of them. proxy: overlapping conv patch embed "
                 f"k7 s4 on {cfgs['proxy']['img']}px, embed 96, 3 heads, depth {cfgs['proxy']['depth']}, 256 outputs; "
                 f"vit-s: patch 16, embed 384, 6 heads, depth {cfgs['vit-s']['depth']}, {cfgs['vit-s']['img']}px, "
                 f"1000 outputs. L^E: {LE_POINTS} circle_curve points through proxy model 0. "
                 f"{harness.interleaved_note(args.rounds, args.min_run_time)}; "
                 f"speedup_vs_loop = loop ms / method ms. rel_diff: |value - loop value| / |loop value| "
                 f"(agrees: <= {KAPPA_TOL[dtype]:g} for kappa, {LE_TOL[dtype]:g} for L^E); ntk_rel_diff: max over "
                 f"models of ||K - K_loop||_F / ||K_loop||_F. peak_mem_MB: {mem}. vmap_jacrev contracts each "
                 f"parameter's per-sample Jacobian in {args.dtype}, sums in float64.")
        paths = harness.write("ntk", info, rows, COLUMNS, notes)
        print("wrote", *paths)


if __name__ == "__main__":
    main()
