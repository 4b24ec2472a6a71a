"""Ground truth for the elastic channel ops: gather the used channels, then the dense op."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..ranges import RangeLike, channel_indices


def elastic_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   in_range: RangeLike = None, out_range: RangeLike = None) -> torch.Tensor:
    """``F.linear(x, weight[out_idx][:, in_idx], bias[out_idx])``."""
    out_idx = channel_indices(out_range, weight.shape[0], weight.device)
    in_idx = channel_indices(in_range, weight.shape[1], weight.device)
    w = weight[out_idx][:, in_idx]
    return F.linear(x, w, None if bias is None else bias[out_idx])


def elastic_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       channel_range: RangeLike = None, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over ``x``'s last dim with the affine parameters ``weight[idx]``, ``bias[idx]``."""
    idx = channel_indices(channel_range, weight.shape[0], x.device)
    return F.layer_norm(x, (x.shape[-1],), weight[idx], None if bias is None else bias[idx], eps)
