"""Runs searches in a separate process for the tests (not a test module itself).

    python tests/_search_runner.py topology RUN_DIR OUT.json [--steps N] [--delay S]
    python tests/_search_runner.py scaling  RUN_DIR OUT.json [--delay S]
    python -m torch.distributed.run --nproc-per-node 2 tests/_search_runner.py dist OUT_DIR

``topology`` / ``scaling`` run the search with the cheap fake indicators (``--delay`` seconds per
evaluation, so a test can kill it mid-run) in ``RUN_DIR`` and write the result plus the number of
evaluations this process made to OUT.json. ``dist`` (under torchrun) runs a small scaling and a
short topology search with the fake indicators, and real-indicator evaluations of a few
candidates through ``map_candidates``, on every rank; each rank writes ``OUT_DIR/rank<r>.json``.
The settings live in ``SETTINGS`` below so the tests can run the same searches in-process.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _search_fakes import FakeEvaluate  # noqa: E402

from asvit_kernels.models.genotype import SEED  # noqa: E402
from asvit_kernels.search import distributed, runstate, scaling, topology  # noqa: E402

SETTINGS = {
    "topology": dict(steps=40, seed=3, repeats=2, lr=0.08),
    "scaling": dict(param_limit=(6e6, 9e6), repeats=2, seed=1),
    "dist_topology": dict(steps=8, seed=5, repeats=3, split_repeats=True),
    # real indicators at a tiny size: (genotype, embed_dim) measured through map_candidates
    "dist_real": dict(genotypes=["8,2,3|4,1,2|4,1,4|4,1,6|32", "4,4,2|2,2,3|3,1,5|2,1,2|16",
                                 "6,8,6|3,4,6|2,2,2|4,1,4|64"], embed_dim=8, repeats=1, img=32, batch=4),
}


def images() -> torch.Tensor:
    """The fake searches ignore the images; a tiny fixed batch keeps the settings digest fixed."""
    return torch.zeros(2, 3, 8, 8)


def real_images() -> torch.Tensor:
    s = SETTINGS["dist_real"]
    return torch.randn(s["batch"], 3, s["img"], s["img"], generator=torch.Generator().manual_seed(0))


def run_topology(run_dir, fake: FakeEvaluate, **overrides) -> topology.TopologyResult:
    kw = {**SETTINGS["topology"], **overrides}
    return topology.reinforce(images=images(), evaluate_fn=fake, run_dir=run_dir, progress=False, **kw)


def run_scaling(run_dir, fake: FakeEvaluate, **overrides) -> scaling.ScalingResult:
    kw = {**SETTINGS["scaling"], **overrides}
    return scaling.grow(SEED, images=images(), evaluate_fn=fake, run_dir=run_dir, progress=False, **kw)


def real_evaluations() -> list[dict]:
    """Real indicators of the ``dist_real`` genotypes, spread over the ranks."""
    from asvit_kernels.search import indicators
    s = SETTINGS["dist_real"]
    x = real_images()
    fn = lambda g: indicators.evaluate(g, x, repeats=s["repeats"], embed_dim=s["embed_dim"], seed=0,  # noqa: E731
                                       count_size=s["img"])
    return distributed.map_candidates(fn, s["genotypes"])


def topology_json(result: topology.TopologyResult) -> dict:
    return runstate.json_safe({"genotype": str(result.genotype), "history": result.history,
                               "probabilities": result.probabilities, "finished": result.finished})


def scaling_json(result: scaling.ScalingResult) -> dict:
    return runstate.json_safe({"family": result.family, "history": result.history,
                               "stop_reason": result.stop_reason})


def _failure() -> str:
    """What ``map_candidates`` raises on this rank when item 1 (rank 1's) fails."""
    def fn(i: int) -> int:
        if i == 1:
            raise ZeroDivisionError("item 1")
        return i
    try:
        distributed.map_candidates(fn, [0, 1, 2])
    except Exception as e:  # noqa: BLE001 - reported to the test
        return f"{type(e).__name__}: {e}"
    return "no exception"


def _dist(out_dir: Path) -> None:
    distributed.init_from_env()
    out: dict = {"rank": distributed.rank(), "world": distributed.world_size()}
    fake = FakeEvaluate()
    out["scaling"] = scaling_json(run_scaling(out_dir / "scaling_run", fake))
    out["scaling_calls"] = fake.calls
    fake = FakeEvaluate()
    res = topology.reinforce(images=images(), evaluate_fn=fake, progress=False, **SETTINGS["dist_topology"])
    out["topology"] = topology_json(res)
    out["topology_calls"] = fake.calls
    out["real"] = runstate.json_safe(real_evaluations())
    out["failure"] = _failure()
    (out_dir / f"rank{distributed.rank()}.json").write_text(json.dumps(out))
    distributed.shutdown()


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["topology", "scaling", "dist"])
    p.add_argument("paths", nargs="+")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--delay", type=float, default=0.0)
    a = p.parse_args(argv)
    if a.mode == "dist":
        _dist(Path(a.paths[0]))
        return
    run_dir, out = a.paths
    fake = FakeEvaluate(delay=a.delay)
    if a.mode == "topology":
        extra = {} if a.steps is None else {"steps": a.steps}
        data = topology_json(run_topology(run_dir, fake, **extra))
    else:
        data = scaling_json(run_scaling(run_dir, fake))
    data["calls"] = fake.calls
    Path(out).write_text(json.dumps(data))


if __name__ == "__main__":
    main()
