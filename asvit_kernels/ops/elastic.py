"""Elastic channel ops: a sub-network's linear and LayerNorm layers over channel ranges of a
supernet's shared parameters, with no copy of the used weight block in either direction.

Each op is a ``torch.library`` custom op (fake impl for ``torch.compile``, autograd through a
backward custom op) whose body dispatches to the backend chosen by ``backends.pick``. In plain
eager mode (not compiling, no dispatch mode such as FakeTensorMode or FlopCounterMode active) the
same bodies run under a ``torch.autograd.Function`` instead: the custom op's Python dispatch and
autograd wrapper cost about 0.4 ms per layer per training step on a CPU (torch.profiler), more
than a small sub-network's matmuls.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F

from .. import backends
from ..ranges import RangeLike, concat_pieces, normalize_range, normalize_ranges, pieces, total_width
from ..torch_backend.elastic import layer_norm_composite
from . import _autocast, _transforms, _validate

Tensor = torch.Tensor


# Backend modules are imported on first use, so TRITON_INTERPRET set after ``import asvit_kernels``
# still counts and a missing Triton costs nothing until asked for; cached, since an import
# statement per call costs more than a small layer's arithmetic.

@functools.lru_cache(maxsize=None)
def _linear_impl(backend: str):
    """(forward, backward) of the elastic linear layer for ``backend``."""
    if backend == "triton":
        from ..triton import elastic_linear as m
        return m.forward, m.backward
    from ..torch_backend import elastic as m
    return m.linear_forward, m.linear_backward


@functools.lru_cache(maxsize=None)
def _layer_norm_impl(backend: str):
    """(forward, backward) of the elastic LayerNorm for ``backend``."""
    if backend == "triton":
        from ..triton import elastic_layer_norm as m
        return m.forward, m.backward
    if backend == "cuda":
        from ..cuda_backend import elastic as m
    else:
        from ..torch_backend import elastic as m
    return m.layer_norm_forward, m.layer_norm_backward


def _rows(t: Tensor, width: int) -> Tensor:
    """View as (rows, width) with unit column stride (copies only an activation, and only if needed)."""
    t = t.reshape(-1, width)
    return t if t.stride(1) == 1 or t.shape[0] == 0 else t.contiguous()


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    """Custom ops cannot return None: a gradient not asked for comes back as a fresh empty tensor."""
    return like.new_empty(0) if t is None else t


def _flat(ranges) -> list[int]:
    return [v for r in ranges for v in r]


def _pairs(flat: list[int]) -> tuple[tuple[int, int], ...]:
    return tuple((flat[i], flat[i + 1]) for i in range(0, len(flat), 2))


# ----------------------------------------------------------------------------- the lean CPU path
# The common CPU call (plain eager, fp32/fp64 CPU tensors, the torch backend, ranges of exact ints)
# skips the general validation, autocast and backend lookup (~25 us a call, 5% of a (1576, 192)
# LayerNorm's forward+backward): it takes a call only when cheap exact checks prove that those would
# change nothing and let it through; anything else (bad input included) goes the general way,
# which raises the clear errors.

_F32, _F64 = torch.float32, torch.float64


def _lean_backend(backend) -> bool:
    """Whether ``backends.pick`` would give "torch" for a CPU call without raising."""
    return (backend is None or isinstance(backend, str)) and backends.requested(backend)[0] in (None, "torch")


def _lean_ok(x, weight, bias, ndim: int, backend) -> bool:
    """CPU tensors of one fp32/fp64 dtype, ``weight`` ``ndim``-D, ``bias`` None or 1-D of its
    leading size, the torch backend, plain eager, no transform. (dtypes are singletons: ``is``.)"""
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor)):
        return False
    dt = x.dtype
    if not ((dt is _F32 or dt is _F64) and weight.dtype is dt and x.is_cpu and weight.is_cpu
            and weight.dim() == ndim):
        return False
    if bias is not None and not (isinstance(bias, Tensor) and bias.dtype is dt and bias.is_cpu and bias.dim() == 1
                                 and bias.shape[0] == weight.shape[0]):
        return False
    return _lean_backend(backend) and not _transforms.active() and _transforms.plain_eager()


def _one_run(r, size: int):
    """``(offset, width)`` of a range given as None or exact ints (one pair, or a sequence of one
    pair, as ``ElasticLinear`` holds it) that is one run inside ``0..size``; None for anything else."""
    if r is None:
        return 0, size
    if type(r) is tuple and len(r) == 1:
        r = r[0]
    if type(r) is tuple and len(r) == 2:
        o, w = r
        if type(o) is int and type(w) is int and 0 <= o and 1 <= w and o + w <= size:
            return o, w
    return None


# ----------------------------------------------------------------------------- elastic_linear

@_autocast.off
def _linear_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_r, out_r, backend: str) -> Tensor:
    forward, _ = _linear_impl(backend)
    y = forward(_rows(x, x.shape[-1]), weight, bias, in_r, out_r)
    return y.reshape(*x.shape[:-1], total_width(out_r))


@_autocast.off
def _linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, in_r, out_r, backend: str, need_dx: bool, need_dw: bool,
                need_db: bool):
    _, backward = _linear_impl(backend)
    dx, dw, db = backward(_rows(dy, dy.shape[-1]), _rows(x, x.shape[-1]), weight, in_r, out_r, need_dx, need_dw,
                          need_db)
    return (None if dx is None else dx.reshape(x.shape)), dw, db


@torch.library.custom_op("asvit::elastic_linear", mutates_args=())
def _elastic_linear_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], in_range: list[int],
                       out_ranges: list[int], backend: str) -> Tensor:
    return _linear_fwd(x, weight, bias, _pairs(in_range), _pairs(out_ranges), backend)


@_elastic_linear_op.register_fake
def _(x, weight, bias, in_range, out_ranges, backend):
    return x.new_empty((*x.shape[:-1], total_width(_pairs(out_ranges))))


@torch.library.custom_op("asvit::elastic_linear_backward", mutates_args=())
def _elastic_linear_backward_op(dy: Tensor, x: Tensor, weight: Tensor, in_range: list[int],
                                out_ranges: list[int], backend: str, need_dx: bool, need_dw: bool,
                                need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _linear_bwd(dy, x, weight, _pairs(in_range), _pairs(out_ranges), backend, need_dx, need_dw,
                             need_db)
    return _or_empty(dx, x), _or_empty(dw, x), _or_empty(db, x)


@_elastic_linear_backward_op.register_fake
def _(dy, x, weight, in_range, out_ranges, backend, need_dx, need_dw, need_db):
    return (_or_empty(torch.empty_like(x) if need_dx else None, x),
            _or_empty(torch.empty_like(weight) if need_dw else None, x),
            _or_empty(weight.new_empty(weight.shape[0]) if need_db else None, x))


def _linear_setup(ctx, inputs, output):
    x, weight, bias, in_range, out_ranges, backend = inputs
    ctx.save_for_backward(x, weight)
    ctx.args = (in_range, out_ranges, backend)
    ctx.has_bias = bias is not None


def _linear_backward(ctx, dy):
    x, weight = ctx.saved_tensors
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    need_db = need_db and ctx.has_bias
    dx, dw, db = _elastic_linear_backward_op(dy, x, weight, *ctx.args, need_dx, need_dw, need_db)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db else None, None, None, None)


_elastic_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup)


class _EagerLinear(torch.autograd.Function):
    """The same forward and backward bodies as the custom op, without its dispatch."""

    @staticmethod
    def forward(ctx, x, weight, bias, in_r, out_r, backend):
        ctx.save_for_backward(x, weight)
        ctx.args, ctx.has_bias = (in_r, out_r, backend), bias is not None
        return _linear_fwd(x, weight, bias, in_r, out_r, backend)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = _linear_bwd(dy, x, weight, *ctx.args, need_dx, need_dw, need_db and ctx.has_bias)
        return dx, dw, db, None, None, None


class _RunLinear(torch.autograd.Function):
    """One run of rows x one run of columns of a large weight: dense F.linear on views; the
    backward writes the full-size weight gradient once (the block by its matmul, beta=0, the rest
    zeroed), where F.linear's own backward on views zeroes all of it and then copies the block in.
    That is the per-run branch of ``torch_backend.elastic._weight_grad`` written out for one run:
    calling ``linear_backward`` instead gives the same bits ~50 us a call slower (1 thread)."""

    @staticmethod
    def forward(ctx, x, weight, bias, i, k, o, n):
        ctx.save_for_backward(x, weight)
        ctx.run, ctx.has_bias = (i, k, o, n), bias is not None
        return F.linear(x, weight[o:o + n, i:i + k], None if bias is None else bias[o:o + n])

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        i, k, o, n = ctx.run
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx = dw = db = None
        if need_dx:
            dx = dy.matmul(weight[o:o + n, i:i + k])
        dy2 = dy.reshape(-1, n)
        if need_dw:
            C_out, C_in = weight.shape
            dw = torch.empty_like(weight)
            for a, b in ((0, o), (o + n, C_out)):
                if a < b:
                    dw[a:b].zero_()
            rows = dw[o:o + n]
            for a, b in ((0, i), (i + k, C_in)):
                if a < b:
                    rows[:, a:b].zero_()
            rows[:, i:i + k].addmm_(dy2.t(), x.reshape(-1, k), beta=0)
        if need_db and ctx.has_bias:
            db = dy2.new_zeros(weight.shape[0])
            torch.sum(dy2, 0, out=db[o:o + n])
        return dx, dw, db, None, None, None, None


# F.linear on one strided view of the used block when it has at most _COMPOSITE_MAX_BLOCK entries:
# C++ autograd differentiates it (no Python in the backward), and the view's one AsStridedBackward
# zeroes the full-size weight gradient and copies the block in (two slices would do that twice,
# once at full size). Larger blocks go to _RunLinear, whose backward writes the block once by its
# matmul: the block's zero-and-copy traffic then outweighs its Python cost. ElasticViT middle fc1
# (400 x 96 -> 360 of a 720 x 192 weight, 1 thread, thread CPU time, interleaved): views 644 us,
# strided view 625, _RunLinear 647; a (1576 x 288 -> 1152 of 1536 x 384) block: 21.8 vs 21.2 ms.
# bench/elastic.py's half-width block (1576 x 192 -> 768, 147k entries), time over dense, mean of 8
# interleaved runs each: 2 threads, view 1.072 vs _RunLinear 1.103; 1 thread 1.083 vs 1.088.
_COMPOSITE_MAX_BLOCK = 2 ** 18


def _viewable(weight: Tensor, bias: Optional[Tensor]) -> bool:
    """Whether ``_block`` views of these parameters differentiate like slices: every element its own
    memory (row- or column-major weight, contiguous bias). as_strided's backward sums the gradient
    of elements sharing memory (an expanded, stride-0 leaf), where a slice keeps them apart."""
    return ((weight.is_contiguous() or weight.t().is_contiguous())
            and (bias is None or bias.is_contiguous()))


def _block(t: Tensor, sizes, strides, offset) -> Tensor:
    """``t.as_strided`` with ``strides`` (and ``offset``: an int, or a (row, column) pair) in units of
    ``t``'s own strides, from its own storage offset: the view is exactly the slicing it stands
    for, whatever ``t``'s layout (only for layouts ``_viewable`` passes)."""
    st = t.stride()
    if len(st) == 1:
        return t.as_strided(sizes, [a * st[0] for a in strides], t.storage_offset() + offset * st[0])
    return t.as_strided(sizes, [a * st[0] + b * st[1] for a, b in strides],
                        t.storage_offset() + offset[0] * st[0] + offset[1] * st[1])


