"""Cheap deterministic stand-ins for ``search.indicators.evaluate`` (pure functions of their
arguments), used where a test needs many evaluations or a subprocess that runs in seconds."""
from __future__ import annotations

import math
import time
import zlib

from asvit_kernels.models.genotype import Genotype


def _noise(text: str) -> float:
    """A fixed pseudo-random number in [0, 1) for a string."""
    return (zlib.crc32(text.encode()) % 10007) / 10007


class FakeEvaluate:
    """``evaluate``-compatible fake. kappa prefers large K1 and small E1 and is ``inf`` for
    K1 = 4 with H = 64 (a "singular NTK"); L^E prefers large E4 and deep, wide proxies. Both get a
    fixed genotype-dependent wobble and a small dependence on ``seed``, so a wrong seed shows.
    ``delay`` seconds of sleep per call make a run slow enough to be killed mid-way. ``calls``
    counts the calls of this instance."""

    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.calls = 0

    def __call__(self, genotype, images=None, *, repeats=5, embed_dim=None, depths=None, seed=0,
                 num_classes=1000, count_size=None):
        self.calls += 1
        if self.delay:
            time.sleep(self.delay)
        g = Genotype.parse(genotype)
        width = g.hidden if embed_dim is None else embed_dim
        d = g.depths if depths is None else tuple(depths)
        key = f"{g}|{width}|{d}"
        kappa = 100.0 / g.kernels[0] + 3.0 * g.expansions[0] + 20.0 * _noise(key) + 0.01 * (seed % 7)
        if g.kernels[0] == 4 and g.heads == 64:
            kappa = math.inf
        length = 2.0 * g.expansions[3] + 0.3 * sum(d) + 0.05 * width + 5.0 * _noise(key[::-1]) + 0.001 * repeats
        return {"kappa": kappa, "length_distortion": length, "params": 1000 * width * sum(d),
                "flops": 10_000 * width * width * sum(d), "seconds": 0.0}
