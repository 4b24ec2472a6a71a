"""Model families built on asvit_kernels.nn / ops, installed as ``asvit_kernels.models``.

The families are importable from here (``from asvit_kernels.models import AsViT, ViT, ElasticViT,
SubnetSpace, SubnetConfig``) as well as from their modules (``asvit_kernels.models.asvit`` ...).
Every module below imports only ``asvit_kernels`` layers under models (ops, nn, ranges, backends)
and its sibling modules, never this package's namespace, so importing it has no cycle.
"""
from __future__ import annotations

from .asvit import AsViT
from .counting import count_flops, count_params
from .elastic_vit import ElasticViT
from .genotype import Genotype
from .subnet import SubnetConfig, SubnetSpace
from .vit import ViT

__all__ = ["AsViT", "ViT", "ElasticViT", "SubnetSpace", "SubnetConfig", "Genotype", "count_params",
           "count_flops"]