def _run_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], i: int, k: int, o: int, n: int) -> Tensor:
    """Rows ``o:o+n`` x columns ``i:i+k`` of ``weight`` in plain eager mode (torch backend)."""
    C_out, C_in = weight.shape
    if k == C_in and n == C_out:
        return F.linear(x, weight, bias)
    if n * k <= _COMPOSITE_MAX_BLOCK:
        if _viewable(weight, bias):
            return F.linear(x, _block(weight, (n, k), ((1, 0), (0, 1)), (o, i)),
                            None if bias is None else _block(bias, (n,), (1,), o))
        return F.linear(x, weight[o:o + n, i:i + k], None if bias is None else bias[o:o + n])
    return _RunLinear.apply(x, weight, bias, i, k, o, n)


def _spaced_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], i: int, k: int, runs) -> Optional[Tensor]:
    """Output runs of one length at one spacing (a qkv weight's q, k and v blocks of one range that
    does not wrap) x one column run: the block is one strided (runs, n, k) view of the weight, copied
    into a (runs * n, k) matrix by ``reshape`` for ONE dense matmul; C++ autograd carries its
    gradient back (one zero-fill and one strided copy, no Python). None when the runs are not so."""
    n, first = runs[0].length, runs[0].src
    step = runs[1].src - first
    if (step <= n or any(r.length != n or r.src != first + j * step for j, r in enumerate(runs))
            or not _viewable(weight, bias)):
        return None
    w = _block(weight, (len(runs), n, k), ((step, 0), (1, 0), (0, 1)), (first, i)).reshape(-1, k)
    b = None if bias is None else _block(bias, (len(runs), n), (step, 1), first).reshape(-1)
    return F.linear(x, w, b)


