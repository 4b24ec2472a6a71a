"""Training-free search and scaling (As-ViT) and supernet searches (ViTAS) on the indicator ops.

- ``indicators``: kappa and L^E of a genotype with As-ViT's settings, ``evaluate``.
- ``topology.reinforce``: REINFORCE over the As-ViT space (relative-change reward).
- ``scaling.grow``: greedy depth/width growth with rank-sum selection (one run, a whole family).
- ``evolution.search``: ViTAS's evolutionary search over ElasticViT configs under a FLOPs window.
- ``distributed``: candidate evaluations shared across torch.distributed ranks (torchrun).
- ``kendall_tau``, ``combined_rank``: rank agreement of indicators with accuracy.
"""
from . import distributed, evolution, indicators, scaling, topology
from .stats import combined_rank, kendall_tau

__all__ = ["indicators", "topology", "scaling", "evolution", "distributed", "kendall_tau", "combined_rank"]
