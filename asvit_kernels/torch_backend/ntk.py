"""Per-sample-gradient Gram of one linear layer in plain PyTorch, without the B full gradients.

Two exact routes, the cheaper one chosen by its multiply-add count:
- tiles: for a block of output rows, every sample's tile of g_i^T a_i, then the tile's Gram;
- tokens: K = sum over token pairs of (a a^T) * (g g^T), good when T is small and D large.
"""
from __future__ import annotations

import torch

# Per-sample tiles held at once. On the CPU small enough to stay in cache and in malloc's heap: a
# tile of tens of MB is a fresh mmap every time, page-faulted in (ViT-S fc1 at B = 16, one thread:
# 27 ms with 64 MiB tiles, 10 ms with 4 MiB; below 1 MiB the matmuls get too thin). On a GPU
# (caching allocator, launch-bound) large tiles.
TILE_BYTES = 4 * 2 ** 20
TILE_BYTES_GPU = 64 * 2 ** 20


def _tile_bytes(t: torch.Tensor) -> int:
    return TILE_BYTES if t.device.type == "cpu" else TILE_BYTES_GPU


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_sample_grad_gram(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    B, T, D_in = a.shape
    D_out = g.shape[2]
    acc = _acc(a.dtype)
    a, g = a.to(acc), g.to(acc)
    if T == 1:
        return (a[:, 0] @ a[:, 0].T) * (g[:, 0] @ g[:, 0].T)
    if B * B * T * T * (D_in + D_out) < B * T * D_in * D_out + B * B * D_in * D_out:
        return _by_tokens(a, g)
    K = torch.zeros(B, B, device=a.device, dtype=acc)
    rows = max(1, _tile_bytes(a) // (B * D_in * a.element_size()))
    for o in range(0, D_out, rows):
        P = torch.bmm(g[:, :, o:o + rows].transpose(1, 2), a).reshape(B, -1)  # (B, rows, D_in)
        K.addmm_(P, P.T)
    return K


def _by_tokens(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    B, T, _ = a.shape
    A, G = a.reshape(B * T, -1), g.reshape(B * T, -1)
    K = torch.empty(B, B, device=a.device, dtype=a.dtype)
    step = max(1, _tile_bytes(a) // (T * B * T * a.element_size()))
    for i in range(0, B, step):
        rows = slice(i * T, min(i + step, B) * T)
        M = (A[rows] @ A.T) * (G[rows] @ G.T)
        K[i:i + step] = M.view(-1, T, B, T).sum((1, 3))
    return K