def _linear_lean(x, weight, bias, in_range, out_range, backend) -> Optional[Tensor]:
    """The lean CPU path (see above), or None. Ranges of several runs (a qkv weight's row blocks,
    wrapping ranges) are checked by the cached range validation, which raises its own errors."""
    if not _lean_ok(x, weight, bias, 2, backend) or torch.is_autocast_enabled("cpu"):
        return None
    C_out, C_in = weight.shape
    ir, orr = _one_run(in_range, C_in), _one_run(out_range, C_out)
    if ir is not None and orr is not None:
        return _run_linear(x, weight, bias, *ir, *orr) if x.shape[-1:] == ir[1:] else None
    in_r = normalize_range(in_range, C_in, "in_range")
    out_r = normalize_ranges(out_range, C_out, "out_range")
    if x.shape[-1:] != in_r[1:]:
        return None
    (i, *more_in), out_runs = pieces(in_r, C_in), concat_pieces(out_r, C_out)
    if not more_in and len(out_runs) == 1:  # e.g. a full-width qkv's q, k and v blocks: one run
        return _run_linear(x, weight, bias, i.src, i.length, out_runs[0].src, out_runs[0].length)
    if not more_in:
        y = _spaced_linear(x, weight, bias, i.src, i.length, out_runs)
        if y is not None:
            return y
    return _EagerLinear.apply(x, weight, bias, (in_r,), out_r, "torch")


