"""The pipeline report: markdown sections and tables, PNG plots, missing sections, inf kappa, atomicity."""
import math
import re

import pytest

from asvit_kernels.pipeline.estimate import estimate_text, first_search_steps, stage_estimate
from asvit_kernels.pipeline.report import format_seconds, write_report
from asvit_kernels.pipeline.run import train_estimate

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GENO = "3,2,4|5,1,2|7,4,4|3,2,2|4"
TRAINED = "3,2,4,2|5,1,2,2|7,4,4,4|3,2,2,2|4,64"


def _results(kappa_special=None):
    history = [{"step": i, "genotype": GENO if i % 2 else "3,1,1|3,1,1|3,1,1|3,1,1|2",
                "kappa": 100.0 * (i + 1), "length_distortion": 0.5 + 0.1 * i, "reward": 0.1 * i - 0.2,
                "baseline": 0.05 * i, "entropy": 1.5 - 0.1 * i, "cached": i == 3} for i in range(6)]
    family = [{"step": s, "genotype": TRAINED, "depths": [1 + s, 1, 2, 1], "hidden": 32 * (1 + s),
               "params": 250_000 * (1 + s), "flops": 40_000_000 * (1 + s), "kappa": 300.0 / (1 + s),
               "length_distortion": 1.0 + 0.2 * s} for s in range(4)]
    if kappa_special is not None:
        history[2]["kappa"] = kappa_special
        family[1]["kappa"] = kappa_special
    stages = ["retokenize", "retokenize", "retokenize", "base", "base", "progressive"]
    metrics = [{"epoch": e, "train_loss": 2.0 / (e + 1), "val_loss": 2.2 / (e + 1), "val_acc": 40.0 + 9 * e,
                "val_acc_ema": None if e == 0 else 38.0 + 9.5 * e, "lr": 1e-3 * (1 - e / 6), "seconds": 4.5,
                "images_per_s": 1234.5, "stage": stages[e]} for e in range(6)]
    return {
        "title": "asvit pipeline: quick preset on digits", "preset": "quick",
        "command": "asvit pipeline --preset quick --data digits --out runs/q",
        "machine": "CPU (2 threads), torch 2.13.0",
        "data": {"name": "digits", "num_classes": 10, "train": 1437, "val": 360, "image_size": 32},
        "search": {"genotype": GENO, "steps": 6, "seconds": 12.3, "history": history},
        "scaling": {"seconds": 45.0, "stop_reason": "params budget reached", "chosen": 2, "family": family},
        "train": {"genotype": TRAINED, "params": 750_000, "flops": 120_000_000, "epochs": 6, "seconds": 27.0,
                  "schedule": "retokenize: [0, 0.5) stride 16 dil 5; base; progressive", "final_acc": 85.0,
                  "final_acc_ema": 85.5, "best_acc": 86.1, "chance_acc": 10.0, "metrics": metrics},
        "stages": {"search": 12.3, "scale": 45.0, "train": 3725.0},
    }


def _norm(text):
    return re.sub(r" +", " ", text)


def _section(text, title):
    return text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]


def _check_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1024


def test_full_report(tmp_path):
    path = write_report(tmp_path, _results())
    assert path == tmp_path / "report.md"
    text = path.read_text()
    norm = _norm(text)
    assert text.startswith("# asvit pipeline: quick preset on digits\n")
    assert "asvit pipeline --preset quick --data digits --out runs/q" in text
    assert "CPU (2 threads), torch 2.13.0" in text
    assert "digits - 10 classes, 1,437 train / 360 val images, 32x32 px" in text
    assert f"`{TRAINED}`" in text and f"`{GENO}`" in text
    chosen = _section(text, "Chosen architecture")
    assert "0.75 M" in chosen and "120.00 M" in chosen and "85.00 %" in chosen and "EMA 85.50 %" in chosen
    assert "86.10 %" in chosen and "10.00 %" in chosen
    for header in ("| stage | seconds | minutes | time |",
                   "| step | genotype | depths | hidden | params (M) | MACs (G) | kappa | L^E |",
                   "| epoch | stage | lr | train loss | val loss | val top-1 | EMA top-1 | images/s | seconds |"):
        assert header in norm
    for name in ("search", "family", "training"):
        assert f"![{name}](plots/{name}.png)" in text
        _check_png(tmp_path / "plots" / f"{name}.png")
    wall = _section(text, "Wall-clock")
    assert "1 h 02 min" in wall and "3782.3" in wall  # train stage; total
    assert "summed over every call" in wall  # a resumed stage's time is the sum of its calls, and says so
    # trained member marked, genotype pipes escaped inside the table
    fam = _section(text, "Scaled family")
    marked = [ln for ln in fam.splitlines() if "-> 2" in ln]
    assert len(marked) == 1 and TRAINED.replace("|", "\\|") in marked[0]
    assert "params budget reached" in fam
    # every table line of a table has its pipes at the same columns
    for block in re.findall(r"(?:^\|.*\n)+", text, flags=re.M):
        lines = block.splitlines()
        assert len({len(ln) for ln in lines}) == 1, block
    assert "retokenize: [0, 0.5) stride 16 dil 5" in _section(text, "Training")


