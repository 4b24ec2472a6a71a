"""Failure behaviour of the ``asvit`` command and the pipeline (issue 17): bad options and damaged
run-directory files exit 2 with one line naming the option or file, before any work; a run
directory is locked against a second run; Ctrl-C checkpoints and exits 130; a pipeline rerun with
other settings names them; a resumed stage's time is summed over its calls."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from asvit_kernels import cli, runlock
from asvit_kernels.pipeline import run as pipeline_run
from asvit_kernels.pipeline.presets import preset

GENOTYPE = "8,2,3|4,1,2|4,1,4|4,1,6|32"


def run(argv, capsys):
    code = cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ----------------------------------------------------------------------------- --out

@pytest.mark.parametrize("command", [["search"], ["scale", "--genotype", GENOTYPE], ["train"], ["pipeline"]])
def test_empty_out_is_refused(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, _, err = run([command[0], "--out", "", *command[1:], "--quiet"], capsys)
    assert code == 2 and "--out" in one_line(err) and "empty" in err
    assert os.listdir(tmp_path) == []  # nothing written into the current directory


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    code, _, err = run(["pipeline", "--out", str(f), "--quiet"], capsys)
    assert code == 2 and str(f) in one_line(err) and "not a directory" in err and f.read_text() == "mine"


# ----------------------------------------------------------------------------- numeric options

T, P, S = ["train", "--out", "OUT"], ["pipeline", "--out", "OUT"], ["scale", "--out", "OUT", "--genotype", GENOTYPE]


@pytest.mark.parametrize("argv, needle", [
    (P + ["--lr", "inf"], "--lr"), (P + ["--lr", "nan"], "--lr"), (P + ["--lr", "0"], "--lr"),
    (P + ["--min-lr", "0.1"], "min_lr"), (T + ["--lr", "1e-3", "--min-lr", "1e-2"], "min_lr"),
    (P + ["--member", "abc"], "--member"), (P + ["--member", "1.5"], "--member"),
    (T + ["--patch-size", "0"], "--patch-size"), (T + ["--depth", "0"], "--depth"), (T + ["--heads", "0"], "--heads"),
    (T + ["--embed-dim", "-4"], "--embed-dim"), (T + ["--vitas-scale", "0"], "--vitas-scale"),
    (T + ["--vitas-scale", "inf"], "--vitas-scale"), (T + ["--autoprog-stages", "0"], "--autoprog-stages"),
    (T + ["--flops-range", "4e6", "2e6"], "--flops-range"), (T + ["--flops-range", "1", "inf"], "--flops-range"),
    (T + ["--workers", "-1"], "--workers"), (T + ["--ema-decays", "1.0"], "--ema-decays"),
    (T + ["--label-smoothing", "1.5"], "--label-smoothing"), (T + ["--drop-path", "1"], "--drop-path"),
    (T + ["--warmup-epochs", "inf"], "--warmup-epochs"), (T + ["--clip-grad", "0"], "--clip-grad"),
    (T + ["--weight-decay", "-1"], "--weight-decay"), (T + ["--eval-batches", "0"], "--eval-batches"),
    (T + ["--checkpoint-every", "-1"], "--checkpoint-every"), (T + ["--batch-size", "0"], "--batch-size"),
    (T + ["--seed", "-1"], "--seed"), (P + ["--search-steps", "0"], "--search-steps"),
    (P + ["--repeats", "0"], "--repeats"), (P + ["--epochs", "inf"], "--epochs"),
    (S + ["--param-limit", "5e6", "3e6"], "--param-limit"), (S + ["--param-limit", "inf", "inf"], "--param-limit"),
    (["search", "--out", "OUT", "--steps", "0"], "--steps"),
])
def test_bad_numeric_option_is_one_line_before_any_work(argv, needle, tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run([str(out) if a == "OUT" else a for a in argv] + ["--quiet"], capsys)
    assert code == 2 and needle in one_line(err)
    assert not out.exists()  # refused before the run directory was even created


# ----------------------------------------------------------------------------- the run-directory lock

def _hold_in_subprocess(run_dir: Path) -> subprocess.Popen:
    code = ("import sys, time; from asvit_kernels import runlock\n"
            "with runlock.hold(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_run_into_a_locked_directory_exits_2_naming_it_and_the_pid(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = _hold_in_subprocess(run_dir)
    try:
        code, _, err = run(["search", "--out", str(run_dir), "--steps", "1", "--repeats", "1", "--quiet"], capsys)
        line = one_line(err)
        assert code == 2 and str(run_dir) in line and f"PID {holder.pid}" in line
        assert sorted(os.listdir(run_dir)) == [runlock.LOCK_NAME]  # the second run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with runlock.hold(run_dir):  # the kernel dropped the killed holder's lock: no stale lock
        pass


def test_lock_is_exclusive_within_one_process_too(tmp_path):
    with runlock.hold(tmp_path):
        with pytest.raises(runlock.RunDirectoryLocked, match=f"PID {os.getpid()}"):
            with runlock.hold(tmp_path):
                pass
    with runlock.hold(tmp_path):  # released on exit
        pass


def test_only_rank_0_takes_the_lock(tmp_path, monkeypatch):
    args = cli.build_parser().parse_args(["search", "--out", str(tmp_path)])
    with runlock.hold(tmp_path):
        monkeypatch.setenv("RANK", "1")
        with cli._run_dir_lock(args):  # another rank of the same run: no error
            pass
        monkeypatch.setenv("RANK", "0")
        with pytest.raises(cli.UsageError, match="in use"):
            with cli._run_dir_lock(args):
                pass


# ----------------------------------------------------------------------------- damaged run-directory files

def test_corrupt_search_state_is_one_line_naming_it(tmp_path, capsys):
    state = tmp_path / "topology_state.pt"
    state.write_bytes(b"PK\x03\x04 not a torch file")
    code, _, err = run(["search", "--out", str(tmp_path), "--steps", "2", "--repeats", "1", "--quiet"], capsys)
    line = one_line(err)
    assert code == 2 and str(state) in line and "damaged" in line


@pytest.mark.parametrize("command, stage_file, content, needle", [
    (["search"], "result.json", "{garbage", "not valid JSON"),
    (["search"], "result.json", '{"genotype": "x"}', "'seconds'"),
    (["scale", "--genotype", GENOTYPE], "result.json", '{"seconds": 1}', "'family'"),
    (["scale", "--genotype", GENOTYPE], "result.json", '{"seconds": 1, "family": []}', "non-empty list"),
])
def test_damaged_stage_result_is_one_line_naming_it(tmp_path, capsys, command, stage_file, content, needle):
    (tmp_path / stage_file).write_text(content)
    code, _, err = run([command[0], "--out", str(tmp_path), *command[1:], "--quiet"], capsys)
    line = one_line(err)
    assert code == 2 and str(tmp_path / stage_file) in line and needle in line


@pytest.mark.parametrize("content, needle", [("", "not valid JSON"), ("[]", "JSON object"),
                                             ('{"settings": {}}', "'seconds'"),
                                             ('{"settings": 1, "seconds": {}}', "must be JSON objects")])
def test_damaged_pipeline_json_is_one_line_naming_it(tmp_path, capsys, content, needle):
    (tmp_path / "pipeline.json").write_text(content)
    code, _, err = run(["pipeline", "--out", str(tmp_path), "--quiet"], capsys)
    line = one_line(err)
    assert code == 2 and str(tmp_path / "pipeline.json") in line and needle in line


def test_damaged_train_result_names_it(tmp_path):
    (tmp_path / "result.json").write_text('{"status": "finished"}')
    with pytest.raises(ValueError, match="result.json is damaged: missing key"):
        pipeline_run.run_train(tmp_path, None, GENOTYPE, None, "paper")


# ----------------------------------------------------------------------------- the pipeline with fake stages

class FakeStages:
    """Stand-ins for the three stages (the pipeline's bookkeeping is under test, not the stages)."""

    def __init__(self, monkeypatch, family=3):
        self.family, self.calls, self.scale_crash, self.train_status = family, [], False, ["finished"]
        self.train_sleep = 0.0
        monkeypatch.setattr(pipeline_run, "run_search", self.search)
        monkeypatch.setattr(pipeline_run, "run_scale", self.scale)
        monkeypatch.setattr(pipeline_run, "run_train", self.train)

    def _done(self, out, result):
        out.mkdir(parents=True, exist_ok=True)
        pipeline_run._write_result(out, result)
        return result

    def search(self, out, data, preset, **kw):
        self.calls.append("search")
        return pipeline_run._finished(out, "search") or self._done(out, {"genotype": GENOTYPE, "seconds": 0.0,
                                                                         "history": []})

    def scale(self, out, data, preset, genotype, **kw):
        self.calls.append("scale")
        done = pipeline_run._finished(out, "scale")
        if done:
            return done
        out.mkdir(parents=True, exist_ok=True)
        (out / "scaling_state.pt").write_bytes(b"step")
        if self.scale_crash:
            raise RuntimeError("killed")  # leaves the clock running, as a SIGKILL would
        family = [{"genotype": f"{GENOTYPE.rsplit('|', 1)[0]}|{32 + 8 * i}", "params": i} for i in range(self.family)]
        return self._done(out, {"family": family, "seconds": 0.0})

    def train(self, out, data, genotype, config, retokenize, **kw):
        self.calls.append(("train", genotype))
        done = pipeline_run._finished(out, "train")
        if done:
            return done
        time.sleep(self.train_sleep)
        status = self.train_status.pop(0)
        result = {"genotype": genotype, "status": status, "seconds": self.train_sleep, "final_acc": 50.0,
                  "chance_acc": 10.0, "metrics": []}
        return self._done(out, result) if status == "finished" else result


def pipeline(run_dir, **changes):
    return pipeline_run.run_pipeline(run_dir, preset("quick").with_(**changes), progress=False)


def test_member_out_of_range_keeps_search_and_scaling(tmp_path, monkeypatch):
    fake = FakeStages(monkeypatch, family=3)
    with pytest.raises(ValueError) as info:
        pipeline(tmp_path, member="99")
    msg = str(info.value)
    assert "--member" in msg and "member 99 is out of range" in msg and "-3..2" in msg and "kept" in msg
    results = pipeline(tmp_path, member="1")  # another member: no "other settings", nothing redone
    assert results["train"]["status"] == "finished" and fake.calls.count("search") == 2
    assert fake.calls[-1] == ("train", results["scaling"]["family"][1]["genotype"])
    with pytest.raises(ValueError, match="is training"):  # training started: the member is fixed now
        pipeline(tmp_path, member="0")


def test_rerun_with_other_settings_names_them(tmp_path, monkeypatch):
    FakeStages(monkeypatch)
    pipeline(tmp_path)
    with pytest.raises(ValueError) as info:
        pipeline(tmp_path, lr=0.5, search_steps=7)
    msg = str(info.value)
    assert "other settings" in msg and "train.lr: saved 0.002, now 0.5" in msg
    assert "preset.search_steps: saved 60, now 7" in msg


def test_stage_times_sum_over_calls(tmp_path, monkeypatch):
    fake = FakeStages(monkeypatch)
    fake.scale_crash = True
    with pytest.raises(RuntimeError, match="killed"):
        pipeline(tmp_path)
    state = json.loads((tmp_path / "pipeline.json").read_text())
    started = state["running"]["scale"]
    last = started + 7.0  # the killed call's last checkpoint, 7 s after it started
    os.utime(tmp_path / "scale" / "scaling_state.pt", (last, last))
    fake.scale_crash, fake.train_sleep = False, 0.3
    fake.train_status = ["interrupted", "finished"]
    assert pipeline(tmp_path)["train"]["status"] == "interrupted"  # SIGTERM'd training: counted in full
    results = pipeline(tmp_path)
    assert 7.0 <= results["stages"]["scale"] < 9.0 and results["scaling"]["seconds"] == results["stages"]["scale"]
    assert results["stages"]["train"] >= 0.6 and results["train"]["seconds"] == results["stages"]["train"]
    again = pipeline(tmp_path)  # finished stages: their times stay as they are
    assert again["stages"] == results["stages"]
    assert "summed over every call" in (tmp_path / "report.md").read_text()


# ----------------------------------------------------------------------------- Ctrl-C

def test_exit_status_of_an_interrupted_training():
    assert cli._exit_status({"status": "interrupted", "signal": "SIGINT"}) == 130
    assert cli._exit_status({"status": "interrupted", "signal": "SIGTERM"}) == 143
    assert cli._exit_status({"status": "finished", "signal": None}) == 0


def test_ctrl_c_outside_training_is_one_line_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted(args):
        raise KeyboardInterrupt
    monkeypatch.setitem(cli.COMMANDS, "search", interrupted)
    code, _, err = run(["search", "--out", str(tmp_path), "--quiet"], capsys)
    assert code == 130 and "interrupted" in one_line(err)


def test_ctrl_c_during_training_checkpoints_and_exits_130(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "asvit_kernels.cli", "train", "--out", str(out), "--arch", "vit", "--schedule",
           "none", "--depth", "1", "--embed-dim", "16", "--heads", "1", "--patch-size", "8", "--epochs", "500",
           "--workers", "0", "--checkpoint-every", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        end = time.monotonic() + 240
        while not (out / "checkpoints" / "latest.json").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < end, "no checkpoint in time"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "SIGINT" in err and len(err.strip().splitlines()) == 1
    state = json.loads(next((out / "checkpoints").glob("e*/state.json")).read_text())
    assert state["step"] > 0


@pytest.mark.parametrize("state, needle", [([1, 2], "a dict"), ({"step": 3}, "missing key(s) 'settings'")])
def test_search_state_without_its_keys_is_named(tmp_path, state, needle):
    from asvit_kernels import atomic
    from asvit_kernels.search import runstate
    atomic.torch_save(runstate.state_path(tmp_path, "topology"), state)
    with pytest.raises(ValueError, match="topology_state.pt is damaged") as info:
        runstate.load(tmp_path, "topology")
    assert needle in str(info.value)


def _damage(path, drop):
    """Rewrite the state at ``path`` without the (dotted) key ``drop``."""
    from asvit_kernels import atomic
    state = atomic.torch_load(path)
    *outer, last = drop.split(".")
    node = state
    for k in outer:
        node = node[k]
    del node[last]
    atomic.torch_save(path, state)


@pytest.mark.parametrize("search, drop, needle", [
    ("topology", "history", "missing key(s) 'history'"),
    ("topology", "generator", "missing key(s) 'generator'"),
    ("topology", "baseline.numerator", "missing key 'numerator'"),
    ("scaling", "pending", "missing key(s) 'pending'"),
    ("scaling", "stop_reason", "missing key(s) 'stop_reason'"),
])
def test_search_state_missing_a_deeper_key_is_damaged_not_a_key_error(tmp_path, search, drop, needle):
    from _search_fakes import FakeEvaluate
    from _search_runner import run_scaling, run_topology
    from asvit_kernels.search import runstate
    runner = {"topology": lambda: run_topology(tmp_path, FakeEvaluate(), steps=3),
              "scaling": lambda: run_scaling(tmp_path, FakeEvaluate(), max_steps_this_call=1)}[search]
    runner()
    path = runstate.state_path(tmp_path, search)
    _damage(path, drop)
    with pytest.raises(ValueError, match=f"{path.name} is damaged") as info:
        runner()
    assert needle in str(info.value) and str(path) in str(info.value)


def test_damaged_search_state_through_the_command_is_one_line(tmp_path, capsys):
    from _search_fakes import FakeEvaluate
    from _search_runner import run_topology
    from asvit_kernels.search import runstate
    run_topology(tmp_path, FakeEvaluate(), steps=2)
    _damage(runstate.state_path(tmp_path, "topology"), "optimizer")
    code, _, err = run(["search", "--out", str(tmp_path), "--steps", "2", "--repeats", "1", "--quiet"], capsys)
    line = one_line(err)
    assert code == 2 and "topology_state.pt is damaged" in line and "'optimizer'" in line