def elastic_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, in_range: RangeLike = None,
                   out_range: RangeLike = None, *, backend: Optional[str] = None) -> Tensor:
    """A linear layer over channel ranges of a shared weight, without copying the used block.

    Args:
        x: ``(..., in_width)``, float32/float16/bfloat16 (float64 on the torch backend).
        weight: the full shared ``(C_out, C_in)`` weight, same device and dtype as ``x``.
        bias: the full shared ``(C_out,)`` bias, or None.
        in_range: ``(offset, width)`` over ``C_in`` (channels ``(offset + j) % C_in``), None = all.
        out_range: one range over ``C_out``, or a sequence of non-overlapping ranges concatenated in
            order (a qkv weight's q, k and v row blocks), None = all.
        backend: None/"auto", "torch" or "triton" (see ``asvit_kernels.backends``).

    Returns:
        ``(..., out_width)``: ``F.linear(x, weight[out_idx][:, in_idx], bias[out_idx])``; under
        ``torch.autocast`` the inputs are cast as ``F.linear``'s are (``ops._autocast``).
    """
    y = _linear_lean(x, weight, bias, in_range, out_range, backend)
    if y is not None:
        return y
    _validate.tensor(x, "x", min_ndim=1)
    _validate.tensor(weight, "weight", ndim=2)
    if bias is not None:
        _validate.tensor(bias, "bias", ndim=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias has {bias.shape[0]} entries but weight has {weight.shape[0]} rows")
    x, weight, bias = _autocast.matmul_inputs(x.device, x, weight, bias)
    _validate.same_device_dtype(x, "x", weight=weight, bias=bias)
    C_out, C_in = weight.shape
    in_r = normalize_range(in_range, C_in, "in_range")
    out_r = normalize_ranges(out_range, C_out, "out_range")
    if x.shape[-1] != in_r[1]:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must equal the in_range width ({in_r[1]})")
    impl = backends.pick("elastic_linear", x.device, backend, x.dtype)
    if _transforms.active():
        from ..reference.elastic import elastic_linear as composite
        return composite(x, weight, bias, in_r, list(out_r))
    if (_transforms.plain_eager() and impl == "torch" and len(out_r) == 1 and sum(in_r) <= C_in
            and sum(out_r[0]) <= C_out):
        return _run_linear(x, weight, bias, *in_r, *out_r[0])
    if _transforms.plain_eager():
        return _EagerLinear.apply(x, weight, bias, (in_r,), out_r, impl)
    return _elastic_linear_op(x, weight, bias, list(in_r), _flat(out_r), impl)


# ----------------------------------------------------------------------------- elastic_layer_norm

def _stat_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@_autocast.off
def _ln_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], offset: int, eps: float, backend: str):
    forward, _ = _layer_norm_impl(backend)
    y, mean, rstd = forward(_rows(x, x.shape[-1]), weight.contiguous(),
                            None if bias is None else bias.contiguous(), offset, eps)
    return y.reshape(x.shape), mean, rstd


