"""AutoProg growth operators on dense ``ViT``s (MoGrow, ALGORITHMS.md).

* Depth: ``grow_depth`` builds the deeper model with every parameter copied from the source (the
  slowest EMA copy); layer k of the new model is source layer ``new_layer_sources(old, new)[k]``.
* Width (our definition: new channels copied from existing ones, outputs rescaled, function kept at
  growth time), ``grow_width``, Net2Net-style and exact:
    - MLP hidden width: new fc1 units copy random existing units (rows and bias); fc2's columns of
      a unit copied c times are divided by c;
    - attention width: whole heads are copied (their q, k and v rows; the head dim, hence the
      softmax scale, stays), proj's columns of a head copied c times are divided by c;
    - embed dim: only whole multiples k = new / old. Every channel of the residual stream is
      replicated k times (tiled: channel j <- j % old), so each LayerNorm sees its old mean and
      variance and outputs its old values tiled; every layer reading the stream divides its
      columns by k. A non-multiple would change LayerNorm statistics and cannot keep the function,
      so it raises ``ValueError``.
  Copies receive identical gradients, so they stay equal under plain training until something
  breaks the symmetry (drop path, dropout, noise a trainer adds); the operators add no noise so
  that the function is kept exactly.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence, Union

import torch

from .vit import ViT

__all__ = ["new_layer_sources", "new_layer_slots", "supernet_slots", "grow_depth", "grow_width"]

Tensor = torch.Tensor
_BLOCK = re.compile(r"blocks\.(\d+)\.(.*)")


def new_layer_sources(old_depth: int, new_depth: int) -> list[int]:
    """Source layer of each of the ``new_depth`` layers of a grown model (MoGrow).

    Rule: old layer i is copied ``c_i`` times, consecutively and in order, with
    ``c_i = new // old``, plus one more for each of the last ``new % old`` layers. So doubling
    duplicates every layer next to itself (7 -> 14: [0, 0, 1, 1, ..., 6, 6]), a partial growth
    duplicates the last layers (7 -> 10: [0, 1, 2, 3, 4, 4, 5, 5, 6, 6]), and equal depths give
    the identity. Every old layer is kept; ``new_depth < old_depth`` raises ``ValueError``.
    """
    for name, v in (("old_depth", old_depth), ("new_depth", new_depth)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if new_depth < old_depth:
        raise ValueError(f"growth cannot remove layers: new_depth {new_depth} < old_depth {old_depth}")
    base, extra = divmod(new_depth, old_depth)
    return [i for i in range(old_depth) for _ in range(base + (i >= old_depth - extra))]


def new_layer_slots(old_depth: int, new_depth: int) -> list[int]:
    """The slots of a grown model that hold a NEW copy: those whose source layer is the previous
    slot's (the second copy of each duplicated layer; AutoProg's ``get_new_layer_idx``).
    9 -> 12: [7, 9, 11]."""
    src = new_layer_sources(old_depth, new_depth)
    return [k for k in range(1, new_depth) if src[k] == src[k - 1]]


def supernet_slots(depth: int, old_depth: int, new_depth: int) -> list[int]:
    """The slots a depth-``depth`` sub-network runs in a supernet grown ``old_depth -> new_depth``
    (ALGORITHMS.md, "Depth inside a grown supernet"; AutoProg's ``set_sample_config``).

    Every old layer is kept; of the new copies (``new_layer_slots``) the first
    ``#copies - (depth - old_depth)`` are skipped. So ``depth == old_depth`` is exactly the
    pre-growth network (9 -> 18 at depth 9: slots [0, 2, ..., 16], old layers 0..8 once each) and
    larger depths re-admit the copies from the end. Needs ``old_depth <= depth <= new_depth``."""
    if isinstance(depth, bool) or not isinstance(depth, int) or not old_depth <= depth <= new_depth:
        raise ValueError(f"depth must be an int in [old_depth={old_depth}, new_depth={new_depth}], got {depth!r}")
    copies = new_layer_slots(old_depth, new_depth)
    skipped = set(copies[:len(copies) - (depth - old_depth)])
    return [k for k in range(new_depth) if k not in skipped]


def _vit_kwargs(model: ViT) -> dict:
    """The constructor arguments that rebuild ``model``'s architecture."""
    if not isinstance(model, ViT):
        raise TypeError(f"model must be a models.vit.ViT, got {type(model).__name__}")
    blk = model.blocks[0] if len(model.blocks) else None
    return dict(img_size=model.img_size, patch_size=model.patch_size, in_chans=model.patch_embed.proj.in_channels,
                num_classes=model.num_classes, embed_dim=model.embed_dim, depth=model.depth,
                num_heads=list(model.num_heads), qkv_bias=blk is None or blk.attn.qkv.bias is not None,
                attn_dims=list(model.attn_dims), mlp_dims=list(model.mlp_dims), class_token=model.has_class_token,
                global_pool=model.global_pool, drop_path_rate=model.drop_path_rate, norm_eps=model.norm.eps,
                backend=None if blk is None else blk.attn.backend)


def _source_state(model: ViT, source: Optional[ViT]) -> dict[str, Tensor]:
    state = model.state_dict()
    if source is None:
        return state
    theirs = source.state_dict()
    if set(theirs) != set(state) or any(theirs[k].shape != state[k].shape for k in state):
        raise ValueError("source must have model's architecture (the same parameter names and shapes)")
    return theirs


def _build(model: ViT, kwargs: dict, state: dict[str, Tensor]) -> ViT:
    ref = next(model.parameters())
    new = ViT(**kwargs).to(device=ref.device, dtype=ref.dtype)
    new.load_state_dict(state, strict=True)
    new.train(model.training)
    return new


@torch.no_grad()
def grow_depth(model: ViT, new_depth: int, *, source: Optional[ViT] = None) -> ViT:
    """A ``new_depth``-layer ViT (MoGrow): block k copies ``source``'s block
    ``new_layer_sources(model.depth, new_depth)[k]`` (its per-layer heads and widths included),
    every other parameter is ``source``'s. ``source`` (the slowest EMA copy, same architecture as
    ``model``) defaults to ``model``. The result owns its parameters (copies)."""
    srcs = new_layer_sources(model.depth, new_depth)
    kw = _vit_kwargs(model)
    state = _source_state(model, source)
    kw.update(depth=new_depth, num_heads=[kw["num_heads"][s] for s in srcs],
              attn_dims=[kw["attn_dims"][s] for s in srcs], mlp_dims=[kw["mlp_dims"][s] for s in srcs])
    new_state = {}
    for name, t in state.items():
        m = _BLOCK.fullmatch(name)
        if m is None:
            new_state[name] = t.clone()
            continue
        for k, s in enumerate(srcs):
            if s == int(m.group(1)):
                new_state[f"blocks.{k}.{m.group(2)}"] = t.clone()
    return _build(model, kw, new_state)


def _per_layer(v, old: Sequence[int], name: str) -> list[int]:
    """None -> unchanged; an int -> every layer; a list -> one per layer. Never narrower."""
    if v is None:
        new = list(old)
    elif isinstance(v, int) and not isinstance(v, bool):
        new = [v] * len(old)
    elif isinstance(v, Sequence) and not isinstance(v, str):
        new = list(v)
    else:
        raise ValueError(f"{name} must be None, an int or one int per layer, got {v!r}")
    if len(new) != len(old):
        raise ValueError(f"{name} must have one entry per layer ({len(old)}), got {len(new)}")
    for l, (a, b) in enumerate(zip(old, new)):
        if isinstance(b, bool) or not isinstance(b, int) or b < a:
            raise ValueError(f"{name}[{l}]={b!r}: width growth needs an int >= the current {a}")
    return new


def _replicate(old: int, new: int, generator: Optional[torch.Generator]) -> Tensor:
    """Source unit of each of ``new`` units: the ``old`` ones in order, then random copies of them."""
    return torch.cat([torch.arange(old), torch.randint(old, (new - old,), generator=generator)])


def _share(index: Tensor, old: int) -> Tensor:
    """1 / (number of copies of each unit's source): the rescaling that keeps a sum over copies."""
    return 1.0 / torch.bincount(index, minlength=old)[index].double()


@torch.no_grad()
def grow_width(model: ViT, *, embed_dim: Optional[int] = None, mlp_dims: Union[None, int, Sequence[int]] = None,
               attn_dims: Union[None, int, Sequence[int]] = None, generator: Optional[torch.Generator] = None,
               source: Optional[ViT] = None) -> ViT:
    """A wider ViT computing the same function (exactly, up to rounding) at growth time.

    Args:
        embed_dim: new embed dim, a whole multiple of the current one (see the module docstring).
        mlp_dims: new MLP hidden width(s), int (every layer) or one per layer; new units copy
            random existing ones.
        attn_dims: new q/k/v width(s) per layer, each a multiple of that layer's head dim; new heads
            copy random existing heads (``num_heads`` grows with them).
        generator: draws which units and heads are copied (deterministic for a seed; per layer,
            heads first, then MLP units).
        source: where the parameters come from (the slowest EMA copy, same architecture as
            ``model``); default ``model``.

    With ``num_classes=0`` the output (the pooled features) comes back tiled, not equal.
    """
    kw = _vit_kwargs(model)
    state = _source_state(model, source)
    D = model.embed_dim
    D2 = D if embed_dim is None else embed_dim
    if isinstance(D2, bool) or not isinstance(D2, int) or D2 < D or D2 % D:
        raise ValueError(f"embed_dim={embed_dim!r}: embed-dim growth keeps the function only for a whole "
                         f"multiple of the current {D} (every channel replicated, so LayerNorm statistics "
                         "are unchanged)")
    mlp2 = _per_layer(mlp_dims, model.mlp_dims, "mlp_dims")
    attn2 = _per_layer(attn_dims, model.attn_dims, "attn_dims")
    heads2 = []
    for l, (a, a2, h) in enumerate(zip(model.attn_dims, attn2, model.num_heads)):
        if a2 % (a // h):
            raise ValueError(f"attn_dims[{l}]={a2} must be a multiple of layer {l}'s head dim {a // h}: "
                             "attention grows by whole heads")
        heads2.append(a2 // (a // h))

    # Index maps (new unit -> source unit) and column scales, drawn before any copy.
    e, e_scale = torch.arange(D2) % D, torch.full((D2,), D / D2, dtype=torch.float64)
    layer_maps = []
    for l in range(model.depth):
        a, hd = model.attn_dims[l], model.attn_dims[l] // model.num_heads[l]
        h = _replicate(model.num_heads[l], heads2[l], generator)
        c = (h[:, None] * hd + torch.arange(hd)).reshape(-1)  # the copied heads' channels
        m = _replicate(model.mlp_dims[l], mlp2[l], generator)
        layer_maps.append(dict(qkv=torch.cat([c, c + a, c + 2 * a]), attn=c,
                               attn_scale=_share(h, model.num_heads[l]).repeat_interleave(hd),
                               mlp=m, mlp_scale=_share(m, model.mlp_dims[l])))

    def take(t: Tensor, dim: int, index: Tensor, scale: Optional[Tensor] = None) -> Tensor:
        out = t.index_select(dim, index.to(t.device))
        if scale is not None:  # scale the copied columns (dim 1)
            out = out * scale.to(t)
        return out

    # (dim, map, column scale) per parameter of the grown model, by the name's suffix.
    stream = {"patch_embed.proj.weight": [(0, e, None)], "patch_embed.proj.bias": [(0, e, None)],
              "cls_token": [(2, e, None)], "pos_embed": [(2, e, None)], "norm.weight": [(0, e, None)],
              "norm.bias": [(0, e, None)], "head.weight": [(1, e, e_scale)], "head.bias": []}
    new = {}
    for name, t in state.items():
        mt = _BLOCK.fullmatch(name)
        if mt is None:
            if name not in stream:
                raise ValueError(f"grow_width does not know how to grow parameter {name!r}")
            plan = stream[name]
        else:
            mp, rest = layer_maps[int(mt.group(1))], mt.group(2)
            plan = {"norm1.weight": [(0, e, None)], "norm1.bias": [(0, e, None)],
                    "norm2.weight": [(0, e, None)], "norm2.bias": [(0, e, None)],
                    "attn.qkv.weight": [(0, mp["qkv"], None), (1, e, e_scale)], "attn.qkv.bias": [(0, mp["qkv"], None)],
                    "attn.proj.weight": [(0, e, None), (1, mp["attn"], mp["attn_scale"])],
                    "attn.proj.bias": [(0, e, None)],
                    "mlp.fc1.weight": [(0, mp["mlp"], None), (1, e, e_scale)], "mlp.fc1.bias": [(0, mp["mlp"], None)],
                    "mlp.fc2.weight": [(0, e, None), (1, mp["mlp"], mp["mlp_scale"])],
                    "mlp.fc2.bias": [(0, e, None)]}.get(rest)
            if plan is None:
                raise ValueError(f"grow_width does not know how to grow parameter {name!r}")
        for dim, index, scale in plan:
            t = take(t, dim, index, scale)
        new[name] = t.clone() if not plan else t
    kw.update(embed_dim=D2, num_heads=heads2, attn_dims=attn2, mlp_dims=mlp2)
    return _build(model, kw, new)
