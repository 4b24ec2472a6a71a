"""As-ViT's training-free indicators of one architecture (ALGORITHMS.md, "As-ViT"): the NTK
condition number kappa (trainability, lower is better), the length distortion L^E (expressivity,
higher is better), and ``evaluate`` = both plus the size of the full model, as the search reports it.

Settings (As-ViT's): a batch of images (16 in the paper), ``repeats`` = 5 fresh initialisations of
the proxy network, the last stage's tokens mean-pooled before the final LayerNorm
(``AsViT.pooled_features``, the released code's ``forward_features(x)[1]``) as the output. That
LayerNorm must stay out: at initialisation (weight 1, bias 0) the channel sum of its output is the
same for every input, so every gradient but ``norm.weight``'s would vanish from kappa.

* kappa: the NTK over the parameters whose name contains "weight", LayerNorms on, float64
  ``eigvalsh``; the mean over the initialisations, all of them in one vmapped pass of
  ``asvit_kernels.ntk_condition_number``. A degenerate network (singular or non-finite NTK) gives
  ``inf``: a valid, worst-ranked result, never an exception.
* L^E: a 10-point circle through input space (``asvit_kernels.circle_curve``), a fresh circle per
  initialisation, LayerNorms bypassed (``set_norm(False)``), forward-mode JVPs
  (``asvit_kernels.length_distortion``); the mean over the initialisations. A non-finite mean
  (activations that overflow without LayerNorm) is returned as 0.0, the worst value (never NaN).

Determinism. Initialisation r of seed s is built under ``torch.random.fork_rng`` after
``torch.manual_seed(init_seed(s, r))`` with ``init_seed(s, r) = 1000 * s + r`` (so seeds differ
only while ``repeats <= 1000``); its circle's U comes from a private ``torch.Generator`` seeded
with ``circle_seed(s, r) = init_seed(s, r) + 2**40`` (a stream apart from the weights'). Models
are built on the CPU, then moved to the images' device, so a seed names the same initial weights
on every device. The caller's global RNG state (CPU and initialised CUDA devices) is left as it
was: the whole computation runs inside the fork.

Sources. ``genotype_or_model_factory`` is a genotype (string or ``Genotype``), built as
``AsViT.from_genotype(g, embed_dim=embed_dim, depths=depths, num_classes=0, img_size=<images'>)``
(``num_classes=0``: no head, the indicators never use it), or a callable ``factory(seed) -> nn.Module``
called with ``init_seed(s, r)`` under that seed; it must return a fresh module with
``pooled_features(x) -> (B, ...)`` (the differentiated output), and ``set_norm(bool)`` (LayerNorm
switch) when it has norms to switch (modules without ``set_norm`` are used as they are).
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from functools import lru_cache
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from ..models.asvit import AsViT
from ..models.counting import count_flops, count_params
from ..models.genotype import Genotype
from ..ops import circle_curve, ntk_condition_number
from ..ops import length_distortion as _length_distortion_op
from ..params import ParamSelector

__all__ = ["kappa", "length_distortion", "indicators", "evaluate", "proxy_models", "circles",
           "init_seed", "circle_seed", "features"]

log = logging.getLogger(__name__)
Tensor = torch.Tensor
ModelFactory = Callable[[int], nn.Module]
Source = Union[str, Genotype, ModelFactory]

SEED_STRIDE = 1000          # init_seed(s, r) = SEED_STRIDE * s + r
CIRCLE_OFFSET = 1 << 40     # the circles' generator stream, apart from the weights'
IN_CHANS = 3


# ----------------------------------------------------------------------------- seeds and checks


def init_seed(seed: int, r: int) -> int:
    """The ``torch.manual_seed`` under which initialisation ``r`` of ``seed`` is built."""
    return SEED_STRIDE * seed + r


def circle_seed(seed: int, r: int) -> int:
    """The seed of the ``torch.Generator`` that draws initialisation ``r``'s circle."""
    return init_seed(seed, r) + CIRCLE_OFFSET