@_autocast.off
def _ln_bwd(dy: Tensor, x: Tensor, weight: Tensor, has_bias: bool, mean: Tensor, rstd: Tensor, offset: int,
            backend: str, need_dx: bool, need_dwb: bool):
    _, backward = _layer_norm_impl(backend)
    width = x.shape[-1]
    dx, dw, db = backward(_rows(dy, width), _rows(x, width), weight.contiguous(), has_bias, mean, rstd, offset,
                          need_dx, need_dwb)
    return (None if dx is None else dx.reshape(x.shape)), dw, db


@torch.library.custom_op("asvit::elastic_layer_norm", mutates_args=())
def _elastic_layer_norm_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], offset: int, eps: float,
                           backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _ln_fwd(x, weight, bias, offset, eps, backend)


@_elastic_layer_norm_op.register_fake
def _(x, weight, bias, offset, eps, backend):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    stat = x.new_empty(rows, dtype=_stat_dtype(x))
    return torch.empty_like(x), stat, torch.empty_like(stat)


@torch.library.custom_op("asvit::elastic_layer_norm_backward", mutates_args=())
def _elastic_layer_norm_backward_op(dy: Tensor, x: Tensor, weight: Tensor, has_bias: bool, mean: Tensor,
                                    rstd: Tensor, offset: int, backend: str, need_dx: bool,
                                    need_dwb: bool) -> tuple[Tensor, Tensor, Tensor]:
    dx, dw, db = _ln_bwd(dy, x, weight, has_bias, mean, rstd, offset, backend, need_dx, need_dwb)
    return _or_empty(dx, x), _or_empty(dw, x), _or_empty(db, x)


@_elastic_layer_norm_backward_op.register_fake
def _(dy, x, weight, has_bias, mean, rstd, offset, backend, need_dx, need_dwb):
    return (_or_empty(torch.empty_like(x) if need_dx else None, x),
            _or_empty(torch.empty_like(weight) if need_dwb else None, x),
            _or_empty(torch.empty_like(weight) if need_dwb and has_bias else None, x))


def _ln_setup(ctx, inputs, output):
    x, weight, bias, offset, eps, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.args = (offset, backend)
    ctx.has_bias = bias is not None


def _ln_backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    offset, backend = ctx.args
    need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
    dx, dw, db = _elastic_layer_norm_backward_op(dy, x, weight, ctx.has_bias, mean, rstd, offset, backend,
                                                 need_dx, need_dw or need_db)
    return (dx if need_dx else None, dw if need_dw else None, db if need_db and ctx.has_bias else None,
            None, None, None)


_elastic_layer_norm_op.register_autograd(_ln_backward, setup_context=_ln_setup)


