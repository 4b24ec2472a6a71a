"""search.distributed: one-process behaviour, and two CPU ranks under torchrun (gloo) running a
small scaling, a short topology search and real-indicator candidate evaluations, which must agree
across ranks and with a one-process run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from _search_fakes import FakeEvaluate
from _search_runner import SETTINGS, images, real_images, run_scaling, scaling_json, topology_json

from asvit_kernels.atomic import torch_load
from asvit_kernels.search import distributed, topology

RUNNER = Path(__file__).resolve().parent / "_search_runner.py"


def test_one_process_world(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.init_from_env() is False and not distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    obj = {"a": [1, 2]}
    assert distributed.broadcast_object(obj) is obj
    assert distributed.device() == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    assert distributed.show_progress(False) is False and distributed.show_progress(True) is True


def test_map_candidates_one_process():
    rounds = []
    out = distributed.map_candidates(lambda x: x * x, [3, 1, 2], on_round=lambda done: rounds.append(done))
    assert out == [9, 1, 4]
    assert rounds == [{0: 9}, {0: 9, 1: 1}, {0: 9, 1: 1, 2: 4}]
    assert distributed.map_candidates(lambda x: x, []) == []

    def bad(x):
        raise KeyError(x)
    with pytest.raises(KeyError):
        distributed.map_candidates(bad, [7])


def test_torchrun_two_cpu_ranks_agree_with_one_process(tmp_path, one_thread):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(RUNNER.parent), os.environ.get("PYTHONPATH", "")])}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(RUNNER),
           "dist", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"], r1["world"]) == (0, 1, 2, 2)
    for key in ("scaling", "topology", "real"):
        assert r0[key] == r1[key], key  # lockstep: every rank holds the same results

    # scaling: the same family as one process, the candidates shared out between the ranks
    ref = run_scaling(None, FakeEvaluate())
    assert r0["scaling"] == json.loads(json.dumps(scaling_json(ref)))
    survivors = sum(len(s["survivors"]) for s in ref.history)
    assert r0["scaling_calls"] + r1["scaling_calls"] == survivors
    assert abs(r0["scaling_calls"] - r1["scaling_calls"]) <= len(ref.history)
    saved = torch_load(tmp_path / "scaling_run" / "scaling_state.pt")  # written by rank 0
    assert saved["family"] == ref.family and saved["stop_reason"] == "param_limit"

    # topology: repeats split over the ranks give the one-process split_repeats result
    fake = FakeEvaluate()
    one = topology.reinforce(images=images(), evaluate_fn=fake, progress=False, **SETTINGS["dist_topology"])
    assert r0["topology"] == json.loads(json.dumps(topology_json(one)))
    assert r0["topology_calls"] + r1["topology_calls"] == fake.calls and min(r0["topology_calls"],
                                                                            r1["topology_calls"]) > 0

    # real indicators through map_candidates equal the direct evaluations
    from asvit_kernels.search import indicators
    s, x = SETTINGS["dist_real"], real_images()
    for got, g in zip(r0["real"], s["genotypes"]):
        want = indicators.evaluate(g, x, repeats=s["repeats"], embed_dim=s["embed_dim"], seed=0, count_size=s["img"])
        assert got["kappa"] == pytest.approx(want["kappa"], rel=1e-9)
        assert got["length_distortion"] == pytest.approx(want["length_distortion"], rel=1e-9)
        assert (got["params"], got["flops"]) == (want["params"], want["flops"])

    # a failing candidate makes every rank raise (no rank left waiting in a collective)
    assert r1["failure"].startswith("ZeroDivisionError: item 1")
    assert r0["failure"].startswith("CandidateError: candidate 1 failed on rank 1")
