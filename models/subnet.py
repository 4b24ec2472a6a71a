"""Sub-networks of the elastic super-transformer: the search space, one architecture (a config),
random sampling, the channel ranges each sharing rule gives a width, and the analytic MAC count.

Nothing here touches a tensor of weights; ``elastic_vit`` turns a config into channel ranges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal, Optional, Sequence

import torch

from asvit_kernels.ranges import Range, cyclic_ranges

Sharing = Literal["first", "last", "cyclic"]
SHARING_RULES = ("first", "last", "cyclic")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _choices(values, name: str) -> tuple[int, ...]:
    """Sorted, de-duplicated positive ints."""
    if not isinstance(values, Sequence) or isinstance(values, str) or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {values!r}")
    if not all(_is_int(v) and v > 0 for v in values):
        raise ValueError(f"{name} must hold positive ints, got {values!r}")
    return tuple(sorted(set(values)))


@dataclass(frozen=True)
class SubnetConfig:
    """One architecture of the super-transformer.

    ``heads[l]``, ``qkv_dim[l]`` and ``mlp_dim[l]`` describe the l-th *active* layer; ``qkv_dim[l]``
    is the width of EACH of q, k and v (so the head dim ``qkv_dim[l] // heads[l]`` is shared by
    all three). ``active_layers`` optionally records which of the supernet's slots the encoding
    put the blocks in (the rest being identities); with identity shifting (ALGORITHMS.md, ViTAS)
    it does not change the network: ``canonical()`` drops it, and the active blocks always run,
    in order, in slots ``0..depth-1``.
    """

    patch_size: int
    embed_dim: int
    heads: tuple[int, ...]
    qkv_dim: tuple[int, ...]
    mlp_dim: tuple[int, ...]
    active_layers: Optional[tuple[int, ...]] = field(default=None)

    def __post_init__(self):
        for name in ("heads", "qkv_dim", "mlp_dim") + (("active_layers",) if self.active_layers is not None else ()):
            v = getattr(self, name)
            if not isinstance(v, Sequence) or isinstance(v, str):
                raise TypeError(f"{name} must be a sequence of ints, got {v!r}")
            object.__setattr__(self, name, tuple(v))
        for name in ("patch_size", "embed_dim"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        depth = len(self.heads)
        if depth == 0:
            raise ValueError("a sub-network needs at least one active layer (heads is empty)")
        for name in ("heads", "qkv_dim", "mlp_dim"):
            v = getattr(self, name)
            if len(v) != depth:
                raise ValueError(f"{name} has {len(v)} entries but heads has {depth}: one per active layer")
            for l, x in enumerate(v):
                if not _is_int(x) or x < 1:
                    raise ValueError(f"{name}[{l}] must be a positive int, got {x!r}")
        if self.active_layers is not None:
            a = self.active_layers
            if len(a) != depth:
                raise ValueError(f"active_layers has {len(a)} slots but there are {depth} active layers")
            if not all(_is_int(s) and s >= 0 for s in a) or any(x >= y for x, y in zip(a, a[1:])):
                raise ValueError(f"active_layers must be strictly increasing slot indices >= 0, got {a!r}")

    @property
    def depth(self) -> int:
        return len(self.heads)

    def canonical(self) -> "SubnetConfig":
        """Identity shifting: the same network with its blocks in slots ``0..depth-1``."""
        return replace(self, active_layers=None)


@dataclass(frozen=True)
class SubnetSpace:
    """Choices of every elastic dimension. ``depths`` are the allowed numbers of active layers; the
    supernet has ``num_slots = max(depths)`` layer slots. Every layer draws heads, q/k/v width and
    MLP width from the same choices. Values are stored sorted and de-duplicated."""

    patch_sizes: tuple[int, ...]
    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    heads: tuple[int, ...]
    qkv_dims: tuple[int, ...]
    mlp_dims: tuple[int, ...]

    def __post_init__(self):
        for name in ("patch_sizes", "embed_dims", "depths", "heads", "qkv_dims", "mlp_dims"):
            object.__setattr__(self, name, _choices(getattr(self, name), name))
        if not self.usable_qkv_dims:
            raise ValueError(f"no qkv_dims choice {self.qkv_dims} is divisible by any heads choice {self.heads}")

    @classmethod
    def vitas(cls, scale: float = 1.0) -> "SubnetSpace":
        """ALGORITHMS.md's ViTAS space with every width multiplied by ``scale``: patch {14, 16, 32};
        embed round(384 s c), q, k, v each round(480 s c), MLP round(1440 s c) for c in 0.1..1.0;
        16 slots (depth 1..16); heads {3, 6, 12, 16}. At scale 1 every (heads, qkv) pair is valid
        (each width is a multiple of 48); other scales may leave pairs whose heads do not divide
        the width, which ``sample_subnet`` never draws."""
        if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not scale > 0:
            raise ValueError(f"scale must be a positive number, got {scale!r}")

        def widths(base: int) -> tuple[int, ...]:
            return tuple(max(1, round(base * scale * k / 10)) for k in range(1, 11))

        return cls(patch_sizes=(14, 16, 32), embed_dims=widths(384), depths=tuple(range(1, 17)),
                   heads=(3, 6, 12, 16), qkv_dims=widths(480), mlp_dims=widths(1440))

    @classmethod
    def tiny(cls) -> "SubnetSpace":
        """A test-sized space (img 32): patch {8, 16}, embed {24, 36, 48}, 4 slots, heads {2, 3, 4},
        q/k/v {16, 24, 32}, MLP {32, 48, 96}. Its cyclic ranges wrap (embed 36 at offset 24 and 48
        at 12, q/k/v 24 at 16 and 32 at 8, MLP 96 at 80) and 3 heads divide only the q/k/v width 24."""
        return cls(patch_sizes=(8, 16), embed_dims=(24, 36, 48), depths=(1, 2, 3, 4), heads=(2, 3, 4),
                   qkv_dims=(16, 24, 32), mlp_dims=(32, 48, 96))

    @property
    def num_slots(self) -> int:
        return self.depths[-1]

    @property
    def usable_qkv_dims(self) -> tuple[int, ...]:
        """q/k/v widths that at least one heads choice divides."""
        return tuple(q for q in self.qkv_dims if any(q % h == 0 for h in self.heads))

    def heads_for(self, qkv_dim: int) -> tuple[int, ...]:
        """Heads choices that divide ``qkv_dim``."""
        return tuple(h for h in self.heads if qkv_dim % h == 0)

    def largest(self, patch_size: Optional[int] = None) -> SubnetConfig:
        """Every dimension at its widest (depth included; the most heads that divide the widest
        q/k/v width); default patch size is the smallest (the most tokens)."""
        q = self.usable_qkv_dims[-1]
        d = self.num_slots
        return SubnetConfig(self.patch_sizes[0] if patch_size is None else patch_size, self.embed_dims[-1],
                            (self.heads_for(q)[-1],) * d, (q,) * d, (self.mlp_dims[-1],) * d)

    def validate(self, config: SubnetConfig) -> SubnetConfig:
        """Raise ``ValueError`` naming the field (and layer) of the first value outside the space,
        or a layer whose heads do not divide its q/k/v width; returns ``config.canonical()``."""
        if not isinstance(config, SubnetConfig):
            raise TypeError(f"config must be a SubnetConfig, got {type(config).__name__}")
        for name, choices in (("patch_size", self.patch_sizes), ("embed_dim", self.embed_dims),
                              ("depth", self.depths)):
            if getattr(config, name) not in choices:
                raise ValueError(f"{name}={getattr(config, name)} is not in the space's choices {choices}")
        if config.active_layers is not None and config.active_layers[-1] >= self.num_slots:
            raise ValueError(f"active_layers {config.active_layers} names a slot >= num_slots ({self.num_slots})")
        for l in range(config.depth):
            for name, choices in (("heads", self.heads), ("qkv_dim", self.qkv_dims), ("mlp_dim", self.mlp_dims)):
                v = getattr(config, name)[l]
                if v not in choices:
                    raise ValueError(f"layer {l}: {name}={v} is not in the space's choices {choices}")
            if config.qkv_dim[l] % config.heads[l]:
                raise ValueError(f"layer {l}: heads={config.heads[l]} does not divide qkv_dim={config.qkv_dim[l]}")
        return config.canonical()


def _draw(choices: Sequence[int], generator: Optional[torch.Generator]) -> int:
    return choices[int(torch.randint(len(choices), (1,), generator=generator))]


def sample_subnet(generator: Optional[torch.Generator], space: SubnetSpace,
                  p_identity: Optional[float] = None) -> SubnetConfig:
    """A random valid architecture, deterministic for the generator's seed (None: torch's global RNG).

    Depth: uniform over ``space.depths`` when ``p_identity`` is None; otherwise each of the
    ``num_slots`` slots is an identity with probability ``p_identity``, conditioned on the block
    count being an allowed depth (drawn exactly from that conditional binomial, no rejection loop).
    Per layer: q/k/v width uniform over the widths some heads choice divides, then heads uniform
    over the choices that divide it, MLP width uniform. Patch size and embed dim uniform.
    Returns the canonical config (identity shifting: blocks in slots 0..depth-1).
    """
    if p_identity is None:
        depth = _draw(space.depths, generator)
    else:
        if isinstance(p_identity, bool) or not isinstance(p_identity, (int, float)) or not 0 <= p_identity <= 1:
            raise ValueError(f"p_identity must be a probability in [0, 1], got {p_identity!r}")
        S = space.num_slots
        probs = torch.tensor([math.comb(S, d) * (1 - p_identity) ** d * p_identity ** (S - d) for d in space.depths],
                             dtype=torch.float64)
        if not probs.sum() > 0:
            raise ValueError(f"p_identity={p_identity} gives no allowed depth {space.depths} a chance")
        depth = space.depths[int(torch.multinomial(probs, 1, generator=generator))]
    patch, embed = _draw(space.patch_sizes, generator), _draw(space.embed_dims, generator)
    heads, qkv, mlp = [], [], []
    for _ in range(depth):
        q = _draw(space.usable_qkv_dims, generator)
        qkv.append(q)
        heads.append(_draw(space.heads_for(q), generator))
        mlp.append(_draw(space.mlp_dims, generator))
    return SubnetConfig(patch, embed, tuple(heads), tuple(qkv), tuple(mlp))


def width_range(sharing: Sharing, choices: Sequence[int], size: int, width: int) -> Range:
    """The channel range ``(offset, width)`` of a dimension of ``size`` channels that a width uses:
    first -> offset 0, last -> ``size - width``, cyclic -> ``ranges.cyclic_ranges(choices, size)``
    (offset = sum of the smaller choices, mod size; may wrap past the end)."""
    if sharing == "first":
        return (0, width)
    if sharing == "last":
        return (size - width, width)
    if sharing == "cyclic":
        return cyclic_ranges(choices, size)[width]
    raise ValueError(f"sharing must be one of {SHARING_RULES}, got {sharing!r}")


def subnet_flops(config: SubnetConfig, img_size: int, *, in_chans: int = 3, num_classes: int = 1000) -> int:
    """Analytic multiply-adds of one image's forward (biases, norms, softmax, GELU not counted).

    With P = (img_size // patch)^2 patches, N = P + 1 tokens (class token), D = embed_dim, and per
    layer q = qkv_dim (each of q, k, v), m = mlp_dim::

        P * in_chans * patch^2 * D                                  patch embedding
        + sum_l [ N*D*3q  +  2*N^2*q  +  N*q*D  +  2*N*D*m ]        qkv, QK^T and AV, proj, fc1 + fc2
        + D * num_classes                                           head (class token only)
    """
    p, D = config.patch_size, config.embed_dim
    P = (img_size // p) ** 2
    N = P + 1
    total = P * in_chans * p * p * D + D * num_classes
    for q, m in zip(config.qkv_dim, config.mlp_dim):
        total += N * D * 3 * q + 2 * N * N * q + N * q * D + 2 * N * D * m
    return total