class _EagerLayerNorm(torch.autograd.Function):
    """The same bodies as the custom op, without its dispatch; returns y only."""

    @staticmethod
    def forward(ctx, x, weight, bias, offset, eps, backend):
        y, mean, rstd = _ln_fwd(x, weight, bias, offset, eps, backend)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.args, ctx.has_bias = (offset, backend), bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = _ln_bwd(dy, x, weight, ctx.has_bias, mean, rstd, *ctx.args, need_dx, need_dw or need_db)
        return dx, (dw if need_dw else None), (db if need_db else None), None, None, None


def _layer_norm_limits(width: int):
    def limits(b: str) -> Optional[str]:
        if b == "triton":
            from ..triton.elastic_layer_norm import MAX_WIDTH
            if width > MAX_WIDTH:
                return f"the Triton LayerNorm keeps a row in registers: width {width} > {MAX_WIDTH}"
        return None
    return limits


def elastic_layer_norm(x: Tensor, weight: Tensor, bias: Optional[Tensor], channel_range: RangeLike = None,
                       eps: float = 1e-5, *, backend: Optional[str] = None) -> Tensor:
    """LayerNorm over ``x``'s last dim with a channel range of a shared affine weight.

    Args:
        x: ``(..., width)``, float32/float16/bfloat16 (float64 on the torch backend).
        weight: the full shared ``(C,)`` scale; bias: the full shared ``(C,)`` shift, or None.
        channel_range: ``(offset, width)`` over ``C``; channel ``j`` of ``x`` uses
            ``weight[(offset + j) % C]``. None = all ``C`` channels.
        eps: added to the variance.
        backend: None/"auto", "torch", "triton" or "cuda".

    Returns:
        ``(..., width)``, equal to ``F.layer_norm(x, (width,), weight[idx], bias[idx], eps)``, also in
        dtype under ``torch.autocast`` (``ops._autocast``).
    """
    if _lean_ok(x, weight, bias, 1, backend) and type(eps) is float and 0.0 < eps < math.inf:
        # One run or a wrapping range: the general path takes the same composite for these calls.
        C = weight.shape[0]
        r = (0, C) if channel_range is None else channel_range
        if (type(r) is tuple and len(r) == 2 and type(r[0]) is int and type(r[1]) is int and 0 <= r[0] < C
                and 1 < r[1] <= C and x.shape[-1:] == r[1:]):
            return layer_norm_composite(x, weight, bias, r[0], eps)
    _validate.tensor(x, "x", min_ndim=1)
    _validate.tensor(weight, "weight", ndim=1)
    if bias is not None:
        _validate.tensor(bias, "bias", ndim=1)
        if bias.shape != weight.shape:
            raise ValueError(f"bias has shape {tuple(bias.shape)} but weight has {tuple(weight.shape)}")
    x, weight, bias = _autocast.layer_norm_inputs(x, weight, bias)
    _validate.same_device_dtype(x, "x", weight=weight, bias=bias)
    eps = _validate.finite_float(eps, "eps")
    offset, width = normalize_range(channel_range, weight.shape[0], "channel_range")
    if x.shape[-1] != width:
        raise ValueError(f"x's last dim ({x.shape[-1]}) must equal the channel_range width ({width})")
    impl = backends.pick("elastic_layer_norm", x.device, backend, x.dtype, _layer_norm_limits(width))
    if _transforms.active():
        from ..reference.elastic import elastic_layer_norm as composite
        return composite(x, weight, bias, (offset, width), eps)
    if _transforms.plain_eager() and impl == "torch" and width > 1 and x.dtype in (torch.float32, torch.float64):
        # PyTorch's own layer_norm on views of the affine entries, differentiated by C++ autograd:
        # per-call cost as dense F.layer_norm's (a Python autograd.Function adds about 0.1 ms, a
        # third of a (1576, 192) LayerNorm's forward+backward). Width 1 and half dtypes keep the
        # bodies below (exact degenerate form; float32 statistics).
        return layer_norm_composite(x, weight, bias, offset, eps)
    if _transforms.plain_eager():
        return _EagerLayerNorm.apply(x, weight, bias, offset, eps, impl)
    return _elastic_layer_norm_op(x, weight, bias, offset, eps, impl)[0]
