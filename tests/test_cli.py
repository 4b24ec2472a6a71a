"""The ``asvit`` command: bad input exits 2 with one line, ``info``, and the quick pipeline cut down
to seconds writes its report and resumes without redoing finished stages."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from asvit_kernels import cli


def run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv, needle", [
    ([], "command"),
    (["frobnicate"], "frobnicate"),
    (["train"], "--out"),
    (["pipeline", "--out", "x", "--preset", "huge"], "huge"),
    (["pipeline", "--out", "x", "--epochs", "0"], "--epochs"),
    (["pipeline", "--out", "x", "--epochs", "two"], "two"),
    (["search", "--out", "x", "--steps", "-3"], "--steps"),
    (["bench", "nope"], "nope"),
])
def test_bad_options_exit_2_with_one_line(argv, needle, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in err


def test_missing_data_path_names_the_path_and_layouts(tmp_path, capsys):
    missing = tmp_path / "no-such-dir"
    code, _, err = run(["train", "--out", str(tmp_path / "r"), "--data", str(missing), "--quiet"], capsys)
    assert code == 2 and str(missing) in err and len(err.strip().splitlines()) == 1


def test_schedule_that_does_not_fit_the_arch(tmp_path, capsys):
    code, _, err = run(["train", "--out", str(tmp_path / "r"), "--arch", "asvit", "--schedule", "vitas", "--quiet"],
                       capsys)
    assert code == 2 and "--schedule vitas" in err


def test_bad_genotype_is_a_usage_error(tmp_path, capsys):
    code, _, err = run(["scale", "--out", str(tmp_path / "s"), "--genotype", "8,2|oops", "--quiet"], capsys)
    assert code == 2 and "genotype" in err.lower()


def test_info_json(capsys):
    code, out, _ = run(["info", "--json"], capsys)
    info = json.loads(out)
    assert code == 0 and "version" in info and info["devices"]


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "asvit_kernels.cli", "pipeline", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "--preset" in r.stdout and "--data" in r.stdout


def test_quick_pipeline_cut_down_writes_report_and_resumes(tmp_path, capsys, one_thread, monkeypatch):
    from asvit_kernels.pipeline import run as pipeline_run
    out = tmp_path / "run"
    argv = ["pipeline", "--out", str(out), "--search-steps", "4", "--repeats", "1", "--epochs", "2",
            "--param-limit", "2.5e6", "3.5e6", "--quiet"]
    written = []  # the report as the run goes: after each stage and each epoch

    real = pipeline_run.write_report

    def write_report(run_dir, results):
        path = real(run_dir, results)
        train = results.get("train") or {}
        written.append((sorted(k for k in ("search", "scaling", "train") if results.get(k)),
                        train.get("status"), len(train.get("metrics") or []), path.read_text()))
        return path
    monkeypatch.setattr(pipeline_run, "write_report", write_report)
    estimates = []  # every estimate written into pipeline.json, in order
    real_write_json = pipeline_run.atomic.write_json

    def write_json(path, obj, *a, **kw):
        if Path(path).name == "pipeline.json" and "estimate" in obj:
            estimates.append(json.loads(json.dumps(obj["estimate"])))
        return real_write_json(path, obj, *a, **kw)
    monkeypatch.setattr(pipeline_run.atomic, "write_json", write_json)
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    _check_estimates(estimates, json.loads((out / "pipeline.json").read_text()))
    both, all3 = ["scaling", "search"], ["scaling", "search", "train"]
    assert [w[:3] for w in written] == [(["search"], None, 0), (both, None, 0), (both, None, 0), (all3, "running", 1),
                                        (all3, "running", 2), (all3, "finished", 2)]
    assert "Status: running after 1 of 2 epochs" in written[3][3] and "## Scaled family" in written[1][3]
    state = json.loads((out / "pipeline.json").read_text())
    est = state["estimate"]  # rewritten after every epoch: the last one has nothing left
    assert est["epochs_measured"] == 2 and est["remaining_seconds"] == 0 and set(est["stages"]) == {"search", "scale",
                                                                                                 "train"}
    assert abs(est["total_seconds"] - sum(est["stages"].values())) < 1e-6 and est["stages"]["train"] > 0
    report = (out / "report.md").read_text()
    assert "## Scaled family" in report and "## Training" in report
    for name in ("search", "family", "training"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    train = json.loads((out / "train" / "result.json").read_text())
    assert train["status"] == "finished" and train["final_acc"] > train["chance_acc"]
    family = json.loads((out / "scale" / "result.json").read_text())["family"]
    assert family[-1]["genotype"] == train["genotype"]  # "largest": the last scaling step
    # Rerun: every stage is finished, so nothing is recomputed and the report is the same.
    stamp = (out / "train" / "result.json").stat().st_mtime_ns
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert (out / "train" / "result.json").stat().st_mtime_ns == stamp
    # Other settings in the same run directory are refused.
    code, _, err = run(argv[:-1] + ["--lr", "0.5", "--quiet"], capsys)
    assert code == 2 and "other settings" in err


def _check_estimates(estimates, state):
    """Search and scaling are estimated from their first steps, training after each epoch; a
    finished stage counts with its measured seconds; the time left shrinks stage by stage."""
    stages = [e["measuring"] for e in estimates]
    firsts = {s: next(e for e in estimates if e["measuring"] == s) for s in ("search", "scale", "train")}
    assert stages == sorted(stages, key=("search", "scale", "train").index)  # in stage order
    for e in estimates:
        assert e["remaining_seconds"] >= 0 and abs(e["total_seconds"] - sum(e["stages"].values())) < 1e-6
        assert set(e["stages"]) == {"search", "scale", "train"}  # later stages estimated before they ran
    assert firsts["search"]["estimated"] == ["search", "scale", "train"] and firsts["search"]["steps_measured"] == 1
    after_search = firsts["scale"]  # the search is measured from here on
    assert after_search["stages"]["search"] == state["seconds"]["search"] and after_search["estimated"] == [
        "scale", "train"]
    assert firsts["train"]["stages"]["scale"] == state["seconds"]["scale"] and firsts["train"]["estimated"] == [
        "train"]
    left = [firsts[s]["remaining_seconds"] for s in ("search", "scale", "train")]
    assert left == sorted(left, reverse=True) and left[-1] > 0, left


def test_pipeline_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    code, stdout, err = run(["pipeline", "--out", str(out), "--dry-run", "--search-steps", "7", "--repeats", "1",
                             "--epochs", "3", "--param-limit", "2.5e6", "3.5e6", "--quiet"], capsys)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    assert lines[0].startswith("plan: quick preset on digits (nothing written")
    assert "7 REINFORCE steps x 1 initialisation(s)" in lines[1] and "growth steps" in lines[2]
    assert "3 epochs x 22 steps (batch 64)" in lines[3]
    # the digits' 359 validation images in batches of 64, after each of 3 epochs for the model and its EMA
    assert lines[4].startswith("  eval:    6 evaluations x 6 batches (batch 64), ") and "s/batch: ~" in lines[4]
    assert lines[5].startswith("  total:   ~") and len(lines) == 6
    assert not out.exists()
    code, _, err = run(["pipeline", "--out", str(out), "--dry-run", "--log-file", "--quiet"], capsys)
    assert code == 2 and "--log-file needs a PATH" in err and not out.exists()


def test_estimate_training_times_the_evaluation_passes(one_thread):
    """The dry run's evaluation part: timed batches x the validation set's batches (capped by
    eval_batches) x one pass per epoch for the model and one for its slowest EMA, if any."""
    from _train_runner import GENOTYPE

    from asvit_kernels.models.genotype import Genotype
    from asvit_kernels.pipeline.plan import estimate_training
    from asvit_kernels.pipeline.presets import preset
    from asvit_kernels.pipeline.run import train_config
    from asvit_kernels.train.data import open_dataset
    data, member = open_dataset(None), Genotype.parse(GENOTYPE)
    est = estimate_training(member, data, train_config(preset("quick"), epochs=3, eval_batches=2), timed=1)
    assert (est["eval_batches"], est["evaluations"], est["steps_per_epoch"]) == (2, 6, 22)
    assert est["seconds_per_eval_batch"] > 0 and est["eval_seconds"] == pytest.approx(est["seconds_per_eval_batch"] * 12)
    assert est["seconds"] == pytest.approx(est["train_seconds"] + est["eval_seconds"])
    no_ema = estimate_training(member, data, train_config(preset("quick"), epochs=3, ema_decays=(),
                                                          eval_batch_size=100), timed=1)
    assert (no_ema["eval_batches"], no_ema["evaluations"], no_ema["eval_batch_size"]) == (4, 3, 100)  # 359 images


def test_a_run_from_before_ema_at_switch_resumes_as_keep(tmp_path):
    """pipeline.json written before the option has no preset.ema_at_switch: those runs kept the EMA,
    so they resume with keep and refuse the new default, naming the setting."""
    from asvit_kernels import atomic
    from asvit_kernels.pipeline.presets import preset
    from asvit_kernels.pipeline.run import _load_state
    def settings(mode):  # as run_pipeline stores them: JSON types, no member
        p = {k: v for k, v in preset("quick").with_(ema_at_switch=mode).to_dict().items() if k != "member"}
        return json.loads(json.dumps({"preset": p, "seed": 0}))
    old = settings("keep")
    del old["preset"]["ema_at_switch"]
    atomic.write_json(tmp_path / "pipeline.json", {"settings": old, "seconds": {}})
    assert _load_state(tmp_path / "pipeline.json", settings("keep"))["settings"]["preset"]["ema_at_switch"] == "keep"
    with pytest.raises(ValueError, match="ema_at_switch"):
        _load_state(tmp_path / "pipeline.json", settings("restart"))
