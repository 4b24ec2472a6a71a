"""Do As-ViT's training-free indicators rank architectures like their accuracy? A small study.

Data: scikit-learn's handwritten digits (1797 images, 8x8, 10 classes), upsampled bilinearly to
32x32, replicated to 3 channels, normalised with the training split's mean and std; a fixed
80/20 train/validation split (``torch.randperm`` with seed 0). Needs ``pip install scikit-learn``.

Architectures: ``--archs`` distinct genotypes of the As-ViT search space (ALGORITHMS.md), drawn
uniformly per dimension with a fixed ``torch.Generator`` (``--seed``), depths [1, 1, 1, 1].

For each one:
  * indicators (``asvit_kernels.search.indicators.indicators``): kappa and L^E of the proxy at
    32 px with stage-1 width ``--proxy-embed``, ``--repeats`` initialisations, on the first 16
    training images (kappa: lower is better; L^E: higher is better);
  * accuracy: ``AsViT.from_genotype(g, embed_dim=--hidden, num_classes=10, img_size=32)`` trained
    from the same seed for ``--epochs`` epochs (AdamW, lr ``--lr`` with cosine decay, weight decay
    0.05, batch ``--batch-size``, no augmentation), then top-1 on the validation split.

Reported: Kendall's tau-b (``search.stats.kendall_tau``) of -kappa, L^E and -combined rank
(``search.stats.combined_rank``: kappa rank ascending + L^E rank descending) against the
validation accuracy. With 8 architectures one tau step is 1/28 and tau is noisy: |tau| < 0.5 is
not distinguishable from chance at this size (two-sided p ~ 0.1 at tau = 0.5, n = 8).

    python bench/kendall.py               # defaults: 1-4 minutes on 2 CPU threads (load-dependent)

Prints a table and writes bench/results/kendall_<machine>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
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

def train_and_evaluate(geno: Genotype, train: Split, val: Split, args: argparse.Namespace) -> dict:
    """Train the model of ``geno`` briefly; returns validation top-1, params and seconds."""
    torch.manual_seed(args.seed)
    model = AsViT.from_genotype(geno, embed_dim=args.hidden, num_classes=10, img_size=IMG)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05)
    x, y = train
    steps_per_epoch = math.ceil(len(y) / args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(args.seed)
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

def measure(genos: list[Genotype], train: Split, val: Split, args: argparse.Namespace) -> list[dict]:
    """One row per genotype: indicators, then training."""
    images = train[0][:INDICATOR_BATCH]
    rows = []
    for geno in tqdm(genos, desc="architectures"):
        t0 = time.perf_counter()
        ind = indicators(geno, images, repeats=args.repeats, embed_dim=args.proxy_embed, seed=args.seed)
        row = {"genotype": str(geno), "kappa": ind["kappa"], "L^E": ind["length_distortion"],
               "indicator_s": time.perf_counter() - t0}
        row.update(train_and_evaluate(geno, train, val, args))
        log.info("%s: kappa %.4g, L^E %.4g, val acc %.3f (%.0fs train)", row["genotype"], row["kappa"], row["L^E"],
                 row["val_acc"], row["train_s"])
        rows.append(row)
    ranks = combined_rank([r["kappa"] for r in rows], [r["L^E"] for r in rows])
    for r, c in zip(rows, ranks):
        r["combined_rank"] = float(c)
    return rows


def correlations(rows: list[dict]) -> dict[str, float]:
    """Kendall tau-b against validation accuracy, each indicator oriented higher = better."""
    acc = [r["val_acc"] for r in rows]
    return {"-kappa": kendall_tau([-r["kappa"] for r in rows], acc),
            "L^E": kendall_tau([r["L^E"] for r in rows], acc),
            "-combined_rank": kendall_tau([-r["combined_rank"] for r in rows], acc)}


def markdown_row(row: dict) -> dict:
    """Cells for the Markdown table: '|' escaped in genotypes, indicators to 4 significant digits."""
    out = dict(row, genotype=row["genotype"].replace("|", "\\|"))
    for k in ("kappa", "L^E"):
        out[k] = f"{row[k]:.4g}"
    out["combined_rank"] = f"{row['combined_rank']:g}"
    for k in ("indicator_s", "train_s"):
        out[k] = f"{row[k]:.1f}"
    return out


def publish(info: dict, rows: list[dict], taus: dict[str, float], args: argparse.Namespace, seconds: float) -> None:
    """JSON + Markdown via the harness, with the correlation table added to both."""
    columns = ["genotype", "kappa", "L^E", "combined_rank", "val_acc", "train_loss", "params", "indicator_s",
               "train_s"]
    notes = (f"Digits 8x8 -> 32x32 RGB, 1437 train / 360 val. Indicators: proxy E={args.proxy_embed}, "
             f"{args.repeats} inits, batch {INDICATOR_BATCH}. Training: hidden {args.hidden}, {args.epochs} epochs "
             f"AdamW lr {args.lr} cosine, batch {args.batch_size}, seed {args.seed}. Total {seconds:.0f}s wall "
             "(seconds columns: wall time on a shared machine, other jobs may have run at the same time; "
             "the indicator and accuracy values are deterministic and do not depend on it).")
    json_path, md_path = harness.write("kendall", info, [markdown_row(r) for r in rows], columns, notes)
    data = {"machine": info, "rows": json_safe(rows), "notes": notes, "kendall_tau_vs_val_acc": taus,
            "settings": vars(args)}
    json_path.write_text(json.dumps(data, indent=2))  # the raw rows, not the Markdown-formatted ones
    lines = ["", "Kendall's tau-b against validation accuracy (n = %d; higher = indicator ranks like accuracy):" % len(rows),
             "", "| indicator | tau |", "|---|---|"] + [f"| {k} | {v:+.3f} |" for k, v in taus.items()]
    with md_path.open("a") as f:
        f.write("\n".join(lines) + "\n")
    log.info("wrote %s and %s", json_path, md_path)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--archs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--proxy-embed", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.perf_counter()
    train, val = load_digits32()
    rows = measure(sample_genotypes(args.archs, args.seed), train, val, args)
    taus = correlations(rows)
    seconds = time.perf_counter() - start
    log.info("\n%s", harness.table(rows, ["genotype", "kappa", "L^E", "combined_rank", "val_acc", "train_s"]))
    log.info("Kendall tau vs val acc: %s", {k: round(v, 3) for k, v in taus.items()})
    if not args.no_write:
        publish(harness.machine("cpu"), rows, taus, args, seconds)


if __name__ == "__main__":
    main()
