"""The pipeline's report: ``run_dir/report.md`` plus PNG plots under ``run_dir/plots/``.

``write_report(run_dir, results)`` takes the plain results mapping the pipeline keeps (every section
optional: a missing one is reported as not run) and writes each file atomically. Plots use
``matplotlib.figure.Figure`` directly, so no pyplot backend or global state is touched.

Infinite values (kappa of a degenerate NTK) are drawn as triangles on the top edge of their panel
and printed as ``inf``; NaN and None are skipped in plots and printed as ``nan`` / ``-``.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

from asvit_kernels import atomic

__all__ = ["write_report", "format_seconds"]

_DPI = 120
#: Seconds between redraws of the training plot while training runs (status "running"): it costs
#: ~0.4 s and a quick-preset epoch ~5 s (1 thread). Any other report draws what changed.
RUNNING_PLOT_EVERY = 30.0
_STAGES = ("search", "scale", "train")
_SECTION_OF_STAGE = {"search": "search", "scale": "scaling", "train": "train"}


# ----------------------------------------------------------------------------- formatting


def format_seconds(s: float) -> str:
    """``4.2 s``, ``3 min 12 s``, ``1 h 02 min``."""
    s = _num(s)
    if not math.isfinite(s):
        return f"{s} s"
    if s < 0:
        return "-" + format_seconds(-s)
    if round(s, 1) < 60:
        return f"{s:.1f} s"
    if round(s) < 3600:
        m, sec = divmod(round(s), 60)
        return f"{m} min {sec:02d} s"
    h, m = divmod(round(s / 60), 60)
    return f"{h} h {m:02d} min"


def _num(x: Any) -> float:
    """``x`` as a float; None or anything unconvertible is NaN."""
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _fmt(x: Any, spec: str) -> str:
    """``format(x, spec)`` for numbers; ``-`` for None, ``inf`` / ``nan`` for non-finite values."""
    if x is None:
        return "-"
    v = _num(x)
    if math.isnan(v) and not isinstance(x, (int, float)):
        return str(x)
    if not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return format(v, spec)


def _kappa(x: Any) -> str:
    return _fmt(x, ".4g")


def _scaled(x: Any, div: float, spec: str) -> str:
    return _fmt(None if x is None else _num(x) / div, spec)


def _params_m(n: Any) -> str:
    return _scaled(n, 1e6, ".2f")


def _macs(n: Any) -> str:
    """Multiply-adds with a fitting unit (G, M or K)."""
    v = _num(n)
    if n is None or not math.isfinite(v):
        return _fmt(n, "")
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.0f}"


def _pct(x: Any) -> str:
    s = _fmt(x, ".2f")
    return s + " %" if x is not None else s


def _cell_code(text: Any) -> str:
    """Inline code inside a table cell (pipes escaped, as GFM tables require)."""
    return "`" + str(text).replace("|", "\\|") + "`" if text is not None else "-"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[int] = ()) -> str:
    """A markdown table with aligned pipes; columns in ``right`` are right-aligned."""
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(3, *(len(r[i]) for r in cells)) for i in range(len(header))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(r, widths))) + " |"

    sep = "| " + " | ".join("-" * (w - 1) + ":" if i in right else "-" * w for i, w in enumerate(widths)) + " |"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


# ----------------------------------------------------------------------------- plots


def _figure(figsize: tuple[float, float], nrows: int, ncols: int, **kw):
    from matplotlib.figure import Figure  # needs no backend

    fig = Figure(figsize=figsize, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI)
    return buf.getvalue()


def _legend(ax, loc: str = "best") -> None:
    if ax.get_legend_handles_labels()[0]:  # only labelled artists; avoids matplotlib's warning
        ax.legend(fontsize=8, loc=loc)


def _series(ax, xs: Sequence[float], ys: Sequence[float], *, log: bool = False, style: str = "-o",
            labels: Sequence[str] | None = None, **kw) -> list[int]:
    """Plot the finite points of ``ys`` (positive ones only when ``log``); +inf points become
    triangles on the top edge. NaN is skipped. Returns the indices drawn on the top edge."""
    ok = [i for i, y in enumerate(ys) if math.isfinite(y) and (y > 0 or not log)]
    top = [i for i, y in enumerate(ys) if y == math.inf]
    edge = ax.get_xaxis_transform()  # x in data, y in axes fraction
    if ok:
        ax.plot([xs[i] for i in ok], [ys[i] for i in ok], style, **kw)
        if log:
            ax.set_yscale("log")
    if top:
        ax.plot([xs[i] for i in top], [1.0] * len(top), "^", color="C3", transform=edge, clip_on=False,
                linestyle="none", label="inf (top edge)")
    for i in (ok + top) if labels is not None else ():
        xy, coords = ((xs[i], ys[i]), "data") if i in ok else ((xs[i], 1.0), edge)
        ax.annotate(labels[i], xy, xycoords=coords, textcoords="offset points", xytext=(4, -10 if i in top else 4),
                    fontsize=7)
    return top


def _plot_search(history: Sequence[Mapping]) -> bytes:
    steps = [_num(h.get("step", i)) for i, h in enumerate(history)]
    col = lambda k: [_num(h.get(k)) for h in history]  # noqa: E731
    fig, axes = _figure((7, 7.5), 3, 1, sharex=True)
    ax = axes[0, 0]
    _series(ax, steps, col("reward"), style="-o", ms=3, lw=1, label="reward")
    _series(ax, steps, col("baseline"), style="-", lw=1.5, color="C1", label="baseline")
    ax.set_ylabel("reward")
    _legend(ax)
    ax = axes[1, 0]
    _series(ax, steps, col("kappa"), log=True, style="-o", ms=3, lw=1, color="C2")
    _legend(ax, "lower right")
    ax.set_ylabel("kappa (NTK condition)")
    ax = axes[2, 0]
    _series(ax, steps, col("length_distortion"), style="-o", ms=3, lw=1, color="C4")
    _legend(ax, "lower right")
    ax.set_ylabel("L^E (length distortion)")
    ax.set_xlabel("step")
    for a in axes[:, 0]:
        a.grid(alpha=0.3)
    fig.suptitle("Topology search (REINFORCE)")
    return _png(fig)


def _plot_family(family: Sequence[Mapping], chosen: int | None) -> bytes:
    params = [_num(m.get("params")) / 1e6 for m in family]
    labels = [str(m.get("step", i)) for i, m in enumerate(family)]
    fig, axes = _figure((10, 4), 1, 2)
    for ax, key, name, log in ((axes[0, 0], "kappa", "kappa", True),
                               (axes[0, 1], "length_distortion", "L^E", False)):
        ys = [_num(m.get(key)) for m in family]
        _series(ax, params, ys, log=log, style="o", ms=5, labels=labels, label="family")
        if chosen is not None:
            y = ys[chosen]
            if y == math.inf:
                ax.plot([params[chosen]], [1.0], "*", ms=14, color="C3", transform=ax.get_xaxis_transform(),
                        clip_on=False, label="trained")
            elif math.isfinite(y) and (y > 0 or not log):
                ax.plot([params[chosen]], [y], "*", ms=14, color="C3", label="trained")
        ax.set_xlabel("params (M)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.suptitle("Scaled family (points labelled by growth step)")
    return _png(fig)


def _plot_training(metrics: Sequence[Mapping], chance: float | None) -> bytes:
    epochs = [_num(m.get("epoch", i)) for i, m in enumerate(metrics)]
    col = lambda k: [_num(m.get(k)) for m in metrics]  # noqa: E731
    fig, axes = _figure((10, 4), 1, 2, sharex=True)
    loss, acc = axes[0, 0], axes[0, 1]
    _series(loss, epochs, col("train_loss"), style="-o", ms=3, label="train")
    _series(loss, epochs, col("val_loss"), style="-o", ms=3, label="val")
    _series(acc, epochs, col("val_acc"), style="-o", ms=3, label="val")
    if any(m.get("val_acc_ema") is not None for m in metrics):
        _series(acc, epochs, col("val_acc_ema"), style="-s", ms=3, label="val EMA")
    if chance is not None and math.isfinite(_num(chance)):
        acc.axhline(_num(chance), color="gray", lw=1, ls="--", label="chance")
    stages = [m.get("stage") for m in metrics]
    for i in range(1, len(metrics)):
        if stages[i] != stages[i - 1]:
            x = (epochs[i - 1] + epochs[i]) / 2
            for ax in (loss, acc):
                ax.axvline(x, color="gray", ls=":", lw=1)
            loss.text(x, 0.98, f"{stages[i]} ", transform=loss.get_xaxis_transform(), fontsize=7, va="top",
                      ha="right", rotation=90)
    loss.set_ylabel("loss")
    acc.set_ylabel("top-1 (%)")
    for ax in (loss, acc):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        _legend(ax)
    fig.suptitle("Training" + (f" (first stage: {stages[0]})" if stages and stages[0] else ""))
    return _png(fig)


# ----------------------------------------------------------------------------- markdown


def _header(r: Mapping) -> list[str]:
    out = [f"# {r.get('title') or 'asvit pipeline report'}", ""]
    if r.get("preset"):
        out.append(f"- Preset: {r['preset']}")
    if r.get("command"):
        out.append(f"- Command: `{r['command']}`")
    if r.get("machine"):
        out.append(f"- Machine: {r['machine']}")
    d = r.get("data")
    if d:
        parts = []
        if d.get("num_classes") is not None:
            parts.append(f"{d['num_classes']} classes")
        if d.get("train") is not None or d.get("val") is not None:
            parts.append(f"{_fmt(d.get('train'), ',.0f')} train / {_fmt(d.get('val'), ',.0f')} val images")
        if d.get("image_size") is not None:
            parts.append(f"{d['image_size']}x{d['image_size']} px")
        out.append(f"- Data: {d.get('name', '?')}" + (" - " + ", ".join(parts) if parts else ""))
    else:
        out.append("- Data: not recorded")
    return out + [""]


def _chosen_index(r: Mapping) -> int | None:
    sc = r.get("scaling") or {}
    i = sc.get("chosen")
    return i if isinstance(i, int) and 0 <= i < len(sc.get("family") or []) else None


def _chosen_member(r: Mapping) -> Mapping | None:
    i = _chosen_index(r)
    return None if i is None else r["scaling"]["family"][i]


def _chosen_section(r: Mapping) -> list[str]:
    out = ["## Chosen architecture", ""]
    t, member = r.get("train"), _chosen_member(r)
    src = t or member
    if not src:
        return out + ["_Not run._ (neither scaling nor training has results)", ""]
    out += [f"- Genotype: `{src.get('genotype', '?')}`",
            f"- Params: {_params_m(src.get('params'))} M, MACs: {_macs(src.get('flops'))}"]
    if not t:
        return out + ["- Training: _not run_", ""]
    ema = t.get("final_acc_ema")
    out.append(f"- Final top-1: {_pct(t.get('final_acc'))}" + (f" (EMA {_pct(ema)})" if ema is not None else ""))
    out.append(f"- Best top-1: {_pct(t.get('best_acc'))}; chance level: {_pct(t.get('chance_acc'))}")
    return out + [""]


def _wallclock_section(r: Mapping) -> list[str]:
    stages = dict(r.get("stages") or {})
    for name in _STAGES:  # fall back to the seconds a section recorded itself
        sec = r.get(_SECTION_OF_STAGE[name])
        if stages.get(name) is None and sec and sec.get("seconds") is not None:
            stages[name] = sec["seconds"]
    names = list(_STAGES) + [k for k in stages if k not in _STAGES]
    rows, total = [], 0.0
    for name in names:
        s = stages.get(name)
        if s is None:
            rows.append([name, "not run", "not run", ""])
            continue
        total += _num(s) if math.isfinite(_num(s)) else 0.0
        rows.append([name, _fmt(s, ".1f"), _fmt(_num(s) / 60, ".2f"), format_seconds(s)])
    rows.append(["**total**", f"**{total:.1f}**", f"**{total / 60:.2f}**", f"**{format_seconds(total)}**"])
    return ["## Wall-clock", "", _table(["stage", "seconds", "minutes", "time"], rows, right=(1, 2, 3)), "",
            "A stage's time is summed over every call that ran it: a resumed stage counts each call, a killed call "
            "up to its stage's last checkpoint (work redone after a kill counts again).", ""]


def _search_section(r: Mapping, plot: str | None) -> list[str]:
    out = ["## Topology search", ""]
    s = r.get("search")
    if not s:
        return out + ["_Not run._", ""]
    hist = s.get("history") or []
    out += [f"- Steps: {s.get('steps', len(hist))}",
            f"- Argmax genotype: `{s.get('genotype', '?')}`",
            f"- Time: {format_seconds(s['seconds']) if s.get('seconds') is not None else '-'}"]
    cached = sum(bool(h.get("cached")) for h in hist)
    if cached:
        out.append(f"- {cached} of {len(hist)} steps reused a cached measurement")
    n_inf = sum(_num(h.get("kappa")) == math.inf for h in hist)
    if n_inf:
        out.append(f"- {n_inf} step(s) had kappa = inf (degenerate NTK), drawn as triangles on the top edge")
    out.append("")
    scored = [h for h in hist if math.isfinite(_num(h.get("reward")))]
    if scored:
        best = max(scored, key=lambda h: _num(h["reward"]))
        out += [f"Best reward {_fmt(best.get('reward'), '+.3f')} at step {best.get('step')}: `{best.get('genotype')}` "
                f"(kappa {_kappa(best.get('kappa'))}, L^E {_fmt(best.get('length_distortion'), '.4g')}).", ""]
    out += [f"![search]({plot})", ""] if plot else ["No search history recorded; no plot.", ""]
    return out


def _scaling_section(r: Mapping, plot: str | None) -> list[str]:
    out = ["## Scaled family", ""]
    s = r.get("scaling")
    if not s:
        return out + ["_Not run._", ""]
    fam, chosen = s.get("family") or [], _chosen_index(r)
    out += [f"- Stop reason: {s.get('stop_reason', '-')}",
            f"- Time: {format_seconds(s['seconds']) if s.get('seconds') is not None else '-'}", ""]
    if not fam:
        return out + ["No family members recorded; no plot.", ""]
    rows = []
    for i, m in enumerate(fam):
        mark = "-> " if i == chosen else ""
        depths = ",".join(map(str, m.get("depths") or [])) or "-"
        rows.append([f"{mark}{m.get('step', '-')}", _cell_code(m.get("genotype")), depths, _fmt(m.get("hidden"), ".0f"),
                     _params_m(m.get("params")), _scaled(m.get("flops"), 1e9, ".3f"),
                     _kappa(m.get("kappa")), _fmt(m.get("length_distortion"), ".4g")])
    header = ["step", "genotype", "depths", "hidden", "params (M)", "MACs (G)", "kappa", "L^E"]
    out += [_table(header, rows, right=(0, 3, 4, 5, 6, 7)), ""]
    if chosen is not None:
        out += ["`->` marks the trained member.", ""]
    return out + ([f"![family]({plot})", ""] if plot else [])


def _training_section(r: Mapping, plot: str | None) -> list[str]:
    out = ["## Training", ""]
    t = r.get("train")
    if not t:
        return out + ["_Not run._", ""]
    metrics = t.get("metrics") or []
    out += [f"- Genotype: `{t.get('genotype', '?')}`",
            f"- Epochs: {t.get('epochs', len(metrics))}, time: "
            f"{format_seconds(t['seconds']) if t.get('seconds') is not None else '-'}",
            f"- Schedule: {t.get('schedule') or '-'}"]
    status = t.get("status")
    if status and status != "finished":
        how = "(rerun the same command to continue)"
        if status == "running":
            how = f"(this report is rewritten after every epoch, its plot at most every {RUNNING_PLOT_EVERY:g} s)"
        out.append(f"- Status: {status} after {len(metrics)} of {t.get('epochs', '?')} epochs {how}")
    out.append("")
    if not metrics:
        return out + ["No per-epoch metrics recorded; no plot.", ""]
    rows = [[_fmt(m.get("epoch"), ".0f"), m.get("stage") or "-", _fmt(m.get("lr"), ".3g"),
             _fmt(m.get("train_loss"), ".4f"), _fmt(m.get("val_loss"), ".4f"), _fmt(m.get("val_acc"), ".2f"),
             _fmt(m.get("val_acc_ema"), ".2f"), _fmt(m.get("images_per_s"), ".0f"), _fmt(m.get("seconds"), ".1f")]
            for m in metrics]
    header = ["epoch", "stage", "lr", "train loss", "val loss", "val top-1", "EMA top-1", "images/s", "seconds"]
    out += [_table(header, rows, right=(0, 2, 3, 4, 5, 6, 7, 8)), ""]
    out += ([f"![training]({plot})", ""] if plot else []) + _ema_at_switches(t, metrics)
    return out


def _ema_at_switches(t: Mapping, metrics: Sequence[Mapping]) -> list[str]:
    """What the EMA copy does at a re-tokenization / growth switch, with the measured effect."""
    switches = [i for i in range(1, len(metrics)) if metrics[i].get("stage") != metrics[i - 1].get("stage")]
    if not switches or not any(m.get("val_acc_ema") is not None for m in metrics):
        return []
    decays = t.get("ema_decays") or []
    slow = max(decays) if decays else None
    horizon = f", about 1/(1 - {slow:g}) = {1 / (1 - slow):,.0f} steps" if slow is not None and slow < 1 else ""
    changes = "; ".join(f"epoch {_fmt(metrics[i - 1].get('epoch'), '.0f')} -> {_fmt(metrics[i].get('epoch'), '.0f')}"
                        f" ({metrics[i].get('stage') or '-'}): EMA {_pct(metrics[i - 1].get('val_acc_ema'))} -> "
                        f"{_pct(metrics[i].get('val_acc_ema'))}, model {_pct(metrics[i - 1].get('val_acc'))} -> "
                        f"{_pct(metrics[i].get('val_acc'))}" for i in switches)
    mode = t.get("ema_at_switch") or "keep"
    if mode in ("reseed", "restart"):
        what = (f"the EMA copy is re-seeded from the model's weights at each switch (`--ema-at-switch {mode}`)"
                + (" and warms up again (its decay ramps from 0.1 to the configured one)" if mode == "restart" else "")
                + " - it switches its tokenization with the model and from then on averages only weights trained "
                f"under the new tokenization (its memory{horizon})")
    else:
        what = ("the EMA copy is kept, not restarted (`--ema-at-switch keep`) - it switches its tokenization with the "
                "model and goes on averaging, so right after a switch it still holds weights trained under the "
                f"previous tokenization (its memory{horizon}) and its top-1 can drop until they are averaged out")
    return [f"EMA at a switch (dotted lines in the plot): {what}. Measured here: {changes}. {EMA_MEASURED}", ""]


#: The three behaviours measured on the quick preset (same search, family and model trajectory).
EMA_MEASURED = ("On the quick preset (digits, EMA 0.99, stride 7 -> 4 after epoch 8; "
                "bench/results/ema_at_switch_cpu2t.md) the EMA's top-1 right after the switch / at the end was "
                "16.16 % / 93.59 % kept, 21.45 % / 93.87 % reseeded and 67.41 % / 95.54 % restarted (the model: "
                "68.25 % / 95.82 %), so `restart` is the default; part of its final gain is the shorter memory "
                "its warm-up still has at the end (decay 0.964 after 242 steps).")


# ----------------------------------------------------------------------------- entry point


#: path -> (digest of the plot's inputs, (size, mtime_ns) of the file written from them, when)
_WRITTEN: dict[str, tuple[str, tuple[int, int], float]] = {}


def _write_plot(path: Path, render: Callable[..., bytes], args: tuple, min_interval: float) -> None:
    """Write ``render(*args)`` to ``path``, unless this process wrote that file (unchanged since)
    from the same inputs, or from others less than ``min_interval`` seconds ago. The pipeline
    rewrites the report after every training epoch: redrawing the unchanged search and family
    plots took 1.1 s of each 1.5 s rewrite, the training plot 0.4 s (1 thread, load ~2.6)."""
    digest = hashlib.sha256(json.dumps(args, sort_keys=True, default=repr).encode()).hexdigest()
    key = str(path.resolve())
    done = _WRITTEN.get(key)
    if done is not None and done[1] == _stat(path) and (
            done[0] == digest or time.monotonic() - done[2] < min_interval):
        return
    atomic.write_bytes(path, render(*args))
    _WRITTEN[key] = digest, _stat(path), time.monotonic()


def _stat(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_size, st.st_mtime_ns


def write_report(run_dir: Union[str, os.PathLike], results: Mapping) -> Path:
    """Write ``run_dir/report.md`` and its plots (``run_dir/plots/*.png``); return the report path.

    Each file is written atomically. A plot is written only for a section that has data to plot,
    and redrawn only when its data changed (by this process, from the file it wrote); while
    training runs, its plot at most every ``RUNNING_PLOT_EVERY`` seconds.
    """
    run_dir = Path(run_dir)
    search, scaling, train = (results.get(k) or {} for k in ("search", "scaling", "train"))
    chosen = _chosen_index(results)

    plot_interval = RUNNING_PLOT_EVERY if train.get("status") == "running" else 0.0
    jobs: dict[str, tuple[Callable[..., bytes], tuple, float]] = {}
    if search.get("history"):
        jobs["search"] = _plot_search, (search["history"],), 0.0
    if scaling.get("family"):
        jobs["family"] = _plot_family, (scaling["family"], chosen), 0.0
    if train.get("metrics"):
        jobs["training"] = _plot_training, (train["metrics"], train.get("chance_acc")), plot_interval
    links = {}
    for name, (render, args, interval) in jobs.items():
        _write_plot(run_dir / "plots" / f"{name}.png", render, args, interval)
        links[name] = f"plots/{name}.png"

    lines = (_header(results) + _chosen_section(results) + _wallclock_section(results)
             + _search_section(results, links.get("search")) + _scaling_section(results, links.get("family"))
             + _training_section(results, links.get("training")))
    path = run_dir / "report.md"
    atomic.write_bytes(path, ("\n".join(lines).rstrip() + "\n").encode())
    return path
