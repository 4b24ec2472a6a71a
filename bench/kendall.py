"""Do As-ViT's training-free indicators rank architectures like their accuracy? A small study.

Data: scikit-learn's handwritten digits (1797 images, 8x8, 10 classes), upsampled bilinearly to
32x32, replicated to 3 channels, normalised with the training split's mean and std; a fixed
80/20 train/validation split (``torch.randperm`` with seed 0): 1437 train / 360 val. Needs
``pip install scikit-learn``.

The task is made harder than "digits, full training set", on purpose and only in this way: every
architecture trains on a fixed class-balanced subset of the training split, the first
``--train-per-class`` images of each class in the split's order (default 10 per class, 100 images),
for ``--epochs`` epochs. Trained on all 1437 images for 3 epochs, the earlier version of this study
left every model at 94-97% top-1 (spread 3 points, ~12 validation images), which separates nothing;
with 100 images the models do not saturate and differ in how fast they learn, which is what the
NTK condition number is meant to predict (trainability). Labels are the true ones (no noise) and
the validation split is the full untouched 360 images. ``--train-per-class 0`` trains on the whole
split.

Architectures: ``--archs`` distinct genotypes of the As-ViT search space (ALGORITHMS.md), drawn
uniformly per dimension with a fixed ``torch.Generator`` (``--seed``), depths [1, 1, 1, 1].

For each one:
  * indicators (``asvit_kernels.search.indicators.indicators``): kappa (the NTK condition number of
    the pre-norm pooled feature ``AsViT.pooled_features``, as the released As-ViT code) and L^E of
    the proxy at 32 px with stage-1 width ``--proxy-embed``, ``--repeats`` initialisations, on the
    first 16 training images (kappa: lower is better; L^E: higher is better);
  * accuracy: ``AsViT.from_genotype(g, embed_dim=--hidden, num_classes=10, img_size=32)`` trained
    for ``--epochs`` epochs once per training seed in ``--train-seeds`` (the seed sets the initial
    weights and the batch order; AdamW, lr ``--lr`` with cosine decay, weight decay 0.05, batch
    ``--batch-size``, no augmentation), then top-1 on the validation split; the study's accuracy
    of an architecture is the mean over its training seeds.

Reported: Kendall's tau-b with its two-sided p-value (``scipy.stats.kendalltau``, checked equal to
the library's ``search.stats.kendall_tau``) of -kappa, L^E, -combined rank
(``search.stats.combined_rank``: kappa rank ascending + L^E rank descending, As-ViT's combination)
and, as a reference, the parameter count, against the mean validation accuracy. With two or more
training seeds also the seed noise: the Kendall tau between the accuracies of the first two seeds
(how well one training run ranks the architectures like another: a ceiling for any indicator
measured against one run) and the mean |difference| between them.

    python bench/kendall.py --threads 1 --results bench/results/kendall_cpu2t   # the committed results
                                 # (~15 min on the 2-core machine under a load average of ~12)

One torch thread: on an oversubscribed machine two threads wait on each other at every barrier.

Prints a table and writes bench/results/kendall_<machine>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.stats import kendalltau
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from asvit_kernels.models.asvit import AsViT  # noqa: E402
from asvit_kernels.models.counting import count_params  # noqa: E402
from asvit_kernels.models.genotype import DIMENSIONS, SPACE, Genotype  # noqa: E402
from asvit_kernels.search.indicators import indicators  # noqa: E402
from asvit_kernels.search.runstate import json_safe  # noqa: E402
from asvit_kernels.search.stats import combined_rank, kendall_tau  # noqa: E402

log = logging.getLogger("bench.kendall")
IMG = 32
INDICATOR_BATCH = 16
Split = tuple[torch.Tensor, torch.Tensor]


# ----------------------------------------------------------------------------- data

def load_digits32(seed: int = 0, val_fraction: float = 0.2) -> tuple[Split, Split]:
    """(train, val) splits of (images (N, 3, 32, 32) float32, labels (N,) int64)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit("bench/kendall.py needs scikit-learn: pip install scikit-learn") from e
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(IMG, IMG), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    y = torch.tensor(digits.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = round(val_fraction * len(y))
    val, train = order[:n_val], order[n_val:]
    mean, std = x[train].mean(), x[train].std()
    x = (x - mean) / std
    return (x[train], y[train]), (x[val], y[val])


def per_class_subset(data: Split, per_class: int) -> Split:
    """The first ``per_class`` images of each class, in the split's order (all of it for 0)."""
    if per_class <= 0:
        return data
    x, y = data
    keep = torch.cat([torch.nonzero(y == c).flatten()[:per_class] for c in range(int(y.max()) + 1)]).sort().values
    return x[keep], y[keep]


# ----------------------------------------------------------------------------- architectures

def sample_genotypes(n: int, seed: int) -> list[Genotype]:
    """``n`` distinct genotypes, each dimension uniform over its choices."""
    g = torch.Generator().manual_seed(seed)
    out: list[Genotype] = []
    for _ in range(1000 * n):
        idx = [int(torch.randint(len(SPACE[d]), (1,), generator=g)) for d in DIMENSIONS]
        geno = Genotype.from_choices(idx)
        if geno not in out:
            out.append(geno)
        if len(out) == n:
            return out
    raise RuntimeError(f"could not draw {n} distinct genotypes")


# ----------------------------------------------------------------------------- training

def train_and_evaluate(geno: Genotype, train: Split, val: Split, args: argparse.Namespace, seed: int) -> dict:
    """Train the model of ``geno`` briefly from ``seed``; returns validation top-1, params and seconds."""
    torch.manual_seed(seed)
    model = AsViT.from_genotype(geno, embed_dim=args.hidden, num_classes=10, img_size=IMG)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    x, y = train
    steps_per_epoch = math.ceil(len(y) / args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    loss = torch.tensor(math.nan)
    for _ in range(args.epochs):
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), args.batch_size):
            b = order[i:i + args.batch_size]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    seconds = time.perf_counter() - start
    return {"val_acc": accuracy(model, val), "train_loss": float(loss.detach()), "params": count_params(model),
            "train_s": seconds}


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Split, batch_size: int = 256) -> float:
    """Top-1 of ``model`` (eval mode) on ``data``."""
    model.eval()
    x, y = data
    correct = sum(int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    return correct / len(y)


# ----------------------------------------------------------------------------- the study

def measure(genos: list[Genotype], train: Split, val: Split, indicator_images: torch.Tensor,
            args: argparse.Namespace) -> list[dict]:
    """One row per genotype: indicators, then one training per training seed."""
    rows = []
    for geno in tqdm(genos, desc="architectures"):
        t0 = time.perf_counter()
        ind = indicators(geno, indicator_images, repeats=args.repeats, embed_dim=args.proxy_embed, seed=args.seed)
        row = {"genotype": str(geno), "kappa": ind["kappa"], "L^E": ind["length_distortion"],
               "indicator_s": time.perf_counter() - t0, "runs": []}
        for s in args.train_seeds:
            row["runs"].append({"seed": s, **train_and_evaluate(geno, train, val, args, s)})
        accs = [r["val_acc"] for r in row["runs"]]
        row.update(val_acc=statistics.fmean(accs), val_acc_seeds=accs, params=row["runs"][0]["params"],
                   train_loss=statistics.fmean(r["train_loss"] for r in row["runs"]),
                   train_s=sum(r["train_s"] for r in row["runs"]), load_1m=round(os.getloadavg()[0], 2))
        log.info("%s: kappa %.4g, L^E %.4g, val acc %s (%.0fs train)", row["genotype"], row["kappa"], row["L^E"],
                 " / ".join(f"{a:.3f}" for a in accs), row["train_s"])
        rows.append(row)
    ranks = combined_rank([r["kappa"] for r in rows], [r["L^E"] for r in rows])
    for r, c in zip(rows, ranks):
        r["combined_rank"] = float(c)
    return rows


def tau_p(x: list[float], y: list[float]) -> dict[str, float]:
    """Kendall tau-b and its two-sided p-value (scipy), tau checked against the library's."""
    res = kendalltau(x, y)  # variant "b", two-sided
    tau, p = float(res.statistic), float(res.pvalue)
    ours = kendall_tau(x, y)
    if not math.isclose(tau, ours, rel_tol=1e-9, abs_tol=1e-12):
        raise AssertionError(f"scipy tau {tau} != search.stats.kendall_tau {ours}")
    return {"tau": tau, "p": p}


def correlations(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Kendall tau-b (+ p) against the mean validation accuracy, each indicator oriented higher = better."""
    acc = [r["val_acc"] for r in rows]
    return {"-kappa": tau_p([-r["kappa"] for r in rows], acc),
            "L^E": tau_p([r["L^E"] for r in rows], acc),
            "-combined_rank": tau_p([-r["combined_rank"] for r in rows], acc),
            "params (reference)": tau_p([float(r["params"]) for r in rows], acc)}


def spread(rows: list[dict]) -> dict:
    """Accuracy spread of the mean accuracies, and the seed noise when there are >= 2 seeds."""
    acc = [r["val_acc"] for r in rows]
    out = {"min": min(acc), "max": max(acc), "std": statistics.stdev(acc), "mean": statistics.fmean(acc)}
    if all(len(r["val_acc_seeds"]) >= 2 for r in rows):
        a0 = [r["val_acc_seeds"][0] for r in rows]
        a1 = [r["val_acc_seeds"][1] for r in rows]
        out["seed_vs_seed"] = tau_p(a0, a1)
        out["mean_abs_seed_diff"] = statistics.fmean(abs(u - v) for u, v in zip(a0, a1))
    return out


def markdown_row(row: dict) -> dict:
    """Cells for the Markdown table: '|' escaped in genotypes, indicators to 4 significant digits."""
    out = dict(row, genotype=row["genotype"].replace("|", "\\|"))
    for k in ("kappa", "L^E"):
        out[k] = f"{row[k]:.4g}"
    out["combined_rank"] = f"{row['combined_rank']:g}"
    out["val_acc"] = f"{row['val_acc']:.3f}"
    out["val_acc_seeds"] = " / ".join(f"{a:.3f}" for a in row["val_acc_seeds"])
    out["train_loss"] = f"{row['train_loss']:.3f}"
    for k in ("indicator_s", "train_s"):
        out[k] = f"{row[k]:.1f}"
    return out


def publish(info: dict, rows: list[dict], taus: dict, spr: dict, args: argparse.Namespace, n_train: int,
            seconds: float) -> None:
    """JSON + Markdown via the harness, with the correlation table added to both."""
    columns = ["genotype", "kappa", "L^E", "combined_rank", "val_acc", "val_acc_seeds", "train_loss", "params",
               "indicator_s", "train_s", "load_1m"]
    subset = (f"{n_train} train images ({args.train_per_class} per class, the first of each class in the split's "
              f"order; a harder task than the full split, module docstring)" if args.train_per_class > 0
              else f"all {n_train} train images")
    seeds = ", ".join(map(str, args.train_seeds))
    noise = ""
    if "seed_vs_seed" in spr:
        s = spr["seed_vs_seed"]
        noise = (f" Seed noise: the accuracies of training seeds {args.train_seeds[0]} and {args.train_seeds[1]} "
                 f"rank the architectures alike with Kendall tau {s['tau']:+.3f} (p = {s['p']:.2g}); mean "
                 f"|difference| {100 * spr['mean_abs_seed_diff']:.1f} points.")
    notes = (f"**Accuracy spread** (mean val top-1 over training seeds {seeds}, n = {len(rows)} architectures): "
             f"min {100 * spr['min']:.1f}%, max {100 * spr['max']:.1f}%, std {100 * spr['std']:.1f} points "
             f"(mean {100 * spr['mean']:.1f}%).{noise} "
             f"**Load**: `uptime` 1/5/15-min load average {info['uptime_before']} before and {info['uptime_after']} "
             f"after the run (2 cores shared with other engineers' jobs; per-row 1-min load after each "
             f"architecture in `load_1m`). "
             f"Digits 8x8 -> 32x32 RGB, {subset}; validation: all 360 val images. Indicators: proxy "
             f"E={args.proxy_embed}, {args.repeats} inits, batch {INDICATOR_BATCH}, seed {args.seed}; kappa of the "
             f"pre-norm pooled feature (AsViT.pooled_features, as the released code). Training: hidden "
             f"{args.hidden}, {args.epochs} epochs AdamW lr {args.lr} cosine, wd 0.05, batch {args.batch_size}, no "
             f"augmentation, training seeds {seeds}, {torch.get_num_threads()} torch thread(s) on {os.cpu_count()} cores. "
             f"Architectures: "
             f"seed {args.seed}. Total {seconds:.0f}s wall (seconds columns: wall time on a shared machine, other "
             "jobs ran at the same time; the indicator and accuracy values are deterministic for the seeds and do "
             "not depend on it). Rerun: `" + info["command"] + "`.")
    json_path, md_path = harness.write("kendall", info, [markdown_row(r) for r in rows], columns, notes)
    if args.results:  # another file name than the harness's kendall_<machine tag>
        stem = Path(args.results)
        stem.parent.mkdir(parents=True, exist_ok=True)
        json_path = json_path.replace(stem.with_suffix(".json"))
        md_path = md_path.replace(stem.with_suffix(".md"))
    data = {"machine": info, "rows": json_safe(rows), "notes": notes, "kendall_tau_vs_val_acc": taus,
            "accuracy_spread": spr, "settings": vars(args), "train_images": n_train}
    json_path.write_text(json.dumps(data, indent=2))  # the raw rows, not the Markdown-formatted ones
    lines = ["", f"Kendall's tau-b against the mean validation accuracy (n = {len(rows)}; higher = ranks like "
             "accuracy; p: two-sided, `scipy.stats.kendalltau`):", "", "| indicator | tau | p |", "|---|---|---|"]
    lines += [f"| {k} | {v['tau']:+.3f} | {v['p']:.2g} |" for k, v in taus.items()]
    with md_path.open("a") as f:
        f.write("\n".join(lines) + "\n")
    log.info("wrote %s and %s", json_path, md_path)


def uptime() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", type=int, default=24)
    p.add_argument("--seed", type=int, default=0, help="architecture sampling and indicator seed")
    p.add_argument("--train-seeds", default="0,1", help="comma list: one training per seed, accuracy = mean")
    p.add_argument("--train-per-class", type=int, default=10, help="training images per class (0: all)")
    p.add_argument("--proxy-embed", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--results", default=None, metavar="STEM",
                   help="write STEM.json and STEM.md (default bench/results/kendall_<machine tag>)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    args.train_seeds = [int(s) for s in str(args.train_seeds).split(",") if s != ""]
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    up_before = uptime()
    start = time.perf_counter()
    train_full, val = load_digits32()
    train = per_class_subset(train_full, args.train_per_class)
    rows = measure(sample_genotypes(args.archs, args.seed), train, val, train_full[0][:INDICATOR_BATCH], args)
    taus = correlations(rows)
    spr = spread(rows)
    seconds = time.perf_counter() - start
    log.info("\n%s", harness.table(rows, ["genotype", "kappa", "L^E", "combined_rank", "val_acc", "train_s"]))
    log.info("spread: %s", spr)
    log.info("Kendall tau vs val acc: %s", taus)
    if not args.no_write:
        info = harness.machine("cpu")
        info.update(uptime_before=up_before, uptime_after=uptime(), wall_s=round(seconds, 1),
                    command="python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]))
        publish(info, rows, taus, spr, args, len(train[1]), seconds)


if __name__ == "__main__":
    main()
