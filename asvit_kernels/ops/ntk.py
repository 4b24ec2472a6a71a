"""Training-free indicators in one pass: the per-sample-gradient Gram of a linear layer, the
empirical NTK of a model from one forward and one backward, its condition number (As-ViT's kappa),
and the length distortion L^E by forward-mode JVPs.

``ntk`` fast path: forward hooks record each supported layer's input, one backward of
``sum_i s_i`` gives the gradient at each layer's output, and since sample i's gradient at a layer
depends on sample i alone, each layer's block of the NTK is a Gram of per-sample quantities
(``per_sample_grad_gram`` for weight matrices) that never materialises a per-sample gradient vector.
When that premise cannot be guaranteed, an exact fallback takes over (``torch.func`` vjp vmapped
over the B one-hot cotangents, or the per-sample loop if vmap cannot batch the model).
"""
from __future__ import annotations

import logging
import math
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .. import backends
from ..params import ParamSelector, select_parameters
from . import _autocast, _transforms, _validate
from ._param_uses import ParamUseCheck

Tensor = torch.Tensor
OutputFn = Optional[Callable[[nn.Module, Tensor], Tensor]]
log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- per_sample_grad_gram


def _gram_impl(backend: str):
    if backend == "triton":
        from ..triton.per_sample_grad_gram import per_sample_grad_gram as fn
    elif backend == "cuda":
        from ..cuda_backend.ntk import per_sample_grad_gram as fn
    else:
        from ..torch_backend.ntk import per_sample_grad_gram as fn
    return fn


@torch.library.custom_op("asvit::per_sample_grad_gram", mutates_args=())
@_autocast.off
def _gram_op(a: Tensor, g: Tensor, backend: str) -> Tensor:
    c = lambda t: t if t.stride(-1) == 1 else t.contiguous()  # noqa: E731
    return _gram_impl(backend)(c(a), c(g))


@_gram_op.register_fake
def _(a, g, backend):
    dtype = torch.float64 if a.dtype == torch.float64 and backend == "torch" else torch.float32
    return a.new_empty((a.shape[0], a.shape[0]), dtype=dtype)


def per_sample_grad_gram(a: Tensor, g: Tensor, *, backend: Optional[str] = None) -> Tensor:
    """Gram of one linear layer's per-sample weight gradients, without materialising them.

    Args:
        a: layer inputs ``(B, T, D_in)`` (``(B, D_in)`` means T = 1).
        g: gradients at the layer outputs ``(B, T, D_out)`` (or ``(B, D_out)``), same dtype/device.
        backend: None/"auto", "torch", "triton" or "cuda".

    Returns:
        ``(B, B)``: entry (i, j) is ``<g_i^T a_i, g_j^T a_j>`` (Frobenius), accumulated in fp32
        (float64 for float64 input on the torch backend) on every backend. Not differentiable.
        Under ``torch.autocast`` the inputs are cast to the autocast dtype, as a matmul's are; the
        output stays fp32.
    """
    _validate.tensor(a, "a")
    _validate.tensor(g, "g")
    a, g = _autocast.matmul_inputs(a.device, a, g)
    _validate.same_device_dtype(a, "a", g=g)
    if a.dim() == 2 and g.dim() == 2:
        a, g = a[:, None], g[:, None]
    if a.dim() != 3 or g.dim() != 3:
        raise ValueError(f"a and g must both be (B, T, D) or both (B, D), got {tuple(a.shape)} and {tuple(g.shape)}")
    if a.shape[:2] != g.shape[:2]:
        raise ValueError(f"a and g must share (B, T), got {tuple(a.shape[:2])} and {tuple(g.shape[:2])}")
    if a.shape[0] == 0:
        raise ValueError("a and g have an empty batch (B = 0)")
    if a.shape[1] == 0:
        raise ValueError(f"a and g have no tokens (T = 0): shapes {tuple(a.shape)} and {tuple(g.shape)}")
    for name, t, dim in (("a", a, "D_in"), ("g", g, "D_out")):
        if t.shape[2] == 0:
            raise ValueError(f"{name} has no features ({dim} = 0): shape {tuple(t.shape)}")
    impl = backends.pick("per_sample_grad_gram", a.device, backend, a.dtype)
    return _gram_op(a, g, impl)


# ----------------------------------------------------------------------------- ntk


class _Fallback(Exception):
    """The fast path cannot guarantee the definition's answer for this model; says why."""


