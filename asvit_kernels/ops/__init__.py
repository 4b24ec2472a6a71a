"""The public ops: validation, backend dispatch, torch.library registration, autograd."""
from .attention import attention, varlen_attention
from .elastic import elastic_layer_norm, elastic_linear
from .ntk import circle_curve, length_distortion, ntk, ntk_condition_number, per_sample_grad_gram
from .packing import cu_seqlens_from_lengths, pack, unpack
from . import flops as _flops  # noqa: F401  (registers the ops' FlopCounterMode formulas)

__all__ = ["elastic_linear", "elastic_layer_norm", "varlen_attention", "attention", "pack", "unpack",
           "cu_seqlens_from_lengths", "per_sample_grad_gram", "ntk", "ntk_condition_number", "circle_curve",
           "length_distortion"]
