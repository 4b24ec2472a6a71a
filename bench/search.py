"""Seconds per As-ViT indicator evaluation (kappa + L^E of one architecture), ours against a
faithful re-implementation of the released loops, and (``--total``) the whole search + scaling.

One evaluation = build ``--repeats`` fresh initialisations of the proxy (As-ViT: 5, the default on a
GPU or with --full; 2 by default on the CPU, where the released L^E loop alone takes ~30 s per
initialisation of the large proxy and 5 would not fit a 5-minute run), kappa on a batch of
``--batch`` (16) random-normal images ``(16, 3, S, S)``, L^E on a 10-point circle per initialisation,
for two proxies:

    seed     the paper's seed topology 8,2,3|4,1,2|4,1,4|4,1,6|32 at E = 32, depths 1,1,1,1 (the
             search proxy)
    large    the largest scaling proxy: As-ViT Large's depths 5,2,5,2 at the narrow proxy width
             E = h = 45 (Large has hidden 180 = 4h)

computed two ways:

    ours   asvit_kernels.search.indicators.indicators: all initialisations' NTKs in one vmapped
           forward/backward (asvit_kernels.ntk_condition_number), L^E by forward-mode JVPs
           (asvit_kernels.length_distortion)
    loop   the released VITA-Group/AsViT code (lib/procedures/ntk.py get_ntk_n, teg.py
           get_curve_complexity), re-implemented on the same models and circles:
           kappa: per model, one forward of the batch, then for each sample a backward of that
           sample's summed output (retain_graph), the gradients of the "weight" parameters
           flattened (moved to the CPU, as released) and stacked, Gram in fp32 on the device,
           torch.linalg.eigh, lambda_max / lambda_min, mean over the models;
           L^E: per model (LayerNorms off), the circle built from theta (requires_grad) as
           U [cos theta, sin theta], fed in chunks of ``--le-chunk`` points (released: 6), one
           backward per output feature per chunk into theta.grad, sum over points of the norm of
           d f / d theta, mean over the models. ``--le-chunk 1``: one backward per feature per point.

Both methods see the same models (search.indicators.proxy_models) and the same circles
(search.indicators.circles: U is recovered from the circle's first point and tangent). Ours is
timed with harness.time_ms (median, end to end: model building included); the loop once, end to
end, after a small warm-up (it takes seconds). Every row checks agreement: kappa (the release
forms its Gram and eigenvalues in fp32: tolerance 1e-3) and L^E (1e-4), relative.

``--total``: times ``search.topology.reinforce(steps=--steps)`` on the As-ViT space (proxy E = 32,
depths 1,1,1,1) and ``search.scaling.grow`` from the seed, both on the ``--img`` batch with the
default ``search.indicators.evaluate``; reported as "n/a: not importable" when those modules are
missing.

    python bench/search.py                 # CPU: 32x32 images
    python bench/search.py --total         # + 500 REINFORCE steps and the scaling run
    python bench/search.py --device cuda   # GPU: 224x224 (--full does the same on the CPU)

Prints a table and writes bench/results/search_<machine>.{json,md,png}.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

import asvit_kernels as ak  # noqa: E402
from asvit_kernels.models.genotype import SEED  # noqa: E402
from asvit_kernels.search import indicators as ind  # noqa: E402

PROXIES = {"seed": dict(genotype=SEED, embed_dim=32, depths=(1, 1, 1, 1)),
           "large": dict(genotype=SEED, embed_dim=45, depths=(5, 2, 5, 2))}
KAPPA_TOL, LE_TOL = 1e-3, 1e-4
COLUMNS = ["proxy", "img", "repeats", "method", "build_s", "kappa_s", "le_s", "eval_s", "speedup_vs_loop", "kappa",
           "kappa_rel_diff", "length_distortion", "le_rel_diff", "agrees", "note"]


# ------------------------------------------------------------------------------------ the released loops


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loop_kappa(models: list[nn.Module], x: torch.Tensor) -> float:
    """The released get_ntk_n: per-sample backward, fp32 Gram, eigh; mean over the models.
    (The release maps a NaN ratio to -1, "bad gradients"; the proxies here have none.)"""
    conds = []
    for net in models:
        net.set_norm(True)
        net.zero_grad()
        logit = net.pooled_features(x)   # their forward_features(x)[1]: pooled, before the final LayerNorm
        grads = []
        for i in range(len(x)):
            logit[i:i + 1].backward(torch.ones_like(logit[i:i + 1]), retain_graph=True)
            grads.append(torch.cat([w.grad.view(-1).detach() for n, w in net.named_parameters()
                                    if "weight" in n and w.grad is not None], -1).cpu())
            net.zero_grad()
        g = torch.stack([t.to(x.device) for t in grads], 0)
        ntk = torch.einsum("nc,mc->nm", g, g)
        eigenvalues = torch.linalg.eigh(ntk, UPLO="L")[0]
        conds.append((eigenvalues[-1] / eigenvalues[0]).item())
    return sum(conds) / len(conds)


def loop_length_distortion(models: list[nn.Module], curves: list[tuple[torch.Tensor, torch.Tensor]],
                           chunk: int) -> float:
    """The released get_curve_complexity: per chunk of points, one backward per output feature
    into theta; sum_n ||d f(x(theta_n)) / d theta_n||, mean over the models."""
    values = []
    for net, (pts, tans) in zip(models, curves):
        net.set_norm(False)
        net.zero_grad()
        n, shape = pts.shape[0], pts.shape[1:]
        U = torch.stack([pts[0].reshape(-1), tans[0].reshape(-1)], 1)  # theta_0 = 0: point U e1, tangent U e2
        theta = torch.linspace(0, 2 * math.pi, n, device=pts.device, dtype=pts.dtype).requires_grad_(True)
        curve = torch.matmul(U, torch.stack([torch.cos(theta), torch.sin(theta)])).T.reshape(n, *shape)
        total = 0.0
        for i in range(0, n, chunk):
            out = net.pooled_features(curve[i:i + chunk])
            out = out.reshape(out.size(0), -1)
            jacobs = []
            for c in range(out.size(1)):
                out[:, c].backward(torch.ones_like(out[:, c]), retain_graph=True)
                jacobs.append(theta.grad.detach().clone())
                theta.grad.zero_()
            jacobs = torch.stack(jacobs, 0).permute(1, 0)  # (n_theta, c); rows outside the chunk are 0
            total += torch.einsum("nd,nd->n", jacobs, jacobs).sqrt().sum().item()
        values.append(total)
    return sum(values) / len(values)


# ------------------------------------------------------------------------------------ measurements


def make_images(batch: int, side: int, device) -> torch.Tensor:
    return torch.randn(batch, 3, side, side, generator=torch.Generator().manual_seed(0)).to(device)


def build(cfg: dict, side: int, args, repeats: int | None = None) -> list[nn.Module]:
    return ind.proxy_models(cfg["genotype"], side, repeats=repeats or args.repeats, embed_dim=cfg["embed_dim"],
                            depths=cfg["depths"], seed=0, device=args.device)


def seconds(fn: Callable[[], object], args) -> float:
    return harness.time_ms(fn, args.min_run_time) / 1e3


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def bench_ours(name: str, cfg: dict, x: torch.Tensor, args) -> dict:
    side = x.shape[-1]
    kw = dict(repeats=args.repeats, n_points=args.points, embed_dim=cfg["embed_dim"], depths=cfg["depths"])
    row = {"proxy": name, "img": side, "repeats": args.repeats, "method": "ours"}
    row.update(ind.indicators(cfg["genotype"], x, **kw))
    models = build(cfg, side, args)
    curves = ind.circles(tuple(x.shape[1:]), repeats=args.repeats, n_points=args.points, device=args.device)

    def kappa_only():
        for m in models:
            m.set_norm(True)
        return ak.ntk_condition_number(models, x, params="weights", output_fn=ind.features)

    def le_only():
        for m in models:
            m.set_norm(False)
        with torch.no_grad():
            return sum(ak.length_distortion(m, p, t, output_fn=ind.features) for m, (p, t) in zip(models, curves))

    row["build_s"] = seconds(lambda: build(cfg, side, args), args)
    row["kappa_s"] = seconds(kappa_only, args)
    row["le_s"] = seconds(le_only, args)
    row["eval_s"] = seconds(lambda: ind.indicators(cfg["genotype"], x, **kw), args)
    return row


def bench_loop(name: str, cfg: dict, x: torch.Tensor, args) -> dict:
    side, dev = x.shape[-1], x.device
    row = {"proxy": name, "img": side, "repeats": args.repeats, "method": "loop"}
    # Warm-up (lazy initialisation, first-call allocations): one model, 2 samples. The L^E loop
    # runs the same forward/backward machinery and takes seconds per chunk: not warmed separately.
    loop_kappa(build(cfg, side, args, repeats=1), x[:2])
    _sync(dev)
    t0 = time.perf_counter()
    models = build(cfg, side, args)
    curves = ind.circles(tuple(x.shape[1:]), repeats=args.repeats, n_points=args.points, device=args.device)
    _sync(dev)
    t1 = time.perf_counter()
    row["kappa"] = loop_kappa(models, x)
    _sync(dev)
    t2 = time.perf_counter()
    row["length_distortion"] = loop_length_distortion(models, curves, args.le_chunk)
    _sync(dev)
    t3 = time.perf_counter()
    row.update(build_s=t1 - t0, kappa_s=t2 - t1, le_s=t3 - t2, eval_s=t3 - t0)
    return row


def compare(ours: dict, loop: dict) -> None:
    """Agreement columns on both rows, speedup on ours."""
    kr, lr = _rel(ours["kappa"], loop["kappa"]), _rel(ours["length_distortion"], loop["length_distortion"])
    ok = "yes" if kr <= KAPPA_TOL and lr <= LE_TOL else "no"
    for r in (ours, loop):
        r.update(kappa_rel_diff=f"{kr:.1e}", le_rel_diff=f"{lr:.1e}", agrees=ok)
    ours["speedup_vs_loop"] = loop["eval_s"] / ours["eval_s"]
    loop["speedup_vs_loop"] = 1.0


# ------------------------------------------------------------------------------------ --total


def bench_total(x: torch.Tensor, args) -> list[dict]:
    """500 REINFORCE steps + one scaling run with search.indicators.evaluate, wall seconds."""
    base = {"proxy": "search + scaling", "img": x.shape[-1], "repeats": args.search_repeats}
    try:
        from asvit_kernels.search.scaling import grow
        from asvit_kernels.search.topology import reinforce
    except ImportError as e:
        return [{**base, "method": "total", "eval_s": "n/a", "note": f"n/a: not importable ({e})"}]
    rows = []
    t0 = time.perf_counter()
    res = reinforce(steps=args.steps, seed=0, images=x, repeats=args.search_repeats, device=args.device,
                    progress=False)
    t_search = time.perf_counter() - t0
    measured = sum(1 for h in res.history if not h.get("cached"))
    rows.append({**base, "method": f"reinforce {args.steps} steps", "eval_s": t_search,
                 "note": f"{measured} evaluations (the rest cached), argmax {res.genotype}"})
    t0 = time.perf_counter()
    fam = grow(SEED, images=x, repeats=args.search_repeats, device=args.device, img_size=224, progress=False)
    t_grow = time.perf_counter() - t0
    n_eval = sum(sum(1 for c in h["candidates"] if c.get("survives")) for h in fam.history)
    last = fam.family[-1] if fam.family else {}
    rows.append({**base, "method": "grow (scaling)", "eval_s": t_grow,
                 "note": f"{len(fam.family)} steps, {n_eval} evaluations, stop: {fam.stop_reason}, last "
                         f"{last.get('genotype')} ({last.get('params', 0) / 1e6:.1f}M params at 224)"})
    rows.append({**base, "method": "total", "eval_s": t_search + t_grow,
                 "note": f"{(t_search + t_grow) / 3600:.3f} h"})
    return rows


# ------------------------------------------------------------------------------------ main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--img", type=int, default=None, help="image side S (default 32 on CPU, 224 on GPU)")
    ap.add_argument("--full", action="store_true", help="224x224 images on any device")
    ap.add_argument("--batch", type=int, default=16, help="kappa batch (As-ViT: 16)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="initialisations per evaluation (As-ViT: 5; default 5 on GPU / --full, 2 on CPU, where "
                         "the released L^E loop takes ~30 s per initialisation of the large proxy)")
    ap.add_argument("--search-repeats", type=int, default=5, help="initialisations per evaluation in --total")
    ap.add_argument("--points", type=int, default=10, help="circle points for L^E (As-ViT: 10)")
    ap.add_argument("--le-chunk", type=int, default=6, help="points per forward in the loop's L^E (released: 6)")
    ap.add_argument("--proxies", default="seed,large", help="comma list of seed, large")
    ap.add_argument("--min-run-time", type=float, default=1.0, help="seconds of timing per measurement of ours")
    ap.add_argument("--total", action="store_true", help="also time 500 REINFORCE steps + the scaling run")
    ap.add_argument("--steps", type=int, default=500, help="REINFORCE steps for --total")
    ap.add_argument("--no-write", action="store_true", help="print only")
    args = ap.parse_args(argv)
    gpu = args.device.startswith("cuda")
    side = 224 if args.full else (args.img or (224 if gpu else 32))
    args.repeats = args.repeats or (5 if gpu or args.full else 2)
    names = args.proxies.split(",")
    if unknown := set(names) - set(PROXIES):
        ap.error(f"unknown proxies {sorted(unknown)}")

    x = make_images(args.batch, side, args.device)
    load_before = [round(v, 2) for v in os.getloadavg()]
    start = time.perf_counter()
    rows = []
    for name in names:
        ours, loop = bench_ours(name, PROXIES[name], x, args), bench_loop(name, PROXIES[name], x, args)
        compare(ours, loop)
        rows += [ours, loop]
        print(harness.table(rows[-2:], COLUMNS), flush=True)
    per_eval_wall = time.perf_counter() - start
    if args.total:
        rows += bench_total(x, args)
        print(harness.table(rows[-3:], COLUMNS), flush=True)
    elapsed = time.perf_counter() - start

    info = harness.machine(args.device)
    info.update(img=side, batch=args.batch, repeats=args.repeats, search_repeats=args.search_repeats,
                points=args.points, le_chunk=args.le_chunk,
                proxies={n: {**PROXIES[n], "depths": list(PROXIES[n]["depths"])} for n in names},
                wall_s=round(elapsed, 1), per_evaluation_rows_wall_s=round(per_eval_wall, 1),
                loadavg_before=load_before,
                loadavg_after=[round(v, 2) for v in os.getloadavg()])
    print("\n" + harness.table(rows, COLUMNS))
    print(f"total {elapsed:.0f} s")
    if args.no_write:
        return
    if args.total:
        total_note = (f" --total: reinforce({args.steps} steps) and grow() with {args.search_repeats} initialisations "
                      f"per evaluation at {side}x{side}, default search.indicators.evaluate (params counted at 224 "
                      f"for the scaling's limits), wall seconds in eval_s.")
    else:
        total_note = " Total time for 500 search steps + the scaling run: not measured in this run (pass --total)."
    notes = (f"float32, images randn({args.batch}, 3, {side}, {side}). One evaluation = build {args.repeats} fresh "
             f"initialisations + kappa (NTK over 'weight' params of pooled_features, the pre-norm pooled feature, LayerNorm on) + L^E "
             f"({args.points}-point circle per initialisation, LayerNorm off), mean over the initialisations. "
             f"seed: {SEED} at E=32, depths 1,1,1,1; large: depths 5,2,5,2 at E=h=45 (As-ViT Large's proxy). "
             f"ours: search.indicators.indicators, median seconds (harness.time_ms), kappa_s / le_s / build_s "
             f"timed separately on prebuilt models; loop: the released per-sample (kappa) and per-feature "
             f"(L^E, {args.le_chunk} points per backward as released) loops on the same models and circles, one "
             f"end-to-end run after a warm-up. speedup_vs_loop = loop eval_s / ours eval_s. kappa_rel_diff / "
             f"le_rel_diff: |ours - loop| / |loop| (agrees: <= {KAPPA_TOL:g} kappa, the release's Gram and eigh "
             f"being fp32; <= {LE_TOL:g} L^E). Shared 2-core machine: timings are noisy.{total_note}")
    paths = harness.write("search", info, rows, COLUMNS, notes)
    png = harness.plot_bars("search", info, [r for r in rows if r["method"] in ("ours", "loop")], "proxy",
                            "method", ["eval_s", "kappa_s", "le_s"], ylabel="seconds")
    print("wrote", *paths, *([png] if png else []))


if __name__ == "__main__":
    main()