def _outputs(model, x, output_fn):
    out = model(x) if output_fn is None else output_fn(model, x)
    if not isinstance(out, Tensor) or out.dim() == 0 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"output_fn must return a tensor with the batch ({x.shape[0]}) as its leading dim, got {shape}")
    return out


_SUPPORTED = (nn.Linear, nn.Conv2d, nn.LayerNorm, nn.Embedding)


def _per_token(t: Tensor, B: int) -> Tensor:
    """(B, ...) -> (B, T, D): every leading position after the batch is a token."""
    return t.reshape(B, -1, t.shape[-1])


def _conv_windows(x: Tensor, kernel, dilation, padding, stride) -> Tensor:
    """``F.unfold(x, ...).transpose(1, 2)`` as one strided copy (a view for a 1x1 kernel), (B, L, C * kh * kw):
    the same values bit for bit. F.unfold's CPU kernel goes sample by sample (proxy patch embed,
    B = 64: 1.7 ms at 1 thread, this 0.8 ms; at 2 threads on the loaded machine 520 ms against 24 ms)."""
    B, C = x.shape[:2]
    if padding[0] or padding[1]:
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]))
    Lh, Lw = ((x.shape[2 + i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in (0, 1))
    sB, sC, sH, sW = x.stride()
    v = x.as_strided((B, Lh, Lw, C, kernel[0], kernel[1]),
                     (sB, stride[0] * sH, stride[1] * sW, sC, dilation[0] * sH, dilation[1] * sW))
    return v.reshape(B, Lh * Lw, C * kernel[0] * kernel[1])


def _layer_factors(m: nn.Module, inputs: list[Tensor], grads: list[Tensor], B: int,
                   wanted: set[str]) -> dict[str, tuple[Tensor, Optional[Tensor]]]:
    """For each parameter of the layer named in ``wanted``: (per-token input a, per-token output
    grad g) whose per-sample product g^T a is that parameter's per-sample gradient, or (vector,
    None) when the per-sample gradient is a (B, P) matrix directly. Several calls of one layer are
    concatenated along the tokens (their per-sample gradients add)."""
    a_parts, g_parts = [], []
    for x, g in zip(inputs, grads):
        if g is None:
            continue
        if x.shape[0] != B:
            raise _Fallback(f"{type(m).__name__} is fed {tuple(x.shape)}, not the batch of {B} as leading dim")
        if isinstance(m, nn.Conv2d):
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise _Fallback("Conv2d with groups, padding modes or string padding")
            if x.dim() != 4:
                raise _Fallback(f"Conv2d fed {tuple(x.shape)}, not a batch (B, C, H, W)")
            a_parts.append(_conv_windows(x, m.kernel_size, m.dilation, m.padding, m.stride))  # (B, L, Cin*k*k)
            g_parts.append(g.flatten(2).transpose(1, 2))                          # (B, L, Cout)
        elif isinstance(m, nn.LayerNorm):
            if len(m.normalized_shape) != 1:
                raise _Fallback("LayerNorm over more than the last dim")
            xt = _per_token(x, B).to(g.dtype)
            # the normalised input, fused; only the weight's factor reads it
            a_parts.append(F.layer_norm(xt, xt.shape[-1:], eps=m.eps) if "weight" in wanted else xt)
            g_parts.append(_per_token(g, B))
        elif isinstance(m, nn.Embedding):
            if m.max_norm is not None:
                raise _Fallback("Embedding with max_norm")
            a_parts.append(x.reshape(B, -1))
            g_parts.append(_per_token(g, B))
        else:  # Linear
            a_parts.append(_per_token(x, B))
            g_parts.append(_per_token(g, B))
    if not g_parts:
        return {}
    a, g = (parts[0] if len(parts) == 1 else torch.cat(parts, 1) for parts in (a_parts, g_parts))  # no copy of one
    out = {}
    if isinstance(m, nn.LayerNorm):
        if "weight" in wanted:
            out["weight"] = ((g * a).sum(1), None)
    elif isinstance(m, nn.Embedding):
        out["weight"] = ("embedding", (a, g))
    else:
        out["weight"] = (a.to(g.dtype), g)
    if "bias" in wanted:
        out["bias"] = (g.sum(1), None)
    return out


def _embedding_gram(idx: Tensor, g: Tensor, padding_idx: Optional[int]) -> Tensor:
    """K_ij = sum over token pairs with equal ids of g_i[t] . g_j[t'] (rows of one embedding)."""
    B, T = idx.shape
    ids, G = idx.reshape(-1), g.reshape(B * T, -1)
    same = ids[:, None] == ids[None, :]
    if padding_idx is not None:
        same &= (ids != padding_idx)[:, None]
    return ((G @ G.T) * same).view(B, T, B, T).sum((1, 3))


def _plan(model: nn.Module, chosen: list[tuple[str, nn.Parameter]]) -> tuple[list[nn.Module], list[str], list[str]]:
    """The supported layers owning selected parameters, the names of selected plain parameters
    broadcast over the batch, and the names of the selected parameters the layers own; _Fallback
    when anything else holds a selected parameter."""
    wanted = {id(p) for _, p in chosen}
    in_layers, owners = set(), {}
    records, plain = [], []
    for mod_name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            raise _Fallback("BatchNorm in training mode couples the samples")
        own = [(n, p) for n, p in m.named_parameters(recurse=False) if id(p) in wanted]
        if not own:
            continue
        for _, p in own:
            owners.setdefault(id(p), []).append(type(m).__name__)
        if type(m) in _SUPPORTED:
            records.append(m)
            in_layers.update(id(p) for _, p in own)
            continue
        for n, p in own:
            if p.dim() == 0 or p.shape[0] != 1:
                raise _Fallback(f"parameter {mod_name + '.' if mod_name else ''}{n} of {type(m).__name__} "
                                f"is not broadcast over the batch (leading dim 1)")
            plain.append(f"{mod_name}.{n}" if mod_name else n)
    for name, p in chosen:
        if len(owners.get(id(p), ())) > 1 and not (id(p) in in_layers and len(set(owners[id(p)])) == 1):
            raise _Fallback(f"parameter {name} is shared by modules of different kinds "
                            f"({', '.join(sorted(set(owners[id(p)])))})")
    return records, plain, [n for n, p in chosen if id(p) in in_layers]


def _hooked(records: list[nn.Module], on_call: Callable):
    """Forward hooks on the recorded layers: ``on_call(layer, input, output)`` may replace the output."""
    return [r.register_forward_hook(lambda m, args, out: on_call(m, args[0], out)) for r in records]


def _probe_shapes(model, x, output_fn, records) -> tuple[list[tuple[torch.Size, torch.dtype]], Tensor]:
    """One no-grad forward: each recorded call's output shape and dtype, in call order, and the output."""
    shapes = []
    handles = _hooked(records, lambda r, a, out: shapes.append((out.shape, out.dtype)))
    try:
        with torch.no_grad():
            out = _outputs(model, x, output_fn)
    finally:
        for h in handles:
            h.remove()
    return shapes, out


def _one_model_pass(model, x, output_fn, records, plain, tracked, chosen, use_probes: bool = False):
    """One forward + one backward with plain autograd (the fused custom ops run): each recorded
    call's input and output gradient, the plain parameters' per-sample gradients, and the output.

    Each layer output is differentiated directly (no shape-finding pass); should anything modify
    one in place later in the forward, the pass is redone with a zero probe added to each output
    as the call happens, ``d sum_i s_i / d probe`` being its output gradient. The layers' weights are not differentiated:
    ``ParamUseCheck`` watches the forward instead, and any use of a tracked parameter other than
    its own layer's call raises _Fallback. Returns (call order, inputs, grads, plain grads, out)."""
    B = x.shape[0]
    index = {id(r): i for i, r in enumerate(records)}
    order, inputs, probes, versions = [], [], [], []

    def on_call(r, a, out):
        order.append(index[id(r)])
        inputs.append(a.detach())
        if use_probes:
            probes.append(torch.zeros_like(out, requires_grad=True))
            return out + probes[-1]
        probes.append(out)                      # differentiated directly, if nothing writes it in place
        versions.append(out._version)
        return out

    params = dict(chosen)
    watched = {id(params[n]): n for n in tracked}
    owners = {pid: set() for pid in watched}
    for r in records:
        for p in r.parameters(recurse=False):
            if id(p) in owners:
                owners[id(p)].add(id(r))
    state = {n: params[n] for n in plain}
    plain_probes = [torch.zeros(B, *state[n].shape[1:], device=x.device, dtype=state[n].dtype,
                                requires_grad=True) for n in plain]
    st = {n: state[n].detach().expand(B, *state[n].shape[1:]) + pp for n, pp in zip(plain, plain_probes)}
    check = ParamUseCheck(watched, owners, records)
    handles = _hooked(records, on_call)
    try:
        with torch.enable_grad(), check:
            out = _call_with(model, st, lambda: _outputs(model, x, output_fn))
    finally:
        check.remove()
        for h in handles:
            h.remove()
    if check.violations:
        raise _Fallback(f"parameter {check.violations[0]} is used outside the layer holding it (no hook sees it)")
    if any(o._version != v for o, v in zip(probes, versions)):
        return _one_model_pass(model, x, output_fn, records, plain, tracked, chosen, use_probes=True)
    leaves = probes + plain_probes
    grads = torch.autograd.grad(out.reshape(B, -1).sum(), leaves, allow_unused=True, materialize_grads=True)
    return order, inputs, list(grads[:len(probes)]), list(grads[len(probes):]), out.detach()


def _layer_grads(model, x, output_fn, records, plain, tracked, state, shapes):
    """One forward + one backward with ``torch.func.vjp``: under vmap over stacked models, or for one
    model under an outer torch.func transform (plain autograd calls take ``_one_model_pass``).

    Zero probes added to every recorded layer output (and to per-sample copies of the plain
    parameters) turn ``d sum_i s_i / d probe`` into each layer's output gradient. The layers'
    parameters (``tracked``) are differentiated too: their batch gradient must be the sum of the
    per-sample ones the layers give, which fails when a use escapes the hooks. Returns (call order
    as record indices, the calls' inputs, their output grads, the plain params' grads, the tracked
    params' batch grads).
    """
    B = x.shape[0]
    order, inputs = [], []
    index = {id(r): i for i, r in enumerate(records)}

    def f(probes, plain_probes, tracked_values):
        it = iter(probes)
        order.clear()
        inputs.clear()

        def on_call(r, a, out):
            order.append(index[id(r)])
            inputs.append(a.detach())
            return out + next(it)

        st = dict(state)
        for name, pp in zip(plain, plain_probes):
            st[name] = st[name].expand(B, *st[name].shape[1:]) + pp
        st.update(zip(tracked, tracked_values))
        handles = _hooked(records, on_call)
        try:
            out = _call_with(model, st, lambda: _outputs(model, x, output_fn))
        finally:
            for h in handles:
                h.remove()
        # The inputs leave through aux: captured tensors must not escape the transform.
        return out.reshape(B, -1).sum(), tuple(inputs)

    probes = [torch.zeros(sh, device=x.device, dtype=dt) for sh, dt in shapes]
    plain_probes = [torch.zeros(B, *state[n].shape[1:], device=x.device, dtype=state[n].dtype) for n in plain]
    s, vjp_fn, layer_inputs = torch.func.vjp(f, probes, plain_probes, [state[n] for n in tracked], has_aux=True)
    grads, plain_grads, tracked_grads = vjp_fn(torch.ones_like(s))
    return list(order), list(layer_inputs), grads, plain_grads, tracked_grads


def _combine(name: str, uses: list) -> tuple:
    """One parameter's per-sample factor from every layer holding it (tied weights): the
    per-sample gradient is the sum over the uses, so token factors are concatenated (as one layer
    called several times) and vectors added, before any Gram."""
    (r0, (a0, g0)) = uses[0]  # _plan let only layers of one type share a parameter
    padding_idx = getattr(r0, "padding_idx", None)
    if any(getattr(r, "padding_idx", None) != padding_idx for r, _ in uses):
        raise _Fallback(f"parameter {name} is shared by Embeddings with different padding_idx")
    if len(uses) == 1:
        return (a0, g0), padding_idx
    if g0 is None:
        return (sum(f[0] for _, f in uses), None), None
    if isinstance(a0, str):
        return ("embedding", tuple(torch.cat([f[1][i] for _, f in uses], 1) for i in (0, 1))), padding_idx
    return (torch.cat([f[0] for _, f in uses], 1), torch.cat([f[1] for _, f in uses], 1)), None


def _batch_grad(factor: tuple, padding_idx: Optional[int], p: Tensor) -> Tensor:
    """The sum over the samples of the per-sample gradients a factor stands for, shaped as ``p``."""
    a, g = factor
    if isinstance(a, str):
        idx, rows = g
        out = torch.zeros(p.shape, dtype=rows.dtype, device=rows.device)
        out.index_add_(0, idx.reshape(-1), rows.reshape(-1, rows.shape[-1]))
        if padding_idx is not None:
            out[padding_idx] = 0
        return out
    if g is None:
        return a.sum(0).reshape(p.shape)
    return torch.einsum("bto,bti->oi", g, a.to(g.dtype)).reshape(p.shape)


def _check_uses(name: str, factor: Optional[tuple], padding_idx, p: Tensor, batch_grad: Tensor) -> None:
    """_Fallback unless the layers' per-sample gradients add up to the parameter's batch gradient:
    a use no hook sees (the weight read directly, through F.linear) would be missing from the NTK."""
    want = batch_grad.double()
    got = torch.zeros_like(want) if factor is None else _batch_grad(factor, padding_idx, p).double()
    tol = 1e-8 if batch_grad.dtype == torch.float64 else 1e-3 if batch_grad.dtype == torch.float32 else 3e-2
    if (got - want).norm() > tol * (got.norm() + want.norm()) + 1e-30:
        raise _Fallback(f"parameter {name} is used outside the layers holding it: their per-sample "
                        f"gradients do not add up to its gradient")


def _gram_fn(device: torch.device, backend: Optional[str]) -> Callable[[Tensor, Tensor], Tensor]:
    """``per_sample_grad_gram`` for the layers' factors (valid by construction). Where it would run
    the torch backend in plain eager mode without autocast, its body is called directly: the custom
    op's dispatch cost ~0.1 ms a layer, a tenth of a small model's Gram time (proxy, B = 16)."""
    if (backends.pick("per_sample_grad_gram", device, backend) == "torch" and _transforms.plain_eager()
            and not _autocast.enabled(device)):
        body = _gram_impl("torch")
        return lambda a, g: body(*(t if t.stride(-1) == 1 else t.contiguous() for t in (a, g)))
    return lambda a, g: per_sample_grad_gram(a, g, backend=backend)


def _assemble(records, chosen, order, inputs, grads, plain_grads, tracked, tracked_grads, B, backend,
              device) -> Tensor:
    """Sum every selected parameter's block of the NTK, each a Gram of per-sample quantities."""
    names = {id(p): n for n, p in chosen}
    calls: list[list[int]] = [[] for _ in records]
    for k, j in enumerate(order):
        calls[j].append(k)
    uses: dict[int, list] = {}
    for r, ks in zip(records, calls):
        wanted = {n for n in ("weight", "bias") if id(getattr(r, n, None)) in names}
        for pname, f in _layer_factors(r, [inputs[k] for k in ks], [grads[k] for k in ks], B, wanted).items():
            uses.setdefault(id(getattr(r, pname)), []).append((r, f))
    params = dict(chosen)
    factors = {}
    for k, name in enumerate(tracked):
        pid = id(params[name])
        factor, padding_idx = _combine(name, uses[pid]) if pid in uses else (None, None)
        if tracked_grads is not None:  # None: the uses were checked as the forward ran (ParamUseCheck)
            _check_uses(name, factor, padding_idx, params[name], tracked_grads[k])
        if factor is not None:
            factors[name] = factor, padding_idx
    gram = _gram_fn(device, backend)
    K = torch.zeros(B, B, dtype=torch.float64, device=device)
    for (a, g), padding_idx in factors.values():
        if isinstance(a, str):  # embedding rows
            K += _embedding_gram(g[0], g[1], padding_idx).double()
        elif g is None:
            v = a.double()
            K += v @ v.T
        else:
            K += gram(a, g).double()
    for gp in plain_grads:
        v = gp.reshape(B, -1).double()
        K += v @ v.T
    return K


def _fast_ntk(models: Sequence[nn.Module], x: Tensor, output_fn: OutputFn, params: ParamSelector,
              backend: Optional[str]) -> Tensor:
    """(R, B, B) for R same-architecture models in one forward/backward pass (vmapped over their
    stacked parameters when R > 1), or _Fallback."""
    model = models[0]
    chosen = select_parameters(model, params)
    records, plain, tracked = _plan(model, chosen)
    if len(models) == 1 and not _transforms.active():
        try:
            order, inputs, grads, plain_grads, out = _one_model_pass(model, x, output_fn, records, plain, tracked,
                                                                     chosen)
        except RuntimeError as err:
            raise _Fallback(f"the one-pass forward/backward failed ({err})") from err
        if not _samples_independent(model, x, output_fn, out):
            raise _Fallback("the samples interact (changing sample 0 changes the other outputs)")
        return _assemble(records, chosen, order, inputs, grads, plain_grads, tracked, None, x.shape[0], backend,
                         x.device)[None]
    shapes, out = _probe_shapes(model, x, output_fn, records)
    if not _samples_independent(model, x, output_fn, out):
        raise _Fallback("the samples interact (changing sample 0 changes the other outputs)")
    try:
        if len(models) == 1:
            state = {n: p for n, p in model.named_parameters() if n in plain or n in tracked}
            runs = [_layer_grads(model, x, output_fn, records, plain, tracked, state, shapes)]
        else:
            ps, bs = torch.func.stack_module_state(list(models))
            order = []

            def one(p, b):
                o, i, g, pg, tg = _layer_grads(model, x, output_fn, records, plain, tracked, {**p, **b}, shapes)
                order[:] = o  # the call order is the architecture's, the same for every model
                return i, g, pg, tg

            outs = torch.func.vmap(one)(ps, bs)
            runs = [(order, *([t[r] for t in part] for part in outs)) for r in range(len(models))]
    except RuntimeError as err:
        raise _Fallback(f"the one-pass forward/backward failed ({err})") from err
    return torch.stack([_assemble(records, chosen, o, i, g, pg, tracked, tg, x.shape[0], backend, x.device)
                        for o, i, g, pg, tg in runs])


def _call_with(model: nn.Module, replacements: dict[str, Tensor], fn: Callable[[], Tensor]) -> Tensor:
    """Run ``fn`` with some parameters of ``model`` temporarily replaced by tensors (what
    torch.func.functional_call does, for an arbitrary ``fn`` rather than ``model.forward``)."""
    if not replacements:
        return fn()
    from torch.nn.utils.stateless import _reparametrize_module
    # tie_weights: a Parameter held by two modules is replaced under every name it has.
    with _reparametrize_module(model, replacements, tie_weights=True, strict=False):
        return fn()


def _samples_independent(model: nn.Module, x: Tensor, output_fn: OutputFn, out: Tensor) -> bool:
    """Replace sample 0 by noise: sample 1's output must stay put (up to rounding). Run on a batch
    of those two samples alone, which also catches any dependence on the rest of the batch, for
    2/B of a forward; a model that needs the whole batch gets the whole batch, sample 0 replaced."""
    if x.shape[0] < 2:
        return True
    for x2 in (x[:2].clone(), x.clone()):
        x2[0] = torch.randn_like(x[0]) if x.is_floating_point() else x[1]
        try:
            with torch.no_grad():
                other = _outputs(model, x2, output_fn)[1:].double()
        except (RuntimeError, ValueError):
            if x2.shape[0] == x.shape[0]:
                raise
            continue
        ref = out[1:other.shape[0] + 1].double()
        return bool(((other - ref).abs().max() <= 1e-4 * ref.abs().max().clamp_min(1e-30)).item())
    return False


def _exact_ntk(model: nn.Module, x: Tensor, output_fn: OutputFn, chosen) -> tuple[Tensor, str]:
    """The B per-sample gradients exactly, samples interacting or not: torch.func's vjp of
    s = (s_1..s_B) vmapped over the B one-hot cotangents; if the model defeats vmap, one vjp per
    sample (the As-ViT loop). Returns (K, which of the two ran)."""
    names = [n for n, _ in chosen]
    primals = tuple(p for _, p in chosen)
    B = x.shape[0]

    def s_of(*ps):
        # Buffers are copied inside the transform: BatchNorm may update them in place.
        state = {**dict(zip(names, ps)), **{n: b.clone() for n, b in model.named_buffers()}}
        out = _call_with(model, state, lambda: _outputs(model, x, output_fn))
        return out.reshape(B, -1).sum(1)

    try:
        _, vjp_fn = torch.func.vjp(s_of, *primals)
        grads = torch.func.vmap(vjp_fn)(torch.eye(B, dtype=primals[0].dtype, device=x.device))
        how = "vmap(vjp)"
    except (RuntimeError, NotImplementedError):
        from ..reference.ntk import ntk_loop
        return ntk_loop(model, x, output_fn, lambda n, p: any(p is q for q in primals)), "per-sample loop"
    J = torch.cat([g.reshape(B, -1).double() for g in grads], 1)
    return J @ J.T, how


def ntk(model: Union[nn.Module, Sequence[nn.Module]], x: Tensor, *, output_fn: OutputFn = None,
        params: ParamSelector = "all", backend: Optional[str] = None, return_info: bool = False,
        models_per_pass: Optional[int] = None):
    """The empirical sum-of-outputs NTK: ``K_ij = sum_p ds_i/dp . ds_j/dp`` in float64, with
    ``s_i = sum_c f(x)[i, c]`` and ``f = output_fn(model, x)`` (default ``model(x)``).

    Paths (``return_info=True`` returns ``(K, info)`` with ``info["path"]`` and the reason; the
    choice is also logged at DEBUG and tallied by ``path_counts``):
      - ``"fast"``: per model, one forward + one backward with plain autograd (the fused custom ops
        run; the layers' outputs are differentiated, never their weights: the forward is watched
        instead, so a weight used outside its own layer is seen), plus one no-grad forward with
        sample 0 replaced to check that the samples do not interact. With ``models_per_pass=k > 1``
        k models share one pass, vmapped over their stacked parameters (``torch.func``; a shape
        pass more and the weights' batch gradients, to check their uses). Cost model, stated:
        per model the fast path costs a forward, a backward without weight gradients and, per
        layer, the Gram of its per-sample gradients: min(tiles ``B T D_in D_out + B^2 D_in D_out``,
        tokens ``B^2 T^2 (D_in + D_out)``) multiply-adds (``per_sample_grad_gram``'s torch route),
        holding one model's activations and 4 MiB of per-sample tiles. A vmap of vjp / jacrev over
        the samples does the same multiply-adds (its backward forms the per-sample weight
        gradients, then the same B^2 P contraction) and holds all B P per-sample gradients, so it
        runs only as the exact path. A vmapped pass over k models holds k models' activations
        and gradients (k times the memory) for less Python overhead, so one model per pass is the
        default. ``info["method"]`` says which ran and ``info["why"]`` why.
        Taken when every selected parameter lives in ``nn.Linear``, ``nn.Conv2d``,
        ``nn.LayerNorm``, ``nn.Embedding`` fed ``(B, ...)``, or is a plain parameter broadcast over
        the batch (leading dim 1: class token, position embedding).
      - ``"exact"``: anything else (a layer fed ``(B * windows, ...)``, an unknown layer, BatchNorm
        in training mode, samples that interact): per-sample vjps with ``torch.func``. Same answer,
        more time and memory.

    Args:
        model: a module, or a list of same-architecture modules (R initialisations) -> ``(R, B, B)``.
        x: the batch ``(B, ...)``, B >= 1.
        params: "all", "weights" (names containing "weight", As-ViT/TENAS) or ``(name, p) -> bool``.
        backend: the backend of ``per_sample_grad_gram``.
        models_per_pass: with a list, at most this many models share one vmapped pass (each pass
            holds the activations of all its models); None = 1 (see the cost model above).
    """
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    if not models:
        raise ValueError("model is an empty list")
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty batch (B, ...), got shape {tuple(x.shape)}")
    for m in models:
        select_parameters(m, params)  # a selection that is empty raises here, for any path
    shapes = {tuple((n, tuple(p.shape)) for n, p in m.named_parameters()) for m in models}
    if len(shapes) > 1:
        raise ValueError("the models of a list must share one architecture (parameter names and shapes)")
    if models_per_pass is not None and (isinstance(models_per_pass, bool) or not isinstance(models_per_pass, int)
                                        or models_per_pass < 1):
        raise ValueError(f"models_per_pass must be None or a positive int, got {models_per_pass!r}")
    step = models_per_pass or 1
    if len(models) == 1:
        method, why = "one model per pass (autograd)", "a single model"
    elif models_per_pass is None:
        method, why = "one model per pass (autograd)", "the default (cost model: k models per pass, k x the memory)"
    else:
        method = "one model per pass (autograd)" if step == 1 else f"{min(step, len(models))} models per vmapped pass"
        why = f"models_per_pass={step}"
    info = {"path": "fast", "method": method, "why": why, "reason": None}
    try:
        K = torch.cat([_fast_ntk(models[i:i + step], x, output_fn, params, backend)
                       for i in range(0, len(models), step)])
    except _Fallback as err:
        exact = [_exact_ntk(m, x, output_fn, select_parameters(m, params)) for m in models]
        K = torch.stack([k for k, _ in exact])
        info = {"path": "exact", "method": exact[0][1], "why": "the fast path's premise fails (see reason)",
                "reason": str(err)}
    if not isinstance(model, (list, tuple)):
        K = K[0]
    _PATHS["calls"] += 1
    if info["path"] == "exact":
        _PATHS["exact"][info["reason"]] = _PATHS["exact"].get(info["reason"], 0) + 1
    log.debug("ntk: %s path%s", info["path"], f" ({info['reason']})" if info["reason"] else "")
    return (K, info) if return_info else K


_PATHS: dict = {"calls": 0, "exact": {}}  # what path_counts reports


def path_counts(reset: bool = False) -> dict:
    """How many ``ntk`` calls this process made and, per reason, how many took the exact path:
    ``{"calls": n, "exact": {reason: count}}`` (a copy; ``reset=True`` starts the tally over).
    Each call's path is logged at DEBUG; a search stage reports the tally once at INFO."""
    out = {"calls": _PATHS["calls"], "exact": dict(_PATHS["exact"])}
    if reset:
        _PATHS["calls"], _PATHS["exact"] = 0, {}
    return out


def ntk_condition_number(model: Union[nn.Module, Sequence[nn.Module]], x: Tensor, **kwargs) -> float:
    """As-ViT's kappa: lambda_max / lambda_min of the NTK (``eigvalsh`` in float64); ``inf`` when
    lambda_min <= 0 or the NTK is not finite (a degenerate network ranks worst, never NaN). With a
    list of models, the mean over them. Keyword arguments as ``ntk``."""
    if isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] < 2:
        raise ValueError(f"the condition number needs a batch of at least 2 samples, got {x.shape[0]}")
    K = ntk(model, x, **kwargs)
    Ks = K if K.dim() == 3 else K[None]
    kappas = []
    for k in Ks:
        if not torch.isfinite(k).all():
            kappas.append(math.inf)
            continue
        ev = torch.linalg.eigvalsh(k.double())
        kappas.append(math.inf if ev[0] <= 0 else (ev[-1] / ev[0]).item())
    return sum(kappas) / len(kappas)


# ----------------------------------------------------------------------------- length distortion


def circle_curve(input_shape: Sequence[int], n_points: int = 10, *,
                 generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """As-ViT's circle through input space: U = two orthonormal random directions,
    ``t = linspace(0, 2 pi, n)``, points ``U [cos t, sin t]`` and tangents ``U [-sin t, cos t]``."""
    shape = tuple(int(s) for s in input_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"input_shape must be non-empty with positive sizes, got {tuple(input_shape)}")
    if n_points < 1:
        raise ValueError(f"n_points must be >= 1, got {n_points}")
    n = math.prod(shape)
    if n < 2:
        raise ValueError("a circle needs an input of at least 2 elements")
    U, _ = torch.linalg.qr(torch.randn(n, 2, generator=generator, dtype=torch.float64))
    t = torch.linspace(0, 2 * math.pi, n_points, dtype=torch.float64)
    points = (U @ torch.stack([t.cos(), t.sin()])).T.reshape(n_points, *shape)
    tangents = (U @ torch.stack([-t.sin(), t.cos()])).T.reshape(n_points, *shape)
    return points.float(), tangents.float()


def _jvp_chunk(model, output_fn, pts, tans):
    f = lambda z: _outputs(model, z, output_fn)  # noqa: E731
    try:
        return torch.func.jvp(f, (pts,), (tans,))[1]
    except (RuntimeError, NotImplementedError):
        # Layers without forward AD: J t = d/dv <J^T v, t> (the double-vjp trick).
        with torch.enable_grad():
            z = pts.detach().requires_grad_()
            y = f(z)
            v = torch.zeros_like(y, requires_grad=True)
            (jtv,) = torch.autograd.grad(y, z, v, create_graph=True)
            (jt,) = torch.autograd.grad(jtv, v, tans)
        return jt


def length_distortion(model: nn.Module, points: Tensor, tangents: Tensor, *, output_fn: OutputFn = None,
                      chunk_size: Optional[int] = None) -> float:
    """L^E = sum over points of ``|| J_f(points_n) tangents_n ||_2`` by forward-mode JVP, the points
    batched (``chunk_size`` >= 1 at a time; None: all at once). The model must treat samples independently
    (eval mode / LayerNorm, as in As-ViT)."""
    if not isinstance(points, Tensor) or not isinstance(tangents, Tensor):
        raise TypeError("points and tangents must be tensors")
    for name, t in (("points", points), ("tangents", tangents)):
        if not t.is_floating_point():  # forward-mode AD needs a float primal and tangent
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if points.shape != tangents.shape:
        raise ValueError(f"points {tuple(points.shape)} and tangents {tuple(tangents.shape)} must have one shape")
    if points.dim() < 2 or points.shape[0] == 0:
        raise ValueError(f"points must be (n >= 1, *input_shape), got {tuple(points.shape)}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    step = chunk_size or points.shape[0]
    total = 0.0
    for i in range(0, points.shape[0], step):
        jt = _jvp_chunk(model, output_fn, points[i:i + step], tangents[i:i + step])
        total += jt.reshape(jt.shape[0], -1).double().norm(dim=1).sum().item()
    return total
