"""Which torch functions a forward pass hands each tracked parameter, checked as it runs.

The NTK fast path reads each layer's per-sample gradient off its hooks, so it is exact only if
every use of a selected parameter is the one its own layer makes (``F.linear`` inside that
``nn.Linear``'s forward, and so on). Seeing the calls themselves proves that without computing
the parameters' batch gradients (a weight-gradient matmul per layer) to compare against.
A use elsewhere (the weight passed to ``F.linear`` by another module, ``weight.t()``, ``.detach()``)
is recorded as a violation; reading metadata (``.shape``, ``.dtype``) is not a use.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

# The one call through which each supported layer type uses its own parameters.
_OWN_CALL = {nn.Linear: F.linear, nn.Conv2d: F.conv2d, nn.LayerNorm: F.layer_norm, nn.Embedding: F.embedding}


class ParamUseCheck(TorchFunctionMode):
    """Active during one forward. ``params``: {id(parameter): name}; ``owners``: {id(parameter):
    ids of the layers that hold it}. ``violations`` lists, after the pass, each use made outside
    an owner's own call, as "name: function"."""

    def __init__(self, params: dict[int, str], owners: dict[int, set[int]], layers: list[nn.Module]):
        super().__init__()
        self.params, self.owners, self.violations = params, owners, []
        self._active: list[nn.Module] = []
        self._handles = []
        for m in layers:
            self._handles.append(m.register_forward_pre_hook(lambda mod, args: self._active.append(mod)))
            self._handles.append(m.register_forward_hook(lambda mod, args, out: self._pop(mod)))

    def _pop(self, mod):
        if self._active and self._active[-1] is mod:
            self._active.pop()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        used = _ids_in(args, self.params, [])
        if kwargs:
            _ids_in(kwargs.values(), self.params, used)
        if used and _has_tensor(result):
            layer = self._active[-1] if self._active else None
            for pid in used:
                own = (layer is not None and id(layer) in self.owners[pid]
                       and _OWN_CALL.get(type(layer)) is func)
                if not own:
                    self.violations.append(f"{self.params[pid]}: {getattr(func, '__name__', func)}")
        return result


def _ids_in(values, params: dict, found: list) -> list:
    """Append to ``found`` the id of each tracked parameter among ``values``, looking inside
    lists, tuples and dicts (a torch function's arguments). Every op of the forward passes here, so
    this is a plain loop: torch's pytree flattening cost ~0.1 ms per op. An id in ``params`` is a
    tracked parameter itself: the parameters are alive, so no other object has their id."""
    for v in values:
        if id(v) in params:
            found.append(id(v))
        elif isinstance(v, (list, tuple)):
            _ids_in(v, params, found)
        elif isinstance(v, dict):
            _ids_in(v.values(), params, found)
    return found


def _has_tensor(result) -> bool:
    if isinstance(result, torch.Tensor):
        return True
    if isinstance(result, (list, tuple)):
        return any(_has_tensor(r) for r in result)
    if isinstance(result, dict):
        return any(_has_tensor(r) for r in result.values())
    return False
