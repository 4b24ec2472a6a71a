"""Settings of the ``asvit pipeline`` job: ``quick`` (the bundled digits on a 2-core CPU in minutes)
and ``paper`` (As-ViT's published settings for ImageNet on GPUs)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

from asvit_kernels.train.retokenize import EMA_AT_SWITCH

__all__ = ["Preset", "PRESETS", "preset"]


@dataclass(frozen=True)
class Preset:
    """One pipeline configuration; every field can be overridden from the command line.

    Search: REINFORCE ``search_steps`` steps over the As-ViT space, ``repeats`` initialisations per
    indicator, on ``kappa_batch`` training images at the data's size (the paper: 16 ImageNet
    images). Scaling: from the searched topology at depth [1, 1, 1, 1], proxy width
    ``scale_hidden`` (full model 4x), until the full model has ``param_limit[0]`` parameters
    (candidates above ``param_limit[1]`` dropped). Training: the ``member`` of the family
    ("largest" = the last scaling step, "smallest", or an index) with progressive
    re-tokenization (``retokenize``: "paper", "none" or explicit stages, ``train.retokenize``);
    ``ema_at_switch``: "keep", "reseed" or "restart" the EMA copies at a re-tokenization switch
    (``train.retokenize``; bench/results/ema_at_switch_cpu2t.md measures both on this preset).
    """

    name: str
    search_steps: int
    repeats: int
    kappa_batch: int
    scale_hidden: int
    param_limit: tuple[float, float]
    member: str
    retokenize: str
    epochs: int
    batch_size: int
    lr: float
    min_lr: float
    weight_decay: float
    warmup_epochs: float
    label_smoothing: float
    clip_grad: Optional[float]
    drop_path: float
    ema_decays: tuple[float, ...]
    crop_scale: tuple[float, float] = (0.35, 1.0)
    ema_at_switch: str = "restart"
    notes: str = ""

    def __post_init__(self):
        if self.ema_at_switch not in EMA_AT_SWITCH:
            raise ValueError(f"ema_at_switch must be one of {EMA_AT_SWITCH}, got {self.ema_at_switch!r}")

    def with_(self, **changes: Any) -> "Preset":
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS: dict[str, Preset] = {
    # Sized so search + scaling + training of a ~4M-parameter member finish in a few minutes on a
    # 2-core CPU (README: measured times) and clearly beat chance (10%) on digits.
    "quick": Preset(name="quick", search_steps=60, repeats=2, kappa_batch=16, scale_hidden=8,
                    param_limit=(4e6, 6e6), member="largest", retokenize="paper", epochs=20, batch_size=64,
                    lr=2e-3, min_lr=1e-5, weight_decay=0.05, warmup_epochs=2, label_smoothing=0.1, clip_grad=5.0,
                    drop_path=0.0, ema_decays=(0.99,), crop_scale=(0.6, 1.0),
                    notes="bundled digits (32x32), CPU minutes"),
    # ALGORITHMS.md / the As-ViT paper: 500 REINFORCE steps, 5 initialisations, 16 images at 224;
    # scaling to 80M (drop > 110M); 300 epochs, AdamW lr 1e-3 at batch 1024 (here per process:
    # 128 x 8 GPUs), weight decay 0.05, 20 warmup epochs, label smoothing 0.1, drop path 0.1,
    # EMA 0.9996, the paper's re-tokenization. Needs ImageNet (--data DIR in ImageFolder layout).
    "paper": Preset(name="paper", search_steps=500, repeats=5, kappa_batch=16, scale_hidden=8,
                    param_limit=(80e6, 110e6), member="largest", retokenize="paper", epochs=300, batch_size=128,
                    lr=1e-3, min_lr=1e-5, weight_decay=0.05, warmup_epochs=20, label_smoothing=0.1, clip_grad=5.0,
                    drop_path=0.1, ema_decays=(0.9996,), crop_scale=(0.08, 1.0),
                    notes="ImageNet on GPUs (8 x H200-class: torchrun --nproc-per-node 8)"),
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {name!r}")
    return PRESETS[name]
