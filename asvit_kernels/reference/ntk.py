"""Ground truth for the training-free indicators, as As-ViT / TENAS compute them: one backward per
sample for the NTK, one backward per output coordinate for the length distortion. Slow by design."""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..params import ParamSelector, select_parameters

OutputFn = Optional[Callable[[nn.Module, torch.Tensor], torch.Tensor]]


def _outputs(model, x, output_fn):
    return model(x) if output_fn is None else output_fn(model, x)


def per_sample_grad_gram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B, B): <g_i^T a_i, g_j^T a_j>_F with the B per-sample gradient matrices materialised."""
    G = torch.einsum("bto,bti->boi", g, a).reshape(a.shape[0], -1)
    return G @ G.T


def ntk_loop(model: nn.Module, x: torch.Tensor, output_fn: OutputFn = None,
             params: ParamSelector = "all") -> torch.Tensor:
    """(B, B) float64: K_ij = <ds_i/dp, ds_j/dp> over the selected parameters, s_i = sum_c f(x)[i, c]."""
    ps = [p for _, p in select_parameters(model, params)]
    s = _outputs(model, x, output_fn).reshape(x.shape[0], -1).sum(1)
    rows = []
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(s[i], ps, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double()
                               for g, p in zip(grads, ps)]))
    J = torch.stack(rows)
    return J @ J.T


def length_distortion_loop(model: nn.Module, points: torch.Tensor, tangents: torch.Tensor,
                           output_fn: OutputFn = None) -> float:
    """sum_n || J_f(points_n) tangents_n ||_2, with J built one output coordinate at a time."""
    total = 0.0
    for x, t in zip(points, tangents):
        x = x[None].clone().requires_grad_()
        y = _outputs(model, x, output_fn).reshape(-1)
        jt = torch.stack([(torch.autograd.grad(y[c], x, retain_graph=True)[0][0] * t).sum()
                          for c in range(y.numel())])
        total += jt.double().norm().item()
    return total