def _check_int(value, name: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_images(images, name: str = "images", min_batch: int = 2) -> Tensor:
    """images must be a floating ``(B >= min_batch, 3, H, W)`` tensor."""
    if not isinstance(images, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor (B, {IN_CHANS}, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[0] < min_batch or images.shape[1] != IN_CHANS \
            or min(images.shape[2:]) < 1:
        raise ValueError(f"{name} must be (B >= {min_batch}, {IN_CHANS}, H, W), got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {images.dtype}")
    return images


def _check_shape(input_shape) -> tuple[int, int, int]:
    """A ``(3, H, W)`` sequence of positive ints."""
    ok = (isinstance(input_shape, (tuple, list, torch.Size)) and len(input_shape) == 3
          and all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in input_shape)
          and input_shape[0] == IN_CHANS)
    if not ok:
        raise ValueError(f"input_shape_or_images must be images (B, {IN_CHANS}, H, W) or a shape "
                         f"({IN_CHANS}, H, W), got {input_shape!r}")
    return tuple(input_shape)


def _check_dtype(dtype, default: torch.dtype) -> torch.dtype:
    dtype = default if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype


def _check_depths(depths) -> None:
    ok = (isinstance(depths, (tuple, list)) and len(depths) == 4
          and all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in depths))
    if not ok:
        raise ValueError(f"depths must be 4 ints >= 1 (one per stage), got {depths!r}")


def _is_genotype(source) -> bool:
    return isinstance(source, (str, Genotype))


@contextlib.contextmanager
def _isolated_rng() -> Iterator[None]:
    """Everything inside draws from forked generators: the caller's CPU and CUDA RNG states survive."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        yield


# ----------------------------------------------------------------------------- models and circles


def features(model: nn.Module, x: Tensor) -> Tensor:
    """The indicators' output: ``model.pooled_features(x)``, ``(B, C)`` pooled pre-norm features."""
    return model.pooled_features(x)


def _factory(source: Source, embed_dim: Optional[int], depths: Optional[Sequence[int]],
             img_size: tuple[int, int]) -> ModelFactory:
    """A ``seed -> module`` builder for a genotype or a user factory (checked here)."""
    if _is_genotype(source):
        g = Genotype.parse(source)
        if embed_dim is not None:
            _check_int(embed_dim, "embed_dim", 1)
        if depths is not None:
            _check_depths(depths)
        return lambda _seed: AsViT.from_genotype(g, embed_dim=embed_dim, depths=depths, num_classes=0,
                                                 img_size=img_size)
    if not callable(source):
        raise ValueError("genotype_or_model_factory must be a genotype string, a Genotype or a callable "
                         f"factory(seed) -> nn.Module, got {type(source).__name__}")
    if embed_dim is not None or depths is not None:
        raise ValueError("embed_dim and depths apply to a genotype only; a model factory sets its own")
    return source


def proxy_models(genotype_or_model_factory: Source, img_size: Union[int, Sequence[int]], *, repeats: int = 5,
                 embed_dim: Optional[int] = None, depths: Optional[Sequence[int]] = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu") -> list[nn.Module]:
    """The ``repeats`` freshly initialised proxy networks the indicators measure, in eval mode.

    Model r is built on the CPU under ``torch.manual_seed(init_seed(seed, r))`` inside a forked
    RNG (the caller's state is untouched), then moved to ``device`` / ``dtype``.
    ``img_size``: the side or (H, W) the genotype's model is built for.
    """
    _check_int(repeats, "repeats", 1)
    _check_int(seed, "seed", 0)
    side = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    build = _factory(genotype_or_model_factory, embed_dim, depths, side)
    models = []
    with _isolated_rng():
        for r in range(repeats):
            s = init_seed(seed, r)
            torch.manual_seed(s)
            m = build(s)
            if not isinstance(m, nn.Module) or not callable(getattr(m, "pooled_features", None)):
                raise ValueError("genotype_or_model_factory must return an nn.Module with pooled_features, "
                                 f"got {type(m).__name__}")
            models.append(m.to(device=device, dtype=dtype).eval())
    return models


def circles(input_shape: Sequence[int], *, repeats: int = 5, n_points: int = 10, seed: int = 0,
            dtype: torch.dtype = torch.float32, device: Union[str, torch.device] = "cpu"
            ) -> list[tuple[Tensor, Tensor]]:
    """Initialisation r's circle: ``circle_curve(input_shape, n_points)`` with U drawn from a
    ``torch.Generator`` seeded ``circle_seed(seed, r)``. Returns ``repeats`` pairs of (points,
    tangents), each ``(n_points, *input_shape)``."""
    _check_int(repeats, "repeats", 1)
    _check_int(n_points, "n_points", 1)
    _check_int(seed, "seed", 0)
    out = []
    for r in range(repeats):
        g = torch.Generator().manual_seed(circle_seed(seed, r))
        pts, tans = circle_curve(input_shape, n_points, generator=g)
        out.append((pts.to(device=device, dtype=dtype), tans.to(device=device, dtype=dtype)))
    return out


def _set_norm(models: Sequence[nn.Module], enabled: bool) -> None:
    for m in models:
        if callable(getattr(m, "set_norm", None)):
            m.set_norm(enabled)


# ----------------------------------------------------------------------------- the two indicators on built models


def _kappa_of(models: Sequence[nn.Module], x: Tensor, params: ParamSelector, models_per_pass: Optional[int],
              backend: Optional[str]) -> float:
    """Mean kappa over the models (LayerNorm on), all in one vmapped pass unless models_per_pass says:
    the search's proxies at B = 16 are small enough that the pass's memory does not matter, and one
    vmapped pass beat one pass per model (2 inits of a quick-preset proxy, 1 CPU thread, loaded:
    245 vs 324 ms); ``ntk`` itself defaults to one model per pass (its cost model)."""
    _set_norm(models, True)
    try:
        value = ntk_condition_number(list(models), x, params=params, output_fn=features,
                                     models_per_pass=models_per_pass or len(models), backend=backend)
    except torch.linalg.LinAlgError as err:  # eigvalsh did not converge: as degenerate as it gets
        log.warning("kappa: eigvalsh failed (%s); returning inf", err)
        return math.inf
    return math.inf if math.isnan(value) else value


def _length_distortion_of(models: Sequence[nn.Module], curves: Sequence[tuple[Tensor, Tensor]]) -> float:
    """Mean L^E over the models (LayerNorm off), model r on curve r; non-finite -> 0.0."""
    _set_norm(models, False)
    total = 0.0
    for m, (pts, tans) in zip(models, curves):
        with torch.no_grad():  # forward-mode only: no graph for reverse mode
            total += _length_distortion_op(m, pts, tans, output_fn=features)
    value = total / len(models)
    if not math.isfinite(value):
        log.warning("length_distortion: non-finite L^E (%s); returning 0.0 (worst)", value)
        return 0.0
    return value


def _img_side(images: Tensor) -> tuple[int, int]:
    return int(images.shape[-2]), int(images.shape[-1])


# ----------------------------------------------------------------------------- public API


def kappa(genotype_or_model_factory: Source, images: Tensor, *, repeats: int = 5, embed_dim: Optional[int] = None,
          depths: Optional[Sequence[int]] = None, seed: int = 0, params: ParamSelector = "weights",
          models_per_pass: Optional[int] = None, backend: Optional[str] = None,
          dtype: Optional[torch.dtype] = None) -> float:
    """As-ViT's trainability indicator: the mean over ``repeats`` fresh initialisations of
    lambda_max / lambda_min of the NTK of ``pooled_features`` on ``images``. Lower is better;
    ``inf`` for a degenerate network.

    Args:
        genotype_or_model_factory: genotype (string / Genotype) or ``factory(seed) -> nn.Module``
            (see the module docstring).
        images: ``(B >= 2, 3, H, W)`` (As-ViT: B = 16); the genotype's proxy is built for H x W.
        repeats: initialisations (As-ViT: 5), all differentiated in one vmapped pass.
        embed_dim, depths: the proxy's stage-1 width and per-stage depths (genotype only; None:
            the genotype's own).
        seed: initialisation r uses ``torch.manual_seed(1000 * seed + r)``.
        params: which parameters: "weights" (As-ViT), "all" or ``(name, p) -> bool``.
        models_per_pass: at most this many initialisations per vmapped pass (memory bound); None: all.
        backend: backend of the per-sample-gradient Gram (None: automatic).
        dtype: the models' and images' dtype (None: the images'; float32 as As-ViT).
    """
    images = _check_images(images)
    dtype = _check_dtype(dtype, images.dtype)
    with _isolated_rng():
        models = proxy_models(genotype_or_model_factory, _img_side(images), repeats=repeats, embed_dim=embed_dim,
                              depths=depths, seed=seed, dtype=dtype, device=images.device)
        return _kappa_of(models, images.to(dtype), params, models_per_pass, backend)


def _input_shape(input_shape_or_images) -> tuple[torch.device, Optional[torch.dtype], tuple[int, int, int]]:
    """(device, dtype or None, (3, H, W)) from images or a shape."""
    if isinstance(input_shape_or_images, Tensor):
        images = _check_images(input_shape_or_images, "input_shape_or_images", min_batch=1)
        return images.device, images.dtype, tuple(images.shape[1:])
    return torch.device("cpu"), None, _check_shape(input_shape_or_images)


def length_distortion(genotype_or_model_factory: Source, input_shape_or_images, *, repeats: int = 5,
                      n_points: int = 10, embed_dim: Optional[int] = None, depths: Optional[Sequence[int]] = None,
                      seed: int = 0, dtype: Optional[torch.dtype] = None) -> float:
    """As-ViT's expressivity indicator: the mean over ``repeats`` fresh initialisations (LayerNorms
    bypassed) of ``sum_n || d pooled_features(x(theta_n)) / d theta ||_2`` along an
    ``n_points``-point circle through input space, a fresh circle per initialisation. Higher is
    better; 0.0 when non-finite.

    Args:
        input_shape_or_images: images ``(B, 3, H, W)`` (only their shape, device and dtype are used)
            or a shape ``(3, H, W)`` (CPU).
        dtype: None: the images' dtype, float32 for a shape.
        Others as ``kappa``; initialisation r is the same network ``kappa`` measures for that seed.
    """
    device, img_dtype, shape = _input_shape(input_shape_or_images)
    dtype = _check_dtype(dtype, img_dtype or torch.float32)
    with _isolated_rng():
        models = proxy_models(genotype_or_model_factory, shape[1:], repeats=repeats, embed_dim=embed_dim,
                              depths=depths, seed=seed, dtype=dtype, device=device)
        curves = circles(shape, repeats=repeats, n_points=n_points, seed=seed, dtype=dtype, device=device)
        return _length_distortion_of(models, curves)


def indicators(genotype_or_model_factory: Source, images: Tensor, *, repeats: int = 5, n_points: int = 10,
               embed_dim: Optional[int] = None, depths: Optional[Sequence[int]] = None, seed: int = 0,
               params: ParamSelector = "weights", models_per_pass: Optional[int] = None,
               backend: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> dict[str, float]:
    """``{"kappa": kappa(...), "length_distortion": length_distortion(...)}`` with the same
    arguments, the ``repeats`` models built once and shared (kappa first, with LayerNorm on)."""
    images = _check_images(images)
    dtype = _check_dtype(dtype, images.dtype)
    with _isolated_rng():
        models = proxy_models(genotype_or_model_factory, _img_side(images), repeats=repeats, embed_dim=embed_dim,
                              depths=depths, seed=seed, dtype=dtype, device=images.device)
        curves = circles(tuple(images.shape[1:]), repeats=repeats, n_points=n_points, seed=seed, dtype=dtype,
                         device=images.device)
        k = _kappa_of(models, images.to(dtype), params, models_per_pass, backend)
        le = _length_distortion_of(models, curves)
    return {"kappa": k, "length_distortion": le}


@lru_cache(maxsize=4096)
def _full_size(genotype: str, num_classes: int, size: tuple[int, int]) -> tuple[int, int]:
    """(params, multiply-adds) of the full model, built on the meta device (no weights allocated)."""
    model = AsViT.from_genotype(genotype, num_classes=num_classes, img_size=size, device="meta")
    return count_params(model), count_flops(model, (IN_CHANS, *size))


def _count_size(count_size, images: Tensor) -> tuple[int, int]:
    if count_size is None:
        return _img_side(images)
    pair = (count_size, count_size) if isinstance(count_size, int) and not isinstance(count_size, bool) \
        else tuple(count_size) if isinstance(count_size, (tuple, list)) else None
    if pair is None or len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                                 for s in pair):
        raise ValueError(f"count_size must be None, an int side or (H, W), got {count_size!r}")
    return pair


def evaluate(genotype, images: Tensor, *, repeats: int = 5, embed_dim: Optional[int] = None,
             depths: Optional[Sequence[int]] = None, seed: int = 0, num_classes: int = 1000,
             count_size: Union[int, Sequence[int], None] = None, n_points: int = 10,
             params: ParamSelector = "weights", models_per_pass: Optional[int] = None,
             backend: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> dict:
    """One architecture as the search reports it.

    Returns ``{"kappa": float, "length_distortion": float, "params": int, "flops": int,
    "seconds": float}``: kappa and L^E (``indicators``) of the proxy (``embed_dim`` / ``depths``
    override the genotype's), params and multiply-adds (``models.count_flops``) of the FULL model,
    i.e. the genotype as given with a ``num_classes`` head, at ``count_size`` (default: the images'
    H x W); ``seconds``: wall time of this call. kappa may be ``inf`` (degenerate network, worst);
    L^E is never NaN (non-finite -> 0.0, worst).

    Args:
        genotype: genotype string or ``Genotype`` (sizes need the architecture, not a factory).
        Others as ``kappa`` / ``length_distortion``.
    """
    start = time.perf_counter()
    if not _is_genotype(genotype):
        raise ValueError(f"genotype must be a genotype string or Genotype, got {type(genotype).__name__}")
    g = Genotype.parse(genotype)
    _check_int(num_classes, "num_classes", 0)
    size = _count_size(count_size, _check_images(images))
    out = indicators(g, images, repeats=repeats, n_points=n_points, embed_dim=embed_dim, depths=depths, seed=seed,
                     params=params, models_per_pass=models_per_pass, backend=backend, dtype=dtype)
    with _isolated_rng():  # count_flops draws a random image
        n_params, flops = _full_size(str(g), num_classes, size)
    out.update(params=int(n_params), flops=int(flops), seconds=time.perf_counter() - start)
    log.debug("evaluate %s: %s", g, out)
    return out
