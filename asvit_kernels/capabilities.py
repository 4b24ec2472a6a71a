"""What each backend of each op can take, declared once: devices, dtypes, head dims, GPU archs,
attention features, and whether it does its products on tensor cores there (xformers' dispatcher is
the model). ``backends.pick`` chooses from this table and ``backends.explain`` says why each other
backend was not chosen; ``asvit info --op varlen_attention --dtype bf16 --head-dim 45`` prints it.

Nothing here is measured: no kernel of this library has run on a GPU yet. Until one is, a CUDA call
takes the first backend, in each op's preference order, that is tensor-core by construction for
the call's dtype and arch; only when none is does it take the first that runs at all.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

ATTENTION_FEATURES = ("window", "softcap", "alibi", "dropout")
HALF = (torch.float16, torch.bfloat16)
KERNEL_DTYPES = (torch.float32,) + HALF
ALL_DTYPES = (torch.float64,) + KERNEL_DTYPES


def _tf32() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


def triton_tensor_cores(dtype: torch.dtype, arch: Optional[int]) -> bool:
    """tl.dot is mma/wgmma from sm_80 (fp16, bf16; fp32 as tf32 when torch allows tf32). Triton >= 3.2
    lowers it to FMA on sm_70 (V100), and we claim nothing for sm_75."""
    if arch is None or arch < 80:
        return False
    return dtype in HALF or (dtype == torch.float32 and _tf32())


def wmma_tensor_cores(dtype: torch.dtype, arch: Optional[int]) -> bool:
    """The CUDA extension's WMMA tiles: fp16 from sm_70, bf16 and tf32 (when torch allows tf32)
    from sm_80; anything else is its fp32 FMA path."""
    if arch is None:
        return False
    if dtype == torch.float16:
        return arch >= 70
    return arch >= 80 and (dtype == torch.bfloat16 or (dtype == torch.float32 and _tf32()))


def flash2_tensor_cores(dtype: torch.dtype, arch: Optional[int]) -> bool:
    return arch is not None and arch >= 80 and dtype in HALF


def _never(dtype: torch.dtype, arch: Optional[int]) -> bool:
    return False


def _any_head_dim(head_dim: int) -> Optional[str]:
    return None if 1 <= head_dim <= 256 else f"head dim {head_dim} is outside 1..256"


def _flash2_head_dim(head_dim: int) -> Optional[str]:
    if head_dim > 256:
        return f"head dim {head_dim} is above FlashAttention-2's 256"
    return None if head_dim % 8 == 0 else f"head dim {head_dim} is not a multiple of 8 (FlashAttention-2)"


@dataclass(frozen=True)
class Capability:
    """One backend of one op. ``devices`` are torch device types; ``min_arch`` bounds CUDA compute
    capability (80 = sm_80); ``head_dim(d)`` says why a head dim is refused (None: taken)."""
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    min_arch: Optional[int] = None
    head_dim: Callable[[int], Optional[str]] = _any_head_dim
    features: frozenset = field(default_factory=frozenset)
    tensor_cores: Callable[[torch.dtype, Optional[int]], bool] = _never
    how: str = ""


_TORCH_ATTENTION = Capability(
    ("cpu", "cuda", "mps", "xpu"), ALL_DTYPES, features=frozenset(ATTENTION_FEATURES),
    how="plain PyTorch: the CPU flash kernel per group of equal lengths, else batched matmuls")

TABLE: dict[str, dict[str, Capability]] = {
    "varlen_attention": {
        "torch": _TORCH_ATTENTION,
        "triton": Capability(("cuda", "cpu"), KERNEL_DTYPES, features=frozenset(ATTENTION_FEATURES),
                             tensor_cores=triton_tensor_cores, how="Triton flash-attention tiles over packed rows (tl.dot)"),
        "cuda": Capability(("cuda",), KERNEL_DTYPES, min_arch=70, tensor_cores=wmma_tensor_cores,
                           how="the compiled extension's flash-attention tiles (WMMA)"),
        "torch_flash": Capability(("cuda",), HALF, min_arch=80, head_dim=_flash2_head_dim,
                                  tensor_cores=flash2_tensor_cores,
                                  how="PyTorch's built-in FlashAttention-2 varlen kernel "
                                      "(torch.nn.attention.varlen.varlen_attn's)"),
    },
    "per_sample_grad_gram": {
        "torch": Capability(("cpu", "cuda", "mps", "xpu"), ALL_DTYPES, how="plain PyTorch matmuls"),
        "triton": Capability(("cuda", "cpu"), KERNEL_DTYPES, tensor_cores=triton_tensor_cores,
                             how="Triton Gram tiles over the triangle (tl.dot)"),
        "cuda": Capability(("cuda",), KERNEL_DTYPES, min_arch=70, tensor_cores=wmma_tensor_cores,
                           how="the compiled extension's Gram tiles (WMMA)"),
    },
    "elastic_linear": {
        "torch": Capability(("cpu", "cuda", "mps", "xpu"), ALL_DTYPES, how="plain PyTorch matmuls on views"),
        "triton": Capability(("cuda", "cpu"), KERNEL_DTYPES, tensor_cores=triton_tensor_cores,
                             how="Triton gather-matmul (tl.dot)"),
    },
    "elastic_layer_norm": {
        "torch": Capability(("cpu", "cuda", "mps", "xpu"), ALL_DTYPES, how="plain PyTorch"),
        "triton": Capability(("cuda", "cpu"), KERNEL_DTYPES, how="Triton row kernel"),
        "cuda": Capability(("cuda",), KERNEL_DTYPES, min_arch=70, how="the compiled extension's row kernel"),
    },
}

# CUDA calls try these in order (torch is always the last resort). Triton first where both fused
# backends are tensor-core: its kernels' semantics are tested here in the interpreter and its tiles
# compiled for sm_80/86/90, while the CUDA kernels' semantics can only be tested on a GPU. The
# layer norm is memory-bound (no tensor cores to gain): the extension's kernel first, as before.
PREFERENCE: dict[str, tuple[str, ...]] = {
    "varlen_attention": ("triton", "cuda", "torch_flash"),
    "per_sample_grad_gram": ("triton", "cuda"),
    "elastic_linear": ("triton",),
    "elastic_layer_norm": ("cuda", "triton"),
}


def refusal(op: str, backend: str, device_type: str, dtype: torch.dtype, arch: Optional[int],
            head_dim: Optional[int] = None, features=()) -> Optional[str]:
    """Why ``backend``'s declared capability excludes this call (None: it is inside)."""
    cap = TABLE[op][backend]
    if device_type not in cap.devices:
        return f"it runs on {'/'.join(cap.devices)} tensors, not {device_type}"
    if dtype not in cap.dtypes:
        return f"it takes {', '.join(str(d).replace('torch.', '') for d in cap.dtypes)}, not {str(dtype)[6:]}"
    if device_type == "cuda" and cap.min_arch is not None and arch is not None and arch < cap.min_arch:
        return f"it needs sm_{cap.min_arch} or newer, this is sm_{arch}"
    if head_dim is not None and (why := cap.head_dim(head_dim)):
        return why
    missing = sorted(set(features) - cap.features)
    if missing:
        return f"it does not implement {', '.join(missing)}"
    return None
