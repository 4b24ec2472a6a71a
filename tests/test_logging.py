"""Log levels (issue 20): per-call details (each NTK call's path, each candidate's indicators) at
DEBUG; INFO one line per stage start and end plus a summary of the NTK's exact path; ``asvit -v``
/ ``-q`` set the level, ``--log-file`` writes the full DEBUG log (into the run directory by
default); the command removes its handlers when it ends."""
import logging
import os

import pytest
import torch
from torch import nn

from asvit_kernels import cli
from asvit_kernels.ops.ntk import ntk, path_counts
from asvit_kernels.pipeline.run import ntk_summary


@pytest.fixture
def fake_info(monkeypatch):
    def command(args):
        log = logging.getLogger("asvit_kernels.fake")
        log.debug("detail-line")
        log.info("stage-line")
        log.warning("warning-line")
        logging.getLogger("otherlib").info("other-info-line")
        return 0
    monkeypatch.setitem(cli.COMMANDS, "info", command)


@pytest.mark.parametrize("argv, shown, hidden", [
    (["info"], ["stage-line", "warning-line"], ["detail-line"]),
    (["-v", "info"], ["detail-line", "stage-line", "warning-line"], []),
    (["info", "-v"], ["detail-line", "stage-line", "warning-line"], []),
    (["-q", "info"], ["warning-line"], ["detail-line", "stage-line"]),
    (["info", "--quiet"], ["warning-line"], ["detail-line", "stage-line"]),
])
def test_verbose_and_quiet_set_the_level(fake_info, capsys, monkeypatch, argv, shown, hidden):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    ours = logging.getLogger("asvit_kernels")
    handlers, level = list(logging.getLogger().handlers), ours.level
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert all(s in err for s in shown) and not any(h in err for h in hidden), err
    assert "other-info-line" not in err  # other libraries stay at WARNING
    assert logging.getLogger().handlers == handlers and ours.level == level  # nothing left behind
    assert "TQDM_DISABLE" not in os.environ


def test_log_file_gets_debug_even_when_quiet(fake_info, tmp_path, capsys):
    path = tmp_path / "x.log"
    assert cli.main(["-q", "info", "--log-file", str(path)]) == 0
    text = path.read_text()
    assert "DEBUG asvit_kernels.fake: detail-line" in text and "INFO asvit_kernels.fake: stage-line" in text
    assert "stage-line" not in capsys.readouterr().err


def test_log_file_without_a_path_needs_a_run_directory(fake_info, capsys):
    assert cli.main(["info", "--log-file"]) == 2
    assert "--log-file needs a PATH" in capsys.readouterr().err


def test_verbose_and_quiet_together_are_refused(capsys):
    assert cli.main(["-v", "-q", "info"]) == 2


def test_ntk_path_is_debug_and_tallied(caplog):
    path_counts(reset=True)
    torch.manual_seed(0)
    fast = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    exact = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    x = torch.randn(4, 5)
    with caplog.at_level(logging.INFO, logger="asvit_kernels.ops.ntk"):
        ntk(fast, x)
        ntk(fast, x)
        _, info = ntk(exact, x, return_info=True)
    assert not [r for r in caplog.records if r.name == "asvit_kernels.ops.ntk"]  # nothing at INFO
    counts = path_counts(reset=True)
    assert counts == {"calls": 3, "exact": {info["reason"]: 1}} and "BatchNorm" in info["reason"]
    assert path_counts() == {"calls": 0, "exact": {}}
    assert ntk_summary(counts) == f"ntk took the exact path for 1 of 3 evaluations: {info['reason']}"
    assert ntk_summary({"calls": 9, "exact": {}}) is None
    two = ntk_summary({"calls": 371, "exact": {"a": 1, "b": 2}})
    assert two == "ntk took the exact path for 3 of 371 evaluations: b (2 calls); a (1 call)"


def test_search_logs_stage_lines_at_info_and_details_in_the_run_directory_log(tmp_path, capsys, one_thread):
    out = tmp_path / "s"
    assert cli.main(["search", "--out", str(out), "--steps", "2", "--repeats", "1", "--log-file"]) == 0
    err = capsys.readouterr().err
    assert "ntk: fast path" not in err and "evaluate " not in err, err
    stage = [ln for ln in err.splitlines() if "asvit_kernels.pipeline.run: search:" in ln]
    assert len(stage) == 2 and "2 REINFORCE steps" in stage[0] and "finished in" in stage[1], err
    log = (out / cli.LOG_NAME).read_text()
    assert log.count("DEBUG asvit_kernels.ops.ntk: ntk: fast path") == 2
    assert "DEBUG asvit_kernels.search.indicators: evaluate" in log and "search: finished in" in log