def test_the_report_says_what_the_ema_does_at_a_switch(tmp_path):
    r = _results()
    r["train"]["ema_decays"] = [0.99]
    text = _norm(write_report(tmp_path, r).read_text())
    note = _section(text, "Training").split("EMA at a switch", 1)[1]
    assert "kept, not restarted" in note and "1/(1 - 0.99) = 100 steps" in note
    # two switches (retokenize -> base at epoch 3, base -> progressive at epoch 5), with the measured top-1s
    assert "epoch 2 -> 3 (base): EMA 57.00 % -> 66.50 %, model 58.00 % -> 67.00 %" in note
    assert "epoch 4 -> 5 (progressive)" in note
    no_ema = _results()
    for m in no_ema["train"]["metrics"]:
        m["val_acc_ema"] = None
    assert "EMA at a switch" not in write_report(tmp_path / "b", no_ema).read_text()


@pytest.mark.parametrize("mode, needle", [
    ("reseed", "re-seeded from the model's weights at each switch (`--ema-at-switch reseed`) - it switches"),
    ("restart", "(`--ema-at-switch restart`) and warms up again"),
])
def test_the_report_says_when_the_ema_is_reseeded(tmp_path, mode, needle):
    r = _results()
    r["train"].update(ema_decays=[0.99], ema_at_switch=mode)
    note = _section(_norm(write_report(tmp_path, r).read_text()), "Training").split("EMA at a switch", 1)[1]
    assert needle in note and "kept, not restarted" not in note and "1/(1 - 0.99) = 100 steps" in note
    assert "epoch 2 -> 3 (base): EMA 57.00 % -> 66.50 %" in note
    assert "bench/results/ema_at_switch_cpu2t.md" in note  # the quick preset's measurement of every mode


def test_a_running_training_says_so(tmp_path):
    r = _results()
    r["train"]["status"] = "running"
    r["train"]["metrics"] = r["train"]["metrics"][:2]
    text = _section(write_report(tmp_path, r).read_text(), "Training")
    assert ("Status: running after 2 of 6 epochs (this report is rewritten after every epoch, its plot at most "
            "every 30 s)") in text


def test_inf_and_nan_kappa(tmp_path):
    text = write_report(tmp_path, _results(math.inf)).read_text()
    assert "| inf |" in _norm(_section(text, "Scaled family"))
    assert "kappa = inf" in _section(text, "Topology search")
    for name in ("search", "family"):
        _check_png(tmp_path / "plots" / f"{name}.png")
    # the chosen member itself degenerate, and a NaN, must not crash either
    r = _results(math.nan)
    r["scaling"]["family"][2]["kappa"] = math.inf
    r["search"]["history"][0]["kappa"] = math.inf
    text = write_report(tmp_path / "nan", r).read_text()
    assert "nan" in _section(text, "Scaled family") and "inf" in _section(text, "Scaled family")
    _check_png(tmp_path / "nan" / "plots" / "family.png")


def test_only_data_and_train(tmp_path):
    full = _results()
    text = write_report(tmp_path, {"data": full["data"], "train": full["train"]}).read_text()
    for title in ("Topology search", "Scaled family"):
        assert "not run" in _section(text, title).lower()
    assert "| search | not run | not run |" in _norm(text) and "| train | 27.0 |" in _norm(text)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["training.png"]
    assert "plots/search.png" not in text and "plots/family.png" not in text
    assert TRAINED in text


def test_empty_lists_and_empty_results(tmp_path):
    r = _results()
    r["search"]["history"], r["scaling"]["family"], r["train"]["metrics"] = [], [], []
    text = write_report(tmp_path, r).read_text()
    assert GENO in text and not (tmp_path / "plots").exists()
    text = write_report(tmp_path / "bare", {}).read_text()
    for title in ("Chosen architecture", "Topology search", "Scaled family", "Training"):
        assert "not run" in _section(text, title).lower()


def test_atomic_no_leftovers(tmp_path):
    write_report(str(tmp_path), _results())
    write_report(tmp_path, _results())  # overwrite in place
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plots", "report.md"]


