"""Modules holding a supernet's full shared parameters; ``set_range`` picks the sub-network's
channels, so switching sub-networks rebuilds nothing and copies no weight."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops import elastic_layer_norm, elastic_linear
from ..ranges import RangeLike, normalize_range, normalize_ranges, total_width


class ElasticLinear(nn.Module):
    """``nn.Linear(in_features, out_features)`` whose forward uses ``in_range`` x ``out_range`` of it.

    ``set_range(in_range, out_range)`` takes ranges as ``elastic_linear`` does; ``out_range`` may be
    a sequence of ranges (q, k and v blocks of a qkv projection). The state dict is nn.Linear's.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.backend = in_features, out_features, backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.reset_parameters()
        self.set_range()

    def reset_parameters(self) -> None:
        # nn.Linear's initialisation, so a supernet starts like its dense counterpart.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def set_range(self, in_range: RangeLike = None, out_range: RangeLike = None) -> "ElasticLinear":
        """Select the channels the next forwards use (validated now, not at the forward)."""
        self.in_range = normalize_range(in_range, self.in_features, "in_range")
        self.out_range = normalize_ranges(out_range, self.out_features, "out_range")
        return self

    @property
    def in_width(self) -> int:
        return self.in_range[1]

    @property
    def out_width(self) -> int:
        return total_width(self.out_range)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return elastic_linear(x, self.weight, self.bias, self.in_range, self.out_range, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"in_range={self.in_range}, out_range={list(self.out_range)}")


class ElasticLayerNorm(nn.Module):
    """``nn.LayerNorm(num_features)`` over a channel range of its shared affine parameters."""

    def __init__(self, num_features: int, eps: float = 1e-5, bias: bool = True, *, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        self.num_features, self.eps, self.backend = num_features, eps, backend
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype)) if bias else None
        self.set_range()

    def set_range(self, channel_range: RangeLike = None) -> "ElasticLayerNorm":
        self.channel_range = normalize_range(channel_range, self.num_features, "channel_range")
        return self

    @property
    def width(self) -> int:
        return self.channel_range[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return elastic_layer_norm(x, self.weight, self.bias, self.channel_range, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, channel_range={self.channel_range}"
