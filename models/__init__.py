"""Model families built on asvit_kernels.nn / ops, installed as ``asvit_kernels.models``."""
from __future__ import annotations

from .counting import count_flops, count_params

__all__ = ["count_params", "count_flops"]