def test_unchanged_plots_are_not_redrawn(tmp_path, monkeypatch):
    import asvit_kernels.pipeline.report as report
    drawn = []
    for name in ("_plot_search", "_plot_family", "_plot_training"):
        real = getattr(report, name)
        monkeypatch.setattr(report, name, lambda *a, _real=real, _name=name: drawn.append(_name) or _real(*a))
    r = _results()
    write_report(tmp_path, r)
    assert sorted(drawn) == ["_plot_family", "_plot_search", "_plot_training"]
    drawn.clear()
    r["train"]["metrics"].append({**r["train"]["metrics"][-1], "epoch": 6})  # one more epoch: training only
    write_report(tmp_path, r)
    assert drawn == ["_plot_training"]
    drawn.clear()
    r["scaling"]["chosen"] = 1  # another trained member: the family plot marks it
    (tmp_path / "plots" / "search.png").write_bytes(b"edited")  # a file changed since: drawn again
    write_report(tmp_path, r)
    assert sorted(drawn) == ["_plot_family", "_plot_search"]
    _check_png(tmp_path / "plots" / "search.png")
    drawn.clear()
    write_report(tmp_path / "other", r)  # another directory has its own files
    assert len(drawn) == 3


def test_a_running_training_plot_is_redrawn_at_most_every_interval(tmp_path, monkeypatch):
    import asvit_kernels.pipeline.report as report
    drawn, now = [], [1000.0]
    monkeypatch.setattr(report, "_plot_training", lambda *a, _real=report._plot_training: drawn.append(1) or _real(*a))
    monkeypatch.setattr(report.time, "monotonic", lambda: now[0])
    r = _results()
    r["train"]["status"] = "running"
    write_report(tmp_path, r)
    metrics = r["train"]["metrics"]
    metrics.append({**metrics[-1], "epoch": 6})
    now[0] += report.RUNNING_PLOT_EVERY - 1
    write_report(tmp_path, r)  # another epoch, drawn 29 s ago: the plot is kept
    assert len(drawn) == 1
    now[0] += 1
    write_report(tmp_path, r)
    assert len(drawn) == 2
    metrics.append({**metrics[-1], "epoch": 7})
    r["train"]["status"] = "finished"
    write_report(tmp_path, r)  # the stage's end draws the last epochs at once
    assert len(drawn) == 3


@pytest.mark.parametrize("s, expected", [
    (0, "0.0 s"), (4.2, "4.2 s"), (59.94, "59.9 s"), (59.96, "1 min 00 s"), (192, "3 min 12 s"),
    (3599.4, "59 min 59 s"), (3599.6, "1 h 00 min"), (3725, "1 h 02 min"), (90061, "25 h 01 min"),
])
def test_format_seconds(s, expected):
    assert format_seconds(s) == expected


def test_train_estimate_scales_the_measured_epochs():
    # 2 epochs of 20 done in 30 s this call, after an earlier call that spent 100 s in training
    est = train_estimate(30.0, 2, 5, 20, {"search": 40.0, "scale": 60.0}, earlier_calls=100.0)
    assert est["seconds_per_epoch"] == 15.0 and est["remaining_seconds"] == 15 * 15.0
    assert est["stages"] == {"search": 40.0, "scale": 60.0, "train": 100.0 + 30.0 + 225.0}
    assert est["total_seconds"] == 40 + 60 + 355 and est["epochs_measured"] == 2


def test_stage_estimate_sums_measured_and_estimated_stages():
    # scaling running (20 s spent, 10 s left) after a 40 s search, training estimated at 100 s
    est = stage_estimate("scale", 20.0, 10.0, {"search": 40.0}, {"train": 100.0})
    assert est["stages"] == {"search": 40.0, "scale": 30.0, "train": 100.0} and est["total_seconds"] == 170.0
    assert est["remaining_seconds"] == 110.0 and est["stage_remaining_seconds"] == 10.0
    assert est["measuring"] == "scale" and est["estimated"] == ["scale", "train"]
    # a finished stage keeps its measured seconds over a later-stage guess; a negative time left is 0
    est = stage_estimate("search", 5.0, -1.0, {"scale": 7.0}, {"scale": 3.0, "train": 4.0})
    assert est["stages"] == {"search": 5.0, "scale": 7.0, "train": 4.0} and est["remaining_seconds"] == 4.0
    assert estimate_text(est, "2 of 4 steps at 1 s/step") == (
        "search: estimated 5 s for the stage, 0 s left (2 of 4 steps at 1 s/step); pipeline: estimated total 16 s "
        "(search 5 s estimated, scaling 7 s measured, training 4 s estimated), 4 s left")
    with pytest.raises(ValueError, match="stage must be one of"):
        stage_estimate("evolution", 1.0, 1.0, {}, {})
    assert [first_search_steps(n) for n in (1, 4, 20, 60, 500)] == [1, 1, 2, 5, 5]
