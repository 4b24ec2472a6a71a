"""Rank statistics for judging training-free indicators: Kendall's tau against accuracy and
As-ViT's combined kappa / L^E rank.

Non-finite values. Our kappa is ``inf`` (never NaN) for a singular NTK, and an indicator may
overflow to ``-inf``; both functions work on ranks, where an infinity is simply an extreme value:
``+inf`` ranks above every finite value and ``-inf`` below (equal infinities tie). With the
orientation the caller gives that makes inf the worst: kappa (lower is better) ``+inf`` is the
largest, worst kappa; ``-kappa`` (higher is better) ``-inf`` is the lowest, worst score.
"""
from __future__ import annotations

import logging
import math
from typing import Sequence

import numpy as np
from scipy import stats as sps

__all__ = ["kendall_tau", "combined_rank"]

logger = logging.getLogger(__name__)


def _as_vector(values: Sequence[float], name: str) -> np.ndarray:
    """1-D float64 array; ValueError for NaN (which has no place in an order)."""
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got shape {x.shape}")
    if np.isnan(x).any():
        raise ValueError(f"{name} holds NaN at positions {np.flatnonzero(np.isnan(x)).tolist()}")
    return x


def kendall_tau(indicator_values: Sequence[float], accuracies: Sequence[float]) -> float:
    """Kendall's tau-b (``scipy.stats.kendalltau``, ties corrected) between an indicator and the
    accuracies of the same architectures; orient the indicator so higher means better (pass
    ``-kappa``), and a positive tau means the indicator ranks like accuracy.

    Never NaN: infinities are ranked as extreme values (module docstring), and when either input
    has no ordering at all (every value equal) tau-b is undefined and 0.0 (no association) is
    returned, with a warning logged. ``ValueError`` for NaN inputs, lengths that differ, or fewer
    than 2 items.
    """
    x, y = _as_vector(indicator_values, "indicator_values"), _as_vector(accuracies, "accuracies")
    if len(x) != len(y):
        raise ValueError(f"indicator_values has {len(x)} items but accuracies has {len(y)}")
    if len(x) < 2:
        raise ValueError(f"Kendall's tau needs at least 2 items, got {len(x)}")
    # tau depends on the order only, so ranks (inf -> extreme rank) give the same tau as finite values would.
    rx, ry = sps.rankdata(x), sps.rankdata(y)
    if np.all(rx == rx[0]) or np.all(ry == ry[0]):
        logger.warning("Kendall's tau is undefined for a constant input; returning 0.0")
        return 0.0
    tau = float(sps.kendalltau(rx, ry, variant="b").statistic)
    if not math.isfinite(tau):  # cannot happen for non-constant ranks; guard the NaN-free promise
        raise RuntimeError(f"kendalltau returned {tau} for ranks {rx.tolist()} / {ry.tolist()}")
    return tau


def combined_rank(kappas: Sequence[float], les: Sequence[float]) -> np.ndarray:
    """As-ViT's combination: rank by kappa ascending (1 = lowest kappa) plus rank by L^E descending
    (1 = highest L^E); a lower sum is better. Ties get the average rank (``scipy.stats.rankdata``),
    so the sums may be halves. ``+inf`` kappa ranks last, as does ``-inf`` L^E; NaN in either is
    treated as the worst value (``+inf`` kappa, ``-inf`` L^E). Returns a float64 array.
    ``ValueError`` for lengths that differ or an empty input."""
    k = np.asarray(kappas, dtype=np.float64)
    e = np.asarray(les, dtype=np.float64)
    if k.ndim != 1 or e.ndim != 1:
        raise ValueError(f"kappas and les must be 1-D, got shapes {k.shape} and {e.shape}")
    if len(k) != len(e):
        raise ValueError(f"kappas has {len(k)} items but les has {len(e)}")
    if len(k) == 0:
        raise ValueError("combined_rank needs at least one architecture")
    k = np.where(np.isnan(k), np.inf, k)
    e = np.where(np.isnan(e), -np.inf, e)
    return sps.rankdata(k) + sps.rankdata(-e)
